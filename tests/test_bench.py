"""The benchmark scripts run end to end (--quick, on the tiny checkpoint; quality.py on the competent
one, whose scores are not 0) and their JSON means what their tables say: sizes shrink where they
should, timings are ordered, scores are scores.

The scripts share one work folder, so later ones reuse the builds of earlier ones (as they do for a
user); inference.py runs first and builds the most. The two longest (build_cost, foreign) are in
test_bench_builds.py, so that they run on another test worker.
"""

from __future__ import annotations

import pytest
from bench_scripts import HAVE_STUDENT, REPO, run_script


def test_inference(tiny_fat_ckpt, bench_work, tmp_path):
    doc = run_script("inference", tiny_fat_ckpt, bench_work, tmp_path / "inf.json")
    (res,) = doc["results"]
    rows = {r["key"]: r for r in res["rows"]}
    assert {"fat", "pinned", "generic-fp32", "generic-int8"} <= set(rows)
    assert rows["generic-int8"]["bytes"] < rows["generic-fp32"]["bytes"]
    assert res["ort_floor_us"]["p50_us"] > 0
    for r in rows.values():
        assert 0 < r["p50_us"] <= r["p99_us"]
        assert r["b64_rows_per_s"] > 0 and r["calls"] >= 300
    assert rows["fat"]["speedup_vs_fat"] == pytest.approx(1.0)
    # ONNX Runtime cannot beat its own empty graph.
    assert rows["generic-fp32"]["x_floor"] > 1.0
    if HAVE_STUDENT:
        assert {"student", "slim-fp32", "slim-int8", "slim-fp16"} <= set(rows)
        assert rows["slim-int8"]["bytes"] < rows["slim-fp16"]["bytes"] < rows["slim-fp32"]["bytes"]
    else:
        assert any("distill" in n for n in doc["notes"])
    import torch

    if not torch.cuda.is_available():
        assert "GPU section skipped" in res["gpu"]["skipped"]


def test_runtime_floor(tiny_fat_ckpt, bench_work, tmp_path):
    doc = run_script("runtime_floor", tiny_fat_ckpt, bench_work, tmp_path / "rf.json")
    rates = doc["results"]["rates"]
    assert rates["peak_mac_per_s"] > rates["matvec_mac_per_s"] > 0
    (res,) = doc["results"]["robots"]
    rows = {r["key"]: r for r in res["rows"]}
    for r in rows.values():
        assert r["macs"] > 0 and r["arith_floor_peak_us"] < r["p50_us"]
        assert sum(r["shares"].values()) >= 0.999
    assert rows["pinned"]["macs"] < rows["fat"]["macs"]       # pinning folds the descriptor work
    assert rows["generic-fp32"]["macs"] == rows["pinned"]["macs"]
    assert res["crossover_macs_peak_rate"] > 0


def test_latency_scaling(tiny_fat_ckpt, bench_work, tmp_path):
    doc = run_script("latency_scaling", tiny_fat_ckpt, bench_work, tmp_path / "ls.json")
    (res,) = doc["results"]["robots"]
    sample, tiny = res["rows"]
    assert sample["fat"] == "sample checkpoint" and tiny["fat"] == "tiny, random weights"
    assert sample["slim_p50_us"] == tiny["slim_p50_us"]     # one student, timed once
    assert all(r["pinned_params"] < r["fat_params"] for r in res["rows"])
    assert all(r["speedup"] > 0 and r["slim_p50_us"] > 0 for r in res["rows"])
    assert res["ort_floor_us"]["p50_us"] > 0


def test_quality(competent_fat_ckpt, bench_work, tmp_path):
    # On the competent fixture (a1 walks, scores ~1), where the tiny random one scores 0 and the
    # comparison of scores below could not fail. (tests/test_fidelity.py shows, on the same
    # fixture, that each such comparison fails against a sabotaged policy.)
    doc = run_script("quality", competent_fat_ckpt, bench_work, tmp_path / "q.json")
    (res,) = doc["results"]
    assert res["error"] is None
    scores = res["scores"]
    for k in ("fat", "pinned", "int8"):
        assert 0.0 <= scores[k] <= 1.0
    # Pinning is exact: same episodes, same non-trivial score (to float rounding of the rollout),
    # and per episode.
    assert scores["fat"] > 0.5
    assert scores["pinned"] == pytest.approx(scores["fat"], abs=0.02)
    assert res["stages"]["pinned"]["scores"] == pytest.approx(res["stages"]["fat"]["scores"],
                                                              abs=0.02)
    assert res["compression"] > 1.0
    assert all(s["latency_p50_us"] > 0 for s in res["stages"].values())


def test_robustness(competent_fat_ckpt, bench_work, tmp_path):
    doc = run_script("robustness", competent_fat_ckpt, bench_work, tmp_path / "r.json")
    (res,) = doc["results"]
    cells = {c["fault"]: c for c in res["faults"]}
    assert len(cells) == 6 and all(c["applies"] for c in cells.values())   # a1 is free-base
    assert cells["none (nominal)"]["fat"] > 0.3                   # a policy that walks
    assert cells["delay"]["faults"]["action_delay_steps"] == 1
    assert cells["payload"]["faults"]["payload_share"] == 0.25
    assert cells["weak-leg"]["faults"]["weak_joints"] == [0, 1, 2]
    assert cells["locked-joint"]["faults"]["locked_joint"] == 2
    for c in cells.values():
        assert 0.0 <= c["fat"] <= 1.0 and 0.0 <= c["final"] <= 1.0
        assert len(c["final_scores"]) == len(c["fat_scores"]) == 2
    assert res["final_over_fat_under_faults"] > 0 and res["final_over_fat_under_faults_ci95"]


@pytest.mark.skipif(not HAVE_STUDENT, reason="needs the distill pass (a slim student)")
def test_c_backend(tiny_fat_ckpt, bench_work, tmp_path):
    doc = run_script("c_backend", tiny_fat_ckpt, bench_work, tmp_path / "c.json", "--no-cross")
    (res,) = doc["results"]
    assert res["check_obs"] >= 2000 and res["max_abs_err"] <= 1e-5
    # The same episodes in C and in onnxruntime: the same scores, so the paired difference is 0.
    assert res["scores"]["c"] == pytest.approx(res["scores"]["onnxruntime"], abs=1e-4)
    assert res["diff_c_minus_ort"] == pytest.approx(0.0, abs=1e-4)
    lat = res["latency"]
    for k in ("c_harness", "c_harness_portable", "c_ctypes", "onnxruntime", "torch"):
        assert 0 < lat[k]["p50_us"] <= lat[k]["p99_us"] <= lat[k]["max_us"], k
    assert res["host_object"]["text"] > res["weight_bytes"] > 0 and res["host_stack_bytes"] > 0
    assert all(la["op"] == "dense" for la in res["layers"])


def test_headroom(competent_fat_ckpt, bench_work, tmp_path):
    """Each probe is the pinned policy with one slice of its observation (or its action) scaled,
    paired with the pinned policy on the same episodes."""
    import sys

    import numpy as np

    sys.path.insert(0, str(REPO / "bench"))
    from headroom import candidates

    from xcompile.sim.tasks import obs_dim
    from xcompile.targets import load_robot

    robot = load_robot("a1")
    cands = candidates(robot)
    scaled = {what for what, _, (g, _) in cands if g is not None}
    assert "cmd_vx_vy_yaw (gain search)" in scaled and "qdot_x0.1" in scaled
    assert "gait_sin_cos" not in scaled
    for what, s, (g, out) in cands:
        if g is None:
            assert what == "action (output)" and out == s
        else:
            assert g.shape == (obs_dim(robot),) and out == 1.0
            assert 1 <= int(np.sum(g == np.float32(s))) < obs_dim(robot)   # one slice only
    doc = run_script("headroom", competent_fat_ckpt, bench_work, tmp_path / "h.json")
    (res,) = doc["results"]
    assert len(res["probes"]) == 2 and 0.0 < res["pinned"] <= 1.0
    for p in res["probes"]:
        lo, hi = p["minus_pinned_ci95"]
        assert lo <= p["minus_pinned"] <= hi
        assert abs(p["score"] - res["pinned"] - p["minus_pinned"]) < 1e-3   # diff_ci95 rounds


def test_build_time(tiny_fat_ckpt, bench_work, tmp_path):
    """A user's build timed per stage: a thin plan on a1 with 2 s episodes (a robot TOML)."""
    toml = (REPO / "xcompile" / "targets" / "robots" / "a1.toml").read_text()
    robot = tmp_path / "a1.toml"
    robot.write_text(toml.replace("episode_s = 12.0", "episode_s = 2.0"))
    doc = run_script("build_time", tiny_fat_ckpt, bench_work, tmp_path / "bt.json", "--robots",
                     str(robot), "--passes", "pin-embodiment,export-onnx", "--workers", "2")
    (res,) = doc["results"]
    stages = [s["name"] for s in res["stages"]]
    assert stages == ["fat", "pin-embodiment", "export-onnx"]
    assert all(s["wall_s"] > 0 for s in res["stages"])
    assert res["wall_s"] >= sum(s["wall_s"] for s in res["stages"])
    assert res["within_budget"] and not doc["notes"]
