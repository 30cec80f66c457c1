"""RAPTOR, a real foreign recurrent policy (PyPI `foundation-policy`), converted by
examples/raptor/convert.py: the ONNX model, run step by step with its GRU state carried (h_out fed
back as h_in) through `xcompile.onnx.session.ort_session`, reproduces the package's shipped example
(2 sequences x 500 steps) and its numpy reference on 5 seeded random sequences of 200 steps, each to
1e-5 (max abs); it loads through `read_onnx` (self-contained); the interface TOML and the metadata
say the same things; and bench/raptor.py runs (--quick).

Skipped when foundation-policy is not installed (it is in the `dev` extra).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("foundation_policy") is None:
    pytest.skip("foundation-policy (RAPTOR) is not installed: pip install foundation-policy, or "
                "the dev extra", allow_module_level=True)

from xcompile.onnx.model import get_metadata  # noqa: E402
from xcompile.onnx.session import ort_session, read_onnx  # noqa: E402
from xcompile.targets.loader import tomllib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "raptor"
TOL = 1e-5


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"raptor_{name}", EXAMPLE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rollout = _module("rollout")


@pytest.fixture(scope="module")
def converted(raptor_dir) -> Path:
    return raptor_dir


def test_reproduces_the_packages_shipped_example(converted):
    x, y = rollout.example_sequences()
    assert x.shape == (500, 2, 22) and y.shape == (500, 2, 4)
    actions, _ = rollout.onnx_rollout(ort_session(converted / "raptor.onnx"), x)
    err = float(np.abs(actions - y).max())
    assert err <= TOL, f"max |action - shipped| over 2 x 500 steps = {err:.3g}"


def test_agrees_with_the_packages_reference_on_random_sequences(converted):
    seqs = rollout.random_sequences(5, 200, seed=0)
    sess = ort_session(converted / "raptor.onnx")
    actions, _ = rollout.onnx_rollout(sess, seqs)
    ref = rollout.reference_rollout(seqs)
    err = float(np.abs(actions - ref).max())
    assert err <= TOL, f"max |action - reference| over 5 x 200 steps = {err:.3g}"
    # Batch 1, one sequence on its own: the batch dimension is dynamic and rows do not mix.
    one, _ = rollout.onnx_rollout(sess, seqs[:, 3:4])
    assert float(np.abs(one - ref[:, 3:4]).max()) <= TOL
    # The state matters: without carrying it (reset every step) the actions differ.
    fresh = np.stack([sess.run(["action"], {"obs": seqs[t], "h_in": np.zeros((5, 16), np.float32)})
                      [0] for t in range(20)])
    assert float(np.abs(fresh[1:] - ref[1:20]).max()) > 1e-2


def test_loads_self_contained_with_its_interface(converted):
    model = read_onnx(converted / "raptor.onnx")        # refuses external data
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
           for i in model.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in model.graph.output}
    assert ins == {"obs": ["batch", 22], "h_in": ["batch", 16]}
    assert outs == {"action": ["batch", 4], "h_out": ["batch", 16]}
    assert not any(n.op_type in ("GRU", "Loop", "Scan") for n in model.graph.node)

    meta = get_metadata(model)
    from importlib import metadata

    ckpt = rollout.package_checkpoint()
    assert meta["source_checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["source_package_version"] == metadata.version("foundation-policy")
    assert json.loads(meta["obs_layout"]) == [["position", 3], ["rotation_matrix", 9],
                                              ["linear_velocity", 3], ["angular_velocity", 3],
                                              ["previous_action", 4]]
    assert json.loads(meta["action_order"]) == ["front_right", "back_right", "back_left",
                                                "front_left"]
    assert json.loads(meta["action_range"]) == [-1.0, 1.0]
    assert float(meta["control_period_s"]) == 0.01 and meta["family"] == "quadrotor"
    recurrent = json.loads(meta["recurrent_state"])        # the runtime loader's form
    assert recurrent["states"] == [{"input": "h_in", "output": "h_out", "shape": [16],
                                    "dtype": "float32", "reset": "zeros"}]
    assert "at the start of every episode" in recurrent["rule"]
    assert int(meta["source_params"]) == 2084

    iface = tomllib.loads((converted / "raptor.toml").read_text())
    assert iface["format"] == "xcompile-interface/1"
    assert (iface["observation"], iface["action"], iface["family"]) == ("obs", "action",
                                                                        "quadrotor")
    assert [[e["name"], e["size"]] for e in iface["obs_layout"]] == json.loads(meta["obs_layout"])
    assert iface["action_spec"]["order"] == json.loads(meta["action_order"])
    assert iface["recurrent"]["state"] == [{"input": "h_in", "output": "h_out", "shape": [16],
                                            "dtype": "float32", "reset": "zeros"}]
    assert iface["source"]["sha256"] == meta["source_checkpoint_sha256"]
    assert iface["control_period_s"] == 0.01


def test_converter_refuses_a_file_that_is_not_a_raptor_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint.h5"
    bad.write_bytes(b"not hdf5")
    proc = subprocess.run([sys.executable, str(EXAMPLE / "convert.py"), str(tmp_path / "out"),
                           "--checkpoint", str(bad)], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_bench_quick(tmp_path):
    out = tmp_path / "raptor.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "raptor.py"), "--quick",
                           "--out", str(out), "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["script"] == "raptor" and doc["quick"] is True
    assert doc["markdown"].strip() in proc.stdout
    rows = {r["key"]: r for r in doc["results"]["rows"]}
    assert {"fp32", "int8-weight-only", "fp16"} <= set(rows)
    assert rows["fp32"]["max_err_example"] <= TOL and rows["fp32"]["max_err_random"] <= TOL
    assert rows["int8-weight-only"]["bytes"] < rows["fp16"]["bytes"] < rows["fp32"]["bytes"]
    for r in rows.values():
        assert 0 < r["p50_us"] <= r["p99_us"]
        assert r["max_err_example"] < 0.5 and r["max_err_random"] < 0.5
