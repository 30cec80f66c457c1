"""Hostile inputs against what xcompile writes: output folders, reproducers, manifests, the cache.

Each test states one promise of the README's "Safety" paragraph and tries to break it the way a
careless or hostile user would. Builds here use a fake pass and a fake measurement, so the tests
exercise the file handling, not torch or PyBullet.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xcompile import integrity, outdir
from xcompile.artifact import Artifact, file_sha256
from xcompile.build import as_targets, input_artifact, run_build
from xcompile.cli import app
from xcompile.errors import PlanError, XCompileError
from xcompile.manager import manifest
from xcompile.manager.reproducer import load_reproducer, reproducer_dir, write_reproducer
from xcompile.manager.settings import DEFAULTS, PlanStep, file_layer, make_config, resolve_settings
from xcompile.outdir import OutputError
from xcompile.passes.base import REGISTRY, Pass, PassConfig, PassResult, all_passes, register_pass
from xcompile.report import Gates
from xcompile.targets.loader import ROBOTS_DIR

runner = CliRunner()


def _out(res) -> str:
    return " ".join((res.output + (getattr(res, "stderr", "") or "")).split())


def _clean_exit(res, code: int = 2) -> str:
    """A refusal: the given exit code, a message, and no traceback."""
    assert res.exit_code == code, _out(res)
    assert isinstance(res.exception, SystemExit), res.exception
    return _out(res)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


class HPin(Pass):
    """Fake pin: copies the checkpoint's bytes (no torch)."""

    name = "h-pin"
    input_format = "fat-checkpoint"
    output_format = "torch"
    summary = "test pass"

    def run(self, art: Artifact, cfg: PassConfig, ctx) -> PassResult:
        out = ctx.workdir / "policy.pt"
        out.write_bytes(art.path.read_bytes() + b"|pinned")
        return PassResult(Artifact.create("torch", out, art.robot, lineage=("h-pin",)))

    def check(self, inp, result, cfg, ctx):
        return {"grew_bytes": result.artifact.n_bytes - inp.n_bytes}


MEASURED: list[str] = []


def fake_measure(art, robot, episodes, seed, latency_n=2000):
    MEASURED.append(art.id)
    return {"format": art.format, "params": 10, "bytes": art.n_bytes, "macs": 100,
            "latency_p50_us": 20.0, "latency_p99_us": 30.0, "runtime": "fake",
            "score": 0.8, "score_std": 0.0, "episodes": episodes}


@pytest.fixture(autouse=True)
def fake_pass():
    all_passes()
    register_pass(HPin)
    MEASURED.clear()
    yield
    REGISTRY.pop("h-pin", None)


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    p = tmp_path / "in" / "fat.pt"
    p.parent.mkdir()
    p.write_bytes(b"not really a checkpoint, the fake pass only copies it")
    return p


def build(ckpt: Path, out: Path, cache: Path, **kw):
    plan = [PlanStep("h-pin", make_config("h-pin"))]
    return run_build(ckpt, "a1", None, plan, out, cache, measure=fake_measure,
                             runtime_floor=lambda: 1.0, rollout=False, **kw)


# ------------------------------------------------------------------------ 1. output folders


def test_a_folder_xcompile_did_not_write_is_never_replaced(ckpt, tmp_path):
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (user / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    for force in (False, True):
        with pytest.raises(OutputError, match="does not hold an xcompile build"):
            build(ckpt, user, tmp_path / "cache", force=force)
    assert MEASURED == []                               # refused before any work
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("cache")} == before


def test_a_previous_build_is_replaced_extra_files_need_force(ckpt, tmp_path):
    out, cache = tmp_path / "build" / "a1", tmp_path / "cache"
    build(ckpt, out, cache)
    first = _snapshot(out)
    assert "manifest.json" in first
    build(ckpt, out, cache)                             # a plain rebuild replaces it
    assert set(_snapshot(out)) == set(first)

    (out / "my-notes.md").write_text("keep me")
    with pytest.raises(OutputError, match="my-notes.md") as e:
        build(ckpt, out, cache)
    assert "--force" in str(e.value)
    assert (out / "my-notes.md").read_text() == "keep me"
    build(ckpt, out, cache, force=True)                 # asked for: replaced
    assert not (out / "my-notes.md").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["a1"]   # nothing left beside it


def test_out_dot_home_root_file_and_symlink_are_refused(ckpt, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    a_file = tmp_path / "a-file"
    a_file.write_text("data")
    link = tmp_path / "link"
    link.symlink_to(home)
    before = _snapshot(tmp_path)
    for out, msg in ((".", "current folder"), ("..", "current folder"), ("/", "current folder"),
                     (str(home), "does not hold an xcompile build"),
                     (str(a_file), "not a folder"), (str(link), "symbolic link")):
        res = runner.invoke(app, ["build", str(ckpt), "--target", "a1", "--passes", "h-pin",
                                  "--out", out, "--cache-dir", str(tmp_path / "cache")])
        assert msg in _clean_exit(res), out
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("cache")} == before
    assert MEASURED == []


def test_robot_names_are_never_paths(ckpt, tmp_path, monkeypatch):
    """A stranger's robot TOML cannot steer the default output folder (build/<name>)."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("precious")
    base = (Path(ROBOTS_DIR) / "a1.toml").read_text()
    assert 'urdf = "pybullet_data:' in base             # the copy below still finds its URDF
    for name in ("../victim", str(victim), "a/b", "..", "x" * 300):
        toml = tmp_path / "evil.toml"
        toml.write_text("\n".join(f"name = {json.dumps(name)}" if ln.startswith("name =")
                                   else ln for ln in base.splitlines()))
        res = runner.invoke(app, ["build", str(ckpt), "--target", str(toml), "--passes",
                                  "h-pin", "--cache-dir", str(tmp_path / "cache")])
        assert "name" in _clean_exit(res)
    assert (victim / "data").read_text() == "precious"
    assert not (tmp_path / "build").exists()


def test_a_full_disk_leaves_the_previous_output_and_no_temporary_folder(ckpt, tmp_path,
                                                                           monkeypatch):
    out, cache = tmp_path / "build" / "a1", tmp_path / "cache"
    build(ckpt, out, cache)
    before = _snapshot(out)
    from xcompile import build as build_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_mod, "write_outputs", full)
    with pytest.raises(OutputError, match="intact.*No space left on device"):
        build(ckpt, out, cache)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["a1"]


def test_unwritable_cache_is_one_message(ckpt, tmp_path):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cache folder .* cannot be written"):
        build(ckpt, tmp_path / "out", blocker)
    res = runner.invoke(app, ["build", str(ckpt), "--target", "a1", "--passes", "h-pin",
                              "--out", str(tmp_path / "o"), "--cache-dir", str(blocker)])
    assert "--cache-dir" in _clean_exit(res)


def test_second_interrupt_cannot_cut_a_cleanup_short(tmp_path):
    folder = tmp_path / "t"
    for i in range(200):
        (folder / str(i)).mkdir(parents=True)
        (folder / str(i) / "f").write_text("x")
    got = []
    # Python's own Ctrl-C handler, whatever the test runner inherited (a background job of a
    # non-interactive shell starts with SIGINT ignored, and ignored stays ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with outdir.signals_held():
            os.kill(os.getpid(), signal.SIGINT)         # arrives during the cleanup...
            shutil.rmtree(folder)
            got.append("cleanup finished")
    except KeyboardInterrupt:
        got.append("interrupted after")                 # ...and is delivered once it is done
    finally:
        signal.signal(signal.SIGINT, previous)
    assert got == ["cleanup finished", "interrupted after"] and not folder.exists()


# ------------------------------------------------------------------------ 2. gates and settings


@pytest.mark.parametrize("flag,value", [("--min-score-ratio", "-1"), ("--min-score-ratio", "nan"),
                                        ("--min-score-ratio", "inf"), ("--max-latency-us", "0"),
                                        ("--max-latency-us", "nan"), ("--max-size-kb", "-5"),
                                        ("--max-size-kb", "inf")])
def test_gates_that_cannot_fail_are_refused(ckpt, tmp_path, flag, value):
    res = runner.invoke(app, ["build", str(ckpt), "--target", "a1", "--passes", "h-pin",
                              "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
                              flag, value])
    assert flag in _clean_exit(res)
    assert MEASURED == [] and not (tmp_path / "o").exists()


def test_options_for_a_pass_not_in_the_plan(tmp_path):
    with pytest.raises(PlanError, match="not in the plan"):
        resolve_settings(DEFAULTS, file_layer(
            {"passes": ["pin-embodiment"], "pass": {"distill": {"rounds": 2}}}), {})
    s = resolve_settings(DEFAULTS, file_layer(
        {"pass": {"distill": {"rounds": 2}}}), {"passes": ["pin-embodiment"]})
    assert any("distill" in n and "unused" in n for n in s.notes)


# ------------------------------------------------------------------------ 3. reproducers


def _reproducer(repro: Path, ckpt: Path) -> Path:
    step = PlanStep("h-pin", make_config("h-pin"))
    robot, hw = as_targets("a1", None)
    art = input_artifact(ckpt, robot)
    return write_reproducer(repro, RuntimeError("x"), step, [step], art, robot, hw, 0,
                                     "fast")


def test_reproducer_refers_only_to_its_own_files(ckpt, tmp_path):
    repro = _reproducer(tmp_path / "a1.repro", ckpt)
    art, _ = load_reproducer(repro)
    assert art.path.is_relative_to(repro)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"secret")
    doc = json.loads((repro / "artifact.json").read_text())
    for path in (str(secret), "../secret.bin", "input/../../secret.bin", "input"):
        (repro / "artifact.json").write_text(json.dumps({**doc, "path": path}))
        with pytest.raises(PlanError, match="not a file inside the reproducer folder"):
            load_reproducer(repro)
    (repro / "artifact.json").write_text(json.dumps(doc))
    (repro / "input" / ckpt.name).write_bytes(b"swapped after the reproducer was written")
    with pytest.raises(PlanError, match="does not match the sha256"):
        load_reproducer(repro)
    for bad in ("[]", '{"path": 3}', '{"format": "exe", "path": "x", "robot": "a1", '
                '"sha256": "0"}', "not json"):
        (repro / "artifact.json").write_text(bad)
        with pytest.raises(PlanError):
            load_reproducer(repro)


def test_a_failing_build_never_replaces_a_user_folder_named_like_a_reproducer(ckpt, tmp_path):
    users = tmp_path / "a1.repro"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    assert reproducer_dir(tmp_path / "a1") == tmp_path / "a1.repro-2"
    with pytest.raises(OutputError):
        write_reproducer(users, RuntimeError("x"), *([None] * 7))
    assert _snapshot(users) == {"thesis.tex": b"years of work"}
    earlier = _reproducer(tmp_path / "b1.repro", ckpt)  # an earlier reproducer is replaceable
    assert reproducer_dir(tmp_path / "b1") == earlier
    assert _reproducer(earlier, ckpt) == earlier


# ------------------------------------------------------------------------ 4. manifests


@pytest.fixture()
def built(ckpt, tmp_path) -> Path:
    out = tmp_path / "build" / "a1"
    build(ckpt, out, tmp_path / "cache")
    return out / "manifest.json"


def test_manifest_may_not_point_outside_its_folder(built, ckpt, tmp_path, monkeypatch):
    read: list[Path] = []
    real = manifest.file_sha256
    monkeypatch.setattr(manifest, "file_sha256", lambda p: (read.append(Path(p)), real(p))[1])
    with pytest.raises(PlanError, match="outside its folder.*CHECKPOINT"):
        manifest.rebuild_from_manifest(built)           # the checkpoint lies in tmp/in/
    doc = json.loads(built.read_text())
    doc["inputs"]["checkpoint"]["path"] = "/etc/passwd"
    built.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="outside its folder"):
        manifest.rebuild_from_manifest(built)
    assert read == []                                   # neither file was read
    with pytest.raises(PlanError, match="has changed"):  # a file given is checked by hash
        manifest.rebuild_from_manifest(built, built)
    rb = manifest.rebuild_from_manifest(built, ckpt)
    assert rb.checkpoint == ckpt and Path("/etc/passwd") not in read


@pytest.mark.parametrize("edit", [
    lambda d: d.pop("plan"), lambda d: d.update(episodes=0), lambda d: d.update(episodes="10"),
    lambda d: d.update(seed=-1), lambda d: d.update(profile="turbo"),
    lambda d: d.update(plan="h-pin"), lambda d: d.update(plan=[{"name": "h-pin"}]),
    lambda d: d.update(robot="../../etc"), lambda d: d.update(inputs={"checkpoint": "x"}),
    lambda d: d["inputs"]["checkpoint"].update(sha256="abc"), lambda d: d.clear(),
    lambda d: d.update(plan=[{"name": "no-such-pass", "version": 1}]),
])
def test_malformed_manifests_are_one_message(built, ckpt, tmp_path, edit):
    doc = json.loads(built.read_text())
    edit(doc)
    built.write_text(json.dumps(doc))
    res = runner.invoke(app, ["build", str(ckpt), "--from", str(built), "--out",
                              str(tmp_path / "again"), "--cache-dir", str(tmp_path / "c")])
    _clean_exit(res)
    assert not (tmp_path / "again").exists()


def test_manifest_that_is_not_json_or_a_folder(tmp_path):
    for content in ("[1, 2]", "{", "\x00\x01"):
        m = tmp_path / "manifest.json"
        m.write_text(content)
        _clean_exit(runner.invoke(app, ["build", "--from", str(m)]))
    _clean_exit(runner.invoke(app, ["build", "--from", str(tmp_path)]))


# ------------------------------------------------------------------------ 5. the cache


def test_tampered_measurements_are_discarded_and_noted(ckpt, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    build(ckpt, out, cache)
    n = len(MEASURED)
    res = build(ckpt, out, cache)
    assert len(MEASURED) == n and all(s.cached for s in res.stages[1:])   # trusted: reused
    for rec in (cache / "measure").glob("*.json"):      # make the latency gate pass
        doc = json.loads(rec.read_text())
        doc["measurements"]["latency_p99_us"] = 0.001
        rec.write_text(json.dumps(doc))
    res = build(ckpt, out, cache, gates=Gates(max_latency_us=1.0))
    assert len(MEASURED) == n + 2                       # both stages measured again
    assert res.stages[-1].measurements["latency_p99_us"] == 30.0
    assert res.missed_gates
    assert sum("discarded" in note for note in res.report["notes"]) == 2


def test_tampered_or_unsigned_pass_entries_are_rerun(ckpt, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = build(ckpt, out, cache)
    entry = cache / res.stages[1].cache_key
    # Swap in another policy and fix up the recorded hash: without the key it cannot be signed.
    (entry / "policy.pt").write_bytes(b"a poisoned policy")
    doc = json.loads((entry / "result.json").read_text())
    doc["artifact"]["sha256"] = file_sha256(entry / "policy.pt")
    doc.pop(integrity.SIG_KEY)
    (entry / "result.json").write_text(json.dumps(doc))
    res = build(ckpt, out, cache)
    assert not res.stages[1].cached
    assert b"poisoned" not in (out / "policy.pt").read_bytes()
    assert any("discarded" in n for n in res.report["notes"])
    (entry / "result.json").write_text("garbage")
    assert not build(ckpt, out, cache).stages[1].cached


def test_orphans_of_killed_runs_are_removed(ckpt, tmp_path):
    cache = tmp_path / "cache"
    (cache / "tmp").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    orphan = cache / "tmp" / f"rl-finetune-{dead}-abcd1234"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / "big.bin").write_bytes(b"x" * 1000)
    live = cache / "tmp" / f"distill-{os.getpid()}-abcd1234"    # a running build's: kept
    live.mkdir()
    other = cache / "tmp" / "not-ours"
    other.mkdir()
    beside = tmp_path / f".out.new-{dead}-zz99yy88"
    beside.mkdir()
    build(ckpt, tmp_path / "out", cache)
    assert not orphan.exists() and live.exists() and other.exists() and not beside.exists()


def test_eval_gif_folder_checked_before_any_work(tiny_fat_ckpt, tmp_path):
    t0 = time.perf_counter()
    res = runner.invoke(app, ["eval", tiny_fat_ckpt, "--target", "a1", "--episodes", "200",
                              "--gif", str(tmp_path / "missing" / "x.gif")])
    assert "does not exist" in _clean_exit(res)
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("content", ["{}", "[]", '{"robot": "a1", "stages": "x"}', "nan",
                                     '{"robot": "a1", "hardware": "cpu", "plan": [], "stages": '
                                     '[{"name": "fat"}], "notes": [], "gates": [{}], "final": {}}'])
def test_report_of_a_foreign_folder_is_one_message(tmp_path, content):
    (tmp_path / "report.json").write_text(content)
    assert "not" in _clean_exit(runner.invoke(app, ["report", str(tmp_path)]))


def test_errors_are_xcompile_errors():
    assert issubclass(OutputError, XCompileError)
