"""The two longest benchmark scripts, end to end (--quick): build_cost.py (every pass of the default
plan, two fat sizes) and foreign.py (a foreign fat graph through the default plan, and a recurrent
teacher's students). Marked slow (3 min each on 2 cores), so left out of the default run:
`python -m pytest -m slow` runs them. What they check is test_bench.py's kind of check; the
passes they drive have their own tests (test_frontends.py, test_recurrent_distill.py).
"""

from __future__ import annotations

import pytest
from bench_scripts import HAVE_STUDENT, run_script


@pytest.mark.slow
def test_build_cost(bench_work, tmp_path):
    doc = run_script("build_cost", None, bench_work, tmp_path / "bc.json")
    rows = doc["results"]["rows"]
    plan = doc["results"]["plan"]
    assert plan[0] == "pin-embodiment" and plan[-1] == "quantize"
    assert {(r["bodies"], r["pass"]) for r in rows} == {(b, p) for b in (2, 8) for p in plan}
    for r in rows:
        assert "error" not in r, r
        assert r["wall_s"] > 0 and not r["cached"]
        assert r["rss_peak_mb"] >= r["rss_before_mb"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_STUDENT, reason="needs the distill pass (a slim student)")
def test_foreign(competent_fat_ckpt, bench_work, tmp_path):
    """The sample-style policy as a foreign graph through the default plan, and one build per
    student of a recurrent teacher (tiny distill budgets: plumbing, not the numbers)."""
    doc = run_script("foreign", competent_fat_ckpt, bench_work, tmp_path / "f.json",
                     "--episodes", "1")
    res = doc["results"]
    stages = [s["name"] for s in res["part1"]["a1"]["stages"]]
    assert stages == ["fat", "pin-embodiment", "rl-finetune", "distill", "export-onnx",
                      "quantize", "build-tensorrt"], stages
    fat, pinned = res["part1"]["a1"]["stages"][:2]
    assert pinned["score"] == fat["score"] > 0 and pinned["params"] < fat["params"]
    for kind in ("mlp", "history_mlp", "gru"):
        st = {s["name"]: s for s in res["part2"][kind]["stages"]}
        assert st["distill"]["checks"]["student"] == kind
        assert st["fat"]["format"] == "fat-graph" and st["quantize"]["score"] is not None
    assert len(res["native"]["scores"]) == len(res["teacher_minus_native"]) == 1
