"""Foreign fat policies through the default plan, and which student serves a recurrent teacher.

Part 1 (`--robots`, default panda a1): the sample fat policy exported as a foreign ONNX graph with
its joint descriptors as an embodiment input (`examples/export_foreign.py`, one graph per task
family), built with the default plan as `xcompile build fat_<family>.onnx --interface
fat_<family>.toml --target ROBOT --episodes N` builds it: pin-embodiment by constant folding,
rl-finetune skipped (not torch), distill with the pinned graph as a black-box teacher, export,
int8, build-tensorrt skipped here (no GPU). One row per stage.

Part 2 (`--teacher-robot`, default a1): a recurrent teacher, the sample policy pinned to the robot
with a leaky integral of its velocity error as hidden state (`examples/recurrent_teacher.py`),
built with the default plan once per distill student (`mlp`, `history_mlp`, `gru`), and the sample
policy itself (feed-forward) scored on the same episodes. Per student: the final int8 policy's
score, the paired ratio final / teacher with its interval, distill's held-out action error and
time, bytes and latency.

Every build is the CLI's (`xcompile build ... --json`, default profile, the report's episodes of
seed stream "report"), in `--work-dir`, sharing one pass cache there.

    python bench/foreign.py                      # about 35 min on 2 cores from cold
    python bench/foreign.py --quick --robots panda --episodes 2
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

from xcompile.stats import mean_ci95, ratio_ci95
from xcompile.targets import load_robot

STUDENTS = ("mlp", "history_mlp", "gru")
QUICK_DISTILL = {"rounds": 1, "episodes_per_round": 1, "fit_epochs": 2, "final_fit_epochs": 0,
                 "eval_episodes": 1, "heldout_episodes": 1}   # --quick: plumbing, not numbers
PLAN = ["pin-embodiment", "rl-finetune", "distill", "export-onnx", "quantize", "build-tensorrt"]


def run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")


def build(model: Path, iface: Path, robot: str, out: Path, args: Any,
          config: dict[str, Any] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "xcompile", "build", str(model), "--interface", str(iface),
           "--target", robot, "--profile", args.profile, "--episodes", str(args.episodes),
           "--seed", str(args.seed), "--out", str(out), "--force",
           "--cache-dir", str(Path(args.work_dir) / "foreign-cache"), "--json"]
    if config is not None:
        path = out.parent / f"{out.name}.toml"
        lines = [f"passes = {json.dumps(PLAN)}", "[pass.distill]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in config.items()]
        path.write_text("\n".join(lines) + "\n")
        cmd += ["--config", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode not in (0, 4):      # 4: a gate missed; there are none here
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)


def paired_note(report: dict[str, Any]) -> str:
    return next((n for n in report["notes"] if n.startswith("paired score ratios")), "")


def stage_rows(robot: str, report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for s in report["stages"]:
        ci = s.get("score_ci95")
        rows.append([robot, s["name"], "skipped" if s.get("skipped") else common.fmt(
            s.get("params"), ","), common.fmt(s.get("bytes"), ","),
            common.fmt(s.get("latency_p50_us"), ".1f"),
            common.fmt(s.get("score"), ".3f"),
            f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–", common.fmt(s.get("wall_s"), ".0f")])
    return rows


def ratio_of(report: dict[str, Any], num: str, den: str) -> tuple[float, list[float]] | None:
    """mean(num) / mean(den) over the same episodes, with its paired bootstrap 95% interval."""
    st = {s["name"]: s for s in report["stages"]}
    r, ci = ratio_ci95(st[num].get("scores") or [], st[den].get("scores") or [])
    return (r, ci) if r is not None and ci is not None else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], ["panda", "a1"])
    ap.add_argument("--episodes", type=int, default=50, help="report episodes per stage (50)")
    ap.add_argument("--teacher-robot", default="a1", help="robot of part 2 (a quadruped)")
    args = common.parse(ap, argv, "foreign")
    if args.quick:
        args.profile = "fast"
    t0 = time.perf_counter()
    work = Path(args.work_dir) / "foreign"
    work.mkdir(parents=True, exist_ok=True)
    ex = common.REPO / "examples"

    # PART 1: the sample policy as a foreign graph, default plan
    rows, part1 = [], {}
    families = {load_robot(r).family for r in args.robots}
    for fam in sorted(families):
        run([sys.executable, str(ex / "export_foreign.py"), str(work), "--checkpoint",
             args.checkpoint, "--family", fam])
    for robot in args.robots:
        fam = load_robot(robot).family
        rep = build(work / f"fat_{fam}.onnx", work / f"fat_{fam}.toml", robot,
                    work / f"build-{robot}", args, QUICK_DISTILL if args.quick else None)
        part1[robot] = rep
        rows += stage_rows(robot, rep)
    md = ["Part 1: the sample fat policy as a foreign ONNX graph (descriptors as an embodiment "
          "input), default plan:", "",
          common.md_table(["robot", "stage", "params", "bytes", "p50 µs", "score", "95% CI",
                           "time s"], rows), ""]
    md += [f"- {r}: {paired_note(rep)}" for r, rep in part1.items()]

    # PART 2: a recurrent teacher, one build per student
    tr = args.teacher_robot
    run([sys.executable, str(ex / "recurrent_teacher.py"), str(work / "teacher"), "--checkpoint",
         args.checkpoint, "--target", tr])
    part2, srows = {}, []
    for kind in STUDENTS:
        rep = build(work / "teacher" / "teacher.onnx", work / "teacher" / "teacher.toml", tr,
                    work / f"student-{kind}", args,
                    {"student": kind, **(QUICK_DISTILL if args.quick else {})})
        part2[kind] = rep
        st = {s["name"]: s for s in rep["stages"]}
        d, q = st["distill"]["checks"], st["quantize"]
        r = ratio_of(rep, "quantize", "fat")
        srows.append([kind, common.fmt(st["fat"]["score"], ".3f"), common.fmt(q["score"], ".3f"),
                      f"{r[0]:.3f} [{r[1][0]:.3f}, {r[1][1]:.3f}]" if r else "–",
                      common.fmt(d["action_error_final"], ".4f"), common.fmt(d["wall_s"], ".0f"),
                      common.fmt(q["params"], ","), common.fmt(q["bytes"], ","),
                      common.fmt(q["latency_p50_us"], ".1f")])
    native = json.loads(subprocess.run(
        [sys.executable, "-m", "xcompile", "eval", args.checkpoint, "--target", tr, "--episodes",
         str(args.episodes), "--seed", str(args.seed), "--json"],
        capture_output=True, text=True, check=True).stdout)
    teacher_scores = part2[STUDENTS[0]]["stages"][0]["scores"]
    diff = [a - b for a, b in zip(teacher_scores, native["scores"])]
    md += ["", f"Part 2: a recurrent teacher on {tr} (the sample policy with a leaky integral of "
           "its velocity error as hidden state), one default build per distill student; ratio: "
           "final int8 / teacher, paired over the same episodes:", "",
           common.md_table(["student", "teacher", "final int8", "final / teacher",
                            "action error", "distill s", "params", "bytes", "p50 µs"], srows),
           "", f"The sample policy itself (feed-forward) on the same {args.episodes} episodes: "
           f"{native['score']:.3f} {native['score_ci95']}; teacher − sample policy, paired: "
           f"{sum(diff) / len(diff):+.3f} {mean_ci95(diff)}."]
    notes = [f"quantize left {kind}'s int8 file at {q['checks']['size_ratio']:.2f}x its float one "
             "(most of its weights stayed float)" for kind, rep in part2.items()
             for q in rep["stages"] if q["name"] == "quantize"
             and (q.get("checks") or {}).get("size_ratio", 0) > 0.5]
    notes += ["build-tensorrt is skipped in every build (no TensorRT or GPU here; a recurrent "
              "policy is skipped anyway)",
              "rl-finetune is skipped in every build: pinning a foreign graph gives ONNX, not a "
              "differentiable torch policy"]
    results = {"part1": {r: rep for r, rep in part1.items()},
               "part2": part2, "native": native, "teacher_minus_native": diff}
    return common.finish(args, "foreign", results, "\n".join(md), notes, started=t0)


if __name__ == "__main__":
    main()
