"""`xcompile inspect` and `xcompile eval` from the command line, on the tiny fixture checkpoint (and
on the competent one where scores are compared)."""

from __future__ import annotations

import json
import os
import pickle

import torch
from sabotage import sabotage_checkpoint
from typer.testing import CliRunner

from xcompile.cli import app

runner = CliRunner()


def test_inspect_json(tiny_fat_ckpt):
    r = runner.invoke(app, ["inspect", tiny_fat_ckpt, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["format"] == "xcompile.fat-policy"
    assert {b["name"] for b in doc["bodies"]} == {"a1", "panda"}
    assert all(0 < b["fraction_used"] < 1 for b in doc["bodies"])


def test_inspect_table(tiny_fat_ckpt):
    r = runner.invoke(app, ["inspect", tiny_fat_ckpt])
    assert r.exit_code == 0 and "a1" in r.stdout and "panda" in r.stdout


def test_eval_same_seed_same_score(competent_fat_ckpt, tmp_path):
    # On the competent fixture (a1 walks: scores ~1; the tiny random one scores 0), so that the
    # score comparisons below can fail.
    args = ["eval", competent_fat_ckpt, "--target", "a1", "--episodes", "4", "--seed", "5",
            "--json"]
    a = json.loads(runner.invoke(app, args).stdout)
    b = json.loads(runner.invoke(app, args).stdout)
    assert a["scores"] == b["scores"] and a["episodes"] == 4 and a["known_body"] is True
    assert a["score"] > 0.5, a["scores"]
    # The report's episodes of a build seeded 5, with the score's 95% interval and what the
    # robot did (a1 walks: velocity and yaw-rate tracking errors, cost of transport).
    assert a["stream"] == "report" and a["seed"] == 5
    lo, hi = a["score_ci95"]
    assert lo <= a["score"] <= hi
    assert {"vel_error_mps", "yaw_rate_error_rps", "cost_of_transport", "falls",
            "returns"} <= set(a)
    # Another stream is other episodes: other scores, other errors; an unknown one is refused
    # by name.
    c = json.loads(runner.invoke(app, [*args, "--stream", "bench"]).stdout)
    assert c["stream"] == "bench" and c["score"] > 0.5
    assert c["scores"] != a["scores"] and c["vel_error_mps"] != a["vel_error_mps"]
    r = runner.invoke(app, [*args, "--stream", "nope"])
    assert r.exit_code == 2 and "unknown --stream 'nope'" in " ".join(r.output.split())
    # The same checkpoint with its actions x 0.7 scores lower on the same episodes, by far more
    # than two runs of one policy differ (not at all) and outside the real score's 95% interval.
    bad = sabotage_checkpoint(competent_fat_ckpt, tmp_path / "sabotaged.pt")
    d = json.loads(runner.invoke(app, ["eval", str(bad), *args[2:]]).stdout)
    run_to_run = max(abs(x - y) for x, y in zip(a["scores"], b["scores"]))
    assert a["score"] - d["score"] > max(0.1, run_to_run), (a["scores"], d["scores"])
    assert d["score_ci95"][1] < lo


def test_eval_unseen_body_is_zero_shot(tiny_fat_ckpt, tmp_path):
    gif = tmp_path / "x.gif"
    r = runner.invoke(app, ["eval", tiny_fat_ckpt, "--target", "xarm6", "--episodes", "1",
                            "--gif", str(gif)])
    assert r.exit_code == 0, r.output
    assert "zero-shot" in r.stdout and gif.stat().st_size > 0


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_eval_refuses_pickled_code(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"format": "xcompile.fat-policy", "x": _Payload()}, bad, pickle_module=pickle)
    r = runner.invoke(app, ["eval", str(bad), "--target", "a1"])
    assert r.exit_code != 0
    assert "system" in r.output and "Traceback" not in r.output


def test_eval_errors_are_one_clear_line(tmp_path, tiny_fat_ckpt):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    cases = [
        (["eval", str(tmp_path / "missing.pt"), "--target", "a1"], "no such file"),
        (["eval", str(tmp_path / "junk.pt"), "--target", "a1"], "junk.pt"),
        (["eval", tiny_fat_ckpt, "--target", "atlas"], "unknown robot target"),
        (["eval", tiny_fat_ckpt, "--target", "a1", "--episodes", "0"], "episodes"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code != 0, args
        assert needle in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_eval_under_a_fault_of_the_suite(competent_fat_ckpt):
    """`--fault` runs the suite's fault (sized for the body) and says so; a locked knee costs the
    walking fixture score on the same episodes, and a fault a body cannot have is one clear
    error."""
    base = ["eval", competent_fat_ckpt, "--target", "a1", "--episodes", "2", "--json"]
    nominal = json.loads(runner.invoke(app, base).stdout)
    r = runner.invoke(app, [*base, "--fault", "locked-joint"])
    assert r.exit_code == 0, r.output
    locked = json.loads(r.stdout)
    assert nominal["fault"] is None and locked["fault"] == "locked-joint"
    assert locked["score"] < nominal["score"] - 0.05
    r = runner.invoke(app, ["eval", competent_fat_ckpt, "--target", "panda", "--fault", "payload"])
    assert r.exit_code != 0 and "does not apply to panda" in r.output
    r = runner.invoke(app, [*base, "--fault", "wobble"])
    assert r.exit_code != 0 and "unknown fault 'wobble'" in r.output
