"""Does body-specific fine-tuning pay, and does the slim policy keep it? Paired differences.

Reads a default-profile quality run (`bench/quality.py --profile default`, its JSON) and gives,
per robot, on the report episodes every stage of that run scored (the same episodes for every
stage):

- tuned - pinned and int8 - pinned: paired differences with bootstrap 95% intervals
  (`xcompile.stats.diff_ci95`); "pays" when the interval is above 0;
- int8 / tuned: the paired ratio and its interval (what distillation and quantization kept);
- what rl-finetune and distill's gain searches kept (the guard's decision, the gains);
- the seconds of the passes that train (rl-finetune, distill: their own time, without the
  report's measurements) and of the whole stage list as the bench recorded it.

No simulation here: it re-reads per-episode scores, so it runs in a second.

    python bench/finetune.py                       # reads bench/results/quality-default.json
    python bench/finetune.py --source other.json --out bench/results/finetune-other.json
    python bench/finetune.py --source all.json arms.json   # arms.json's robots replace all.json's
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import common

from xcompile.stats import diff_ci95, ratio_ci95


def _diff(a: list[float] | None, b: list[float] | None) -> tuple[float | None, list | None]:
    if not a or not b:
        return None, None
    return diff_ci95(a, b)


def _fmt_diff(d: float | None, ci: list[float] | None) -> str:
    if d is None or ci is None:
        return "n/a"
    mark = " **pays**" if ci[0] > 0 else (" lower" if ci[1] < 0 else "")
    return f"{d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]{mark}"


def robot_row(res: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    st = res["stages"]
    sc = {k: (st[k] or {}).get("scores") for k in ("pinned", "tuned", "student", "int8")}
    tuned_d = _diff(sc["tuned"], sc["pinned"])
    int8_d = _diff(sc["int8"], sc["pinned"])
    keep = ratio_ci95(sc["int8"], sc["tuned"]) if sc["int8"] and sc["tuned"] else (None, None)
    rl = (st.get("tuned") or {}).get("checks", {})
    di = (st.get("student") or {}).get("checks", {})
    walls = res.get("wall_s") or {}
    out = {"robot": res["robot"], "pinned": st["pinned"]["score"], "tuned": st["tuned"]["score"],
           "int8": st["int8"]["score"], "tuned_minus_pinned": tuned_d[0],
           "tuned_minus_pinned_ci95": tuned_d[1], "int8_minus_pinned": int8_d[0],
           "int8_minus_pinned_ci95": int8_d[1], "int8_over_tuned": keep[0],
           "int8_over_tuned_ci95": keep[1], "rl_kept": rl.get("kept"), "rl_gains": rl.get("gains"),
           "student_gains_kept": di.get("gains_kept"), "rl_finetune_s": rl.get("wall_s"),
           "distill_s": di.get("wall_s"), "stages_s": walls}
    ratio = ("n/a" if keep[0] is None else f"{keep[0]:.3f}"
             + (f" [{keep[1][0]:.3f}, {keep[1][1]:.3f}]" if keep[1] else ""))
    gains = ", ".join(f"{g:.2f}" for g in rl["gains"]) if rl.get("gains") else "–"
    row = [res["robot"], f"{out['pinned']:.3f}", f"{out['tuned']:.3f}", f"{out['int8']:.3f}",
           _fmt_diff(*tuned_d), _fmt_diff(*int8_d), ratio,
           f"{rl.get('kept', '–')} ({gains})",
           {True: "kept", False: "not kept", None: "–"}[di.get("gains_kept")],
           common.fmt(rl.get("wall_s"), ".0f"), common.fmt(di.get("wall_s"), ".0f")]
    return out, row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", nargs="+",
                    default=[str(common.REPO / "bench/results/quality-default.json")],
                    help="quality.py --profile default results files; a robot in a later file "
                    "replaces the same robot of an earlier one (a re-run of some robots)")
    ap.add_argument("--out", default=str(common.REPO / "bench/results/finetune.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    srcs = [json.loads(Path(f).read_text()) for f in args.source]
    src, by_robot, origin = srcs[0], {}, {}
    for f, doc in zip(args.source, srcs):
        for res in doc["results"]:
            by_robot[res["robot"]], origin[res["robot"]] = res, f
    results, rows = [], []
    for res in by_robot.values():
        if res.get("error"):
            rows.append([res["robot"], f"build failed: {res['error']}"] + [""] * 10)
            continue
        out, row = robot_row(res)
        results.append(out)
        rows.append(row)
    pays = sum(1 for r in results if (r["int8_minus_pinned_ci95"] or [0])[0] > 0)
    lower = [r["robot"] for r in results if (r["int8_minus_pinned_ci95"] or [0, 0])[1] < 0]
    eps = len((src["results"][0]["stages"]["pinned"] or {}).get("scores") or [])
    froms = "; ".join(
        f"`{Path(f).name}` (`{doc['command']}`)"
        + ("" if len(srcs) == 1 else ": " + ", ".join(r for r, o in origin.items() if o == f))
        for f, doc in zip(args.source, srcs) if f in origin.values())
    md = (f"From {froms}: {eps} report episodes per stage, "
          "the same for every stage; differences and ratios paired, bootstrap 95%.\n\n"
          + common.md_table(["robot", "pinned", "tuned", "int8", "tuned − pinned [95%]",
                             "int8 − pinned [95%]", "int8 / tuned [95%]",
                             "rl-finetune kept (gains)", "student's gains", "rl-finetune s",
                             "distill s"], rows)
          + f"\n\nThe final int8 policy beats the pinned fat policy (interval above 0) on {pays} "
          f"of {len(results)} robots; lower (interval below 0) on "
          f"{', '.join(lower) if lower else 'none'}.")
    doc = {"script": "finetune", "command": "python bench/finetune.py"
           + ("" if argv is None else " " + " ".join(argv)),
           "quick": False, "checkpoint": src["checkpoint"], "checkpoint_id": src["checkpoint_id"],
           "robots": [r["robot"] for r in results], "machine": src["machine"],
           "protocol": src["protocol"], "wall_s": round(time.perf_counter() - t0, 1),
           "source_wall_s": sum(d["wall_s"] for d in srcs), "notes": [], "results": results,
           "markdown": md}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(md)
    return doc


if __name__ == "__main__":
    main()
