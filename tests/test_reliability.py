"""Reliability and security promises, each with a test that fails if the promise is broken.

Checkpoints never run code and bad bytes never give a traceback (fuzzed); `convert` round-trips
bit for bit; a 200 MB checkpoint is held once in memory; an interrupted build leaves the previous
output intact and resumes from the cache; `build --from manifest.json` is byte-identical; bad
URDFs and unservable robots get one clear message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from xcompile.cli import app
from xcompile.errors import CheckpointError, ContractError, TargetError
from xcompile.models.checkpoint import convert_checkpoint, load_checkpoint, save_checkpoint
from xcompile.models.descriptors import joint_descriptors
from xcompile.models.fat import FatConfig, FatPolicy
from xcompile.policy import check_contract
from xcompile.targets import load_robot

runner = CliRunner()
SMALL = FatConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, desc_hidden=16, desc_layers=1)
# Fast settings for builds run by these tests; the passes' own tests cover their defaults.
LIGHT = ('profile = "fast"\n[pass.pin-embodiment]\nn_check_obs = 128\ncheck_episodes = 0\n'
         '[pass.export-onnx]\nn_check_obs = 64\n')


def _out(res) -> str:
    return " ".join((res.output + (getattr(res, "stderr", "") or "")).split())


def _registry(*names: str) -> list[dict]:
    out = []
    for name in names:
        r = load_robot(name)
        out.append({"name": name, "family": r.family, "joints": list(r.joints.names),
                    "descriptors": joint_descriptors(r).tolist(), "urdf": r.urdf})
    return out


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> dict[str, bytes]:
    torch.manual_seed(1)
    model = FatPolicy(SMALL)
    d = tmp_path_factory.mktemp("small")
    return {sfx: save_checkpoint(d / f"small{sfx}", model, _registry("a1")).read_bytes()
            for sfx in (".pt", ".safetensors")}


# ------------------------------------------------------------------------------ 1. never run code


def test_convert_round_trips_bit_for_bit(tiny_fat_ckpt, tmp_path):
    st_path, back = tmp_path / "fat.safetensors", tmp_path / "back.pt"
    res = runner.invoke(app, ["convert", tiny_fat_ckpt, str(st_path)])
    assert res.exit_code == 0, _out(res)
    assert "weights identical" in _out(res)
    convert_checkpoint(st_path, back)
    a, b = load_checkpoint(tiny_fat_ckpt), load_checkpoint(back)
    assert a.registry == b.registry and a.config == b.config
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # Refusals: existing output, unknown container, a source that carries code.
    res = runner.invoke(app, ["convert", tiny_fat_ckpt, str(st_path)])
    assert res.exit_code == 2 and "already exists" in _out(res) and "--overwrite" in _out(res)
    res = runner.invoke(app, ["convert", tiny_fat_ckpt, str(tmp_path / "fat.zip")])
    assert res.exit_code == 2 and ".safetensors" in _out(res)
    assert not (tmp_path / "fat.zip").exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_refuses_code_and_writes_nothing(tmp_path):
    marker, evil, dst = tmp_path / "PWNED", tmp_path / "evil.pt", tmp_path / "out.safetensors"
    torch.save({"format": "xcompile.fat-policy", "payload": _Evil(str(marker))}, evil)
    res = runner.invoke(app, ["convert", str(evil), str(dst)])
    assert res.exit_code == 2 and "carries code" in _out(res)
    assert not marker.exists() and not dst.exists()


def _mutations():
    """(kind, position fraction, bytes) edits of a valid file: truncate, overwrite, insert."""
    return st.tuples(st.sampled_from(["truncate", "overwrite", "insert"]),
                     st.floats(0, 1, allow_nan=False), st.binary(min_size=1, max_size=64))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(_mutations(), min_size=1, max_size=3))
def test_fuzz_checkpoint_loader_never_tracebacks(small_files, suffix, edits):
    data = bytearray(small_files[suffix])
    for kind, frac, blob in edits:
        i = int(frac * len(data))
        if kind == "truncate":
            del data[i:]
        elif kind == "overwrite":
            data[i:i + len(blob)] = blob
        else:
            data[i:i] = blob
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(bytes(data))
        try:
            load_checkpoint(path)          # a harmless edit may still load: that is fine
        except CheckpointError as e:
            assert str(e)


TOML_VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                        st.booleans(), st.text(max_size=12),
                        st.lists(st.floats(-5, 5), max_size=14), st.lists(st.text(max_size=4),
                                                                          max_size=3))


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else
                                     "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else str(v)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(line=st.integers(0, 40), value=TOML_VALUES, delete=st.booleans())
def test_fuzz_robot_loader_never_tracebacks(line, value, delete):
    src = Path(load_robot("a1").source)
    lines = src.read_text().splitlines()
    i = line % len(lines)
    if delete:
        del lines[i]
    elif "=" in lines[i]:
        lines[i] = lines[i].split("=", 1)[0] + "= " + _toml(value)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "robot.toml"
        path.write_text("\n".join(lines) + "\n")
        try:
            load_robot(path)
        except TargetError as e:
            assert str(e)


# ------------------------------------------------------------------------------ 2. bad input


def _robot_with_urdf(tmp_path: Path, urdf_text: str) -> Path:
    src = Path(load_robot("spot").source)
    (tmp_path / "r.urdf").write_text(urdf_text)
    toml = src.read_text().replace('name = "spot"', 'name = "mine"').replace(
        'urdf = "spot.urdf"', 'urdf = "r.urdf"')
    assert 'urdf = "r.urdf"' in toml
    (tmp_path / "mine.toml").write_text(toml)
    return tmp_path / "mine.toml"


@pytest.mark.parametrize("urdf, message", [
    ("<robot name='x'><link name='a'>", "URDF"),
    ("<robot name='x'><link name='base'/></robot>", "no movable joints"),
])
def test_bad_urdf_is_one_clear_line(tiny_fat_ckpt, tmp_path, urdf, message):
    toml = _robot_with_urdf(tmp_path, urdf)
    with pytest.raises(TargetError, match=message):
        joint_descriptors(load_robot(toml))
    res = runner.invoke(app, ["eval", tiny_fat_ckpt, "--target", str(toml), "--episodes", "1"])
    assert res.exit_code == 2 and message in _out(res) and "Traceback" not in _out(res)


def test_inf_weights_refused(tmp_path, small_files):
    payload = torch.load(_write(tmp_path / "ok.pt", small_files[".pt"]), weights_only=True)
    payload["state_dict"]["ln_f.bias"][0] = float("inf")
    torch.save(payload, tmp_path / "inf.pt")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_checkpoint(tmp_path / "inf.pt")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_robot_of_a_task_the_policy_cannot_serve(tmp_path):
    model = FatPolicy(SMALL.model_copy(update={"global_dims": {"locomotion": 14}}))
    path = save_checkpoint(tmp_path / "loco_only.pt", model, _registry("a1"))
    for cmd in (["eval", str(path), "--target", "panda", "--episodes", "1"],
                ["build", str(path), "--target", "panda", "--out", str(tmp_path / "o"),
                 "--cache-dir", str(tmp_path / "c"), "--passes", "pin-embodiment"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2, _out(res)
        assert "reach" in _out(res) and "Traceback" not in _out(res)
    assert not (tmp_path / "o").exists()


def test_out_of_range_options_are_refused(tiny_fat_ckpt, tmp_path):
    for args, message in ((["--episodes", "0"], "--episodes"), (["--seed", "-1"], "--seed"),
                          (["--profile", "turbo"], "unknown profile 'turbo'")):
        res = runner.invoke(app, ["build", tiny_fat_ckpt, "--target", "a1", *args,
                                  "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
        assert res.exit_code == 2 and message in _out(res), _out(res)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ 5. the contract


def test_joint_order_mismatch_refused():
    robot = load_robot("a1")
    names = list(robot.joints.names)
    meta = {"robot": "a1", "joint_order": json.dumps(names[1:] + names[:1])}
    with pytest.raises(ContractError, match="joint order"):
        check_contract(meta, robot, Path("p.onnx"))
    check_contract({"robot": "a1", "joint_order": json.dumps(names)}, robot, Path("p.onnx"))


# ------------------------------------------------------------------------------ 6. large inputs


def test_200mb_checkpoint_is_held_once_in_memory(tmp_path):
    # Descriptor encoder 4 x 4096 wide: ~50 M parameters, ~200 MB on disk.
    torch.manual_seed(0)
    big = FatPolicy(SMALL.model_copy(update={"desc_hidden": 4096, "desc_layers": 4}))
    path = save_checkpoint(tmp_path / "big.pt", big, _registry("a1"))
    del big
    size = path.stat().st_size
    assert size > 190e6
    probe = (
        "import resource, sys, torch\n"
        "from xcompile.models.checkpoint import load_checkpoint\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "ck = load_checkpoint(sys.argv[1])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(after - before, sum(p.numel() for p in ck.model.parameters()))\n")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    grew, n_params = (int(x) for x in out.stdout.split())
    assert n_params * 4 > 0.95 * size
    # One copy of the weights (memory-mapped, then adopted by the model): a load that copies them
    # into freshly allocated parameters would grow by about twice the file.
    assert grew < 1.4 * size, f"peak memory grew {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


# ------------------------------------------------------------------------------ 3. interrupted


def _build_cmd(ckpt: str, target: str, out: Path, cache: Path, cfg: Path, passes: str
               ) -> list[str]:
    return [sys.executable, "-m", "xcompile", "build", ckpt, "--target", target, "--passes",
            passes, "--episodes", "1", "--config", str(cfg), "--out", str(out),
            "--cache-dir", str(cache)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_build_keeps_previous_output_and_resumes(tiny_fat_ckpt, short_toml, tmp_path,
                                                            sig):
    out, cache, cfg = tmp_path / "build" / "a1", tmp_path / "cache", tmp_path / "b.toml"
    cfg.write_text(LIGHT + "[pass.rl-finetune]\nenv_steps = 200000\n")
    out.mkdir(parents=True)
    # An earlier build (xcompile replaces only a folder that holds its own manifest).
    manifest = {"xcompile_version": "0.1.0", "outputs": {"policy.onnx": "0" * 64}}
    previous = {"policy.onnx": b"previous policy", "manifest.json": json.dumps(manifest).encode()}
    for name, data in previous.items():
        (out / name).write_bytes(data)

    proc = subprocess.Popen(_build_cmd(tiny_fat_ckpt, short_toml["a1"], out, cache, cfg,
                                       "pin-embodiment,rl-finetune,export-onnx"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # A suite started in the background (`cmd &` in a script) inherits
                            # SIGINT ignored, and Python then never raises KeyboardInterrupt.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list((cache / "tmp").glob("rl-finetune-*")):   # killed in the middle of a pass
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "rl-finetune never started"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode in ({signal.SIGINT: 130, signal.SIGTERM: 143}.get(sig, -sig),), err
    if sig != signal.SIGKILL:
        assert "interrupted" in err and "Traceback" not in err
        assert not list((cache / "tmp").iterdir())             # its partial work was removed
    # The previous output is untouched; nothing half-written beside it.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert [p.name for p in out.parent.iterdir()] == ["a1"]

    # The re-run resumes: the finished pass comes from the cache.
    res = subprocess.run([*_build_cmd(tiny_fat_ckpt, short_toml["a1"], out, cache, cfg,
                                      "pin-embodiment,export-onnx"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    stages = {s["name"]: s for s in json.loads(res.stdout)["stages"]}
    assert stages["pin-embodiment"]["cached"] and not stages["export-onnx"]["cached"]
    assert (out / "manifest.json").read_bytes() != previous["manifest.json"]


# ------------------------------------------------------------------------------ 4. reproducible


def test_build_from_manifest_is_byte_identical(tiny_fat_ckpt, tmp_path):
    ckpt = tmp_path / "fat.pt"
    shutil.copy(tiny_fat_ckpt, ckpt)
    cfg = tmp_path / "b.toml"
    cfg.write_text(LIGHT)
    first = tmp_path / "first"
    res = runner.invoke(app, ["build", str(ckpt), "--target", "a1", "--passes",
                              "pin-embodiment,export-onnx,quantize", "--episodes", "1",
                              "--seed", "3", "--config", str(cfg), "--out", str(first),
                              "--cache-dir", str(tmp_path / "c1")])
    assert res.exit_code == 0, _out(res)
    manifest = first / "manifest.json"

    # A fresh cache, so every pass really runs again.
    again = tmp_path / "again"
    # The checkpoint lies outside the manifest's folder: a manifest alone may not make
    # xcompile read it, so the command names it.
    res = runner.invoke(app, ["build", "--from", str(manifest), "--out", str(again),
                              "--cache-dir", str(tmp_path / "c2")])
    assert res.exit_code == 2 and "outside its folder" in _out(res)
    res = runner.invoke(app, ["build", str(ckpt), "--from", str(manifest), "--out", str(again),
                              "--cache-dir", str(tmp_path / "c2")])
    assert res.exit_code == 0, _out(res)
    assert "policy.onnx: identical" in _out(res)
    assert (again / "policy.onnx").read_bytes() == (first / "policy.onnx").read_bytes()
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (first, again))
    strip = ("latency_p50_us", "latency_p99_us", "wall_s", "cached")
    assert r1["plan"] == r2["plan"] and r1["seed"] == r2["seed"] == 3
    for s1, s2 in zip(r1["stages"], r2["stages"]):
        assert {k: v for k, v in s1.items() if k not in strip} == \
               {k: v for k, v in s2.items() if k not in strip}

    # --from fixes the build: options that would change it are refused...
    res = runner.invoke(app, ["build", "--from", str(manifest), "--target", "a1"])
    assert res.exit_code == 2 and "--target" in _out(res)
    # ...and so is an input that changed since.
    torch.manual_seed(5)
    save_checkpoint(ckpt, FatPolicy(load_checkpoint(ckpt).config), _registry("a1"))
    res = runner.invoke(app, ["build", str(ckpt), "--from", str(manifest), "--out",
                              str(tmp_path / "x"), "--cache-dir", str(tmp_path / "c2")])
    assert res.exit_code == 2 and "has changed since the build" in _out(res)
    assert not (tmp_path / "x").exists()
