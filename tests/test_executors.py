"""Executors and evaluation split into episode chunks: the same per-episode results in this
process, on a local process pool of 1 or 2 workers, and through `xcompile eval --executor`;
errors from workers come back as one-line user errors."""

from __future__ import annotations

import json
import socket
import sys

import pytest
from typer.testing import CliRunner

from tests.conftest import short_robot
from xcompile.cli import app
from xcompile.errors import CheckpointError, XCompileError
from xcompile.evaluate import score_policy
from xcompile.executors import evaluate_file, make_executor
from xcompile.executors.ray_pool import probe_address
from xcompile.policy import load_policy

runner = CliRunner()


@pytest.fixture(scope="module")
def panda():
    # The tiny random policy scores > 0 on panda, 0 on a1; 3 s episodes: what these tests check
    # is that executors agree, not what the episodes score.
    return short_robot("panda", 3.0)


def _fields(res):
    return (res.scores, res.returns, res.falls, res.steps, res.metrics)


def test_chunks_give_the_same_episodes_on_every_executor(tiny_fat_ckpt, panda, tmp_path):
    # chunk 10 (the default) is exactly score_policy, the build report's scoring
    ref = score_policy(load_policy(tiny_fat_ckpt, panda).act, panda, 3, 0)
    assert _fields(evaluate_file(tiny_fat_ckpt, panda, 3, 0)) == _fields(ref)
    # chunks of one episode: three tasks, the same results in this process and on 1 or 2 workers
    serial = evaluate_file(tiny_fat_ckpt, panda, 3, 0, chunk=1)
    assert serial.scores[0] > 0 and len(serial.returns) == 3
    for workers in (1, 2):
        with make_executor("process", workers) as ex:
            assert ex.workers == workers
            got = evaluate_file(tiny_fat_ckpt, panda, 3, 0, chunk=1, executor=ex)
            assert _fields(got) == _fields(serial), workers
            if workers == 2:
                # a worker's load error comes back as the user error it is, not a traceback
                bad = tmp_path / "bad.pt"
                bad.write_bytes(b"not a checkpoint")
                with pytest.raises(CheckpointError):
                    evaluate_file(bad, panda, 2, 0, chunk=1, executor=ex)
    # another stream or seed is other episodes
    assert evaluate_file(tiny_fat_ckpt, panda, 3, 1, chunk=1).returns != serial.returns


def test_eval_command_with_a_process_pool_matches_serial(tiny_fat_ckpt):
    args = ["eval", tiny_fat_ckpt, "--target", "panda", "--episodes", "2", "--json"]
    a = runner.invoke(app, args)
    b = runner.invoke(app, [*args, "--executor", "process", "--workers", "2"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    assert da["scores"] == db["scores"] and da["returns"] == db["returns"]
    assert db["executor"] == "process"


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "threads"}, "unknown executor 'threads'"),
    ({"name": "serial", "workers": 2}, "runs one task at a time"),
    ({"name": "process", "workers": 0}, "--workers must be from 1"),
    ({"name": "process", "ray_address": "auto"}, "--ray-address is for --executor ray"),
])
def test_executor_refusals(kwargs, message):
    with pytest.raises(XCompileError, match=message):
        make_executor(**kwargs)


def test_evaluate_file_refuses_before_running(tiny_fat_ckpt, panda, tmp_path):
    with pytest.raises(XCompileError, match="unknown seed stream"):
        evaluate_file(tiny_fat_ckpt, panda, 2, 0, stream="nope")
    with pytest.raises(XCompileError, match="no such file"):
        evaluate_file(tmp_path / "missing.pt", panda, 2, 0)
    with pytest.raises(XCompileError, match="chunk must be"):
        evaluate_file(tiny_fat_ckpt, panda, 2, 0, chunk=0)


def test_ray_missing_and_silent_addresses_are_one_line_errors(tiny_fat_ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)        # import ray -> ImportError
    with pytest.raises(XCompileError, match=r"pip install 'xcompile\[ray\]'"):
        make_executor("ray", 2)
    res = runner.invoke(app, ["eval", tiny_fat_ckpt, "--target", "a1", "--executor", "ray"])
    assert res.exit_code == 2 and "xcompile[ray]" in res.output and "Traceback" not in res.output
    with socket.socket() as s:                           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(XCompileError, match="does not answer"):
        probe_address(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(XCompileError, match="give auto or HOST:PORT"):
        probe_address("nowhere")


def test_one_build_scores_its_stages_on_the_pool(competent_fat_ckpt, short_toml, tmp_path):
    """`xcompile build --executor process` (one target): the passes run here, the report's
    scoring on the pool, and every stage's per-episode scores equal the serial build's."""
    reports = {}
    for ex, extra in (("serial", []), ("process", ["--workers", "2"])):
        out = tmp_path / ex
        r = runner.invoke(app, ["build", competent_fat_ckpt, "--target", short_toml["panda"],
                                "--passes", "pin-embodiment,export-onnx", "--episodes", "2",
                                "--profile", "fast", "--out", str(out), "--cache-dir",
                                str(tmp_path / f"cache-{ex}"), "--executor", ex, *extra,
                                "--json"])
        assert r.exit_code == 0, r.output
        reports[ex] = json.loads((out / "report.json").read_text())
    for s, p in zip(reports["serial"]["stages"], reports["process"]["stages"], strict=True):
        assert s["scores"] == p["scores"] and s["scores"]
