"""What a calibration of the pinned fat policy can add on one body: the headroom of cheap tuning.

rl-finetune's default budget is a gain search on the task inputs (the command or the goal, and
for locomotion the measured base velocity), folded into the first layer. Where its guard keeps
the start, is there nothing to find nearby, or is the search too weak to find it? This script
answers with a wider, one-at-a-time probe of the pinned policy, paired on the same episodes:

- every other slice of the observation (`xcompile.sim.tasks.obs_layout`) scaled by 0.7 and 1.4
  as a group (gravity, base rates, joint angles, joint velocities, the last action, ...): the
  feedback gains a controls engineer would retune;
- the task inputs the gain search owns, scaled the same way (the search's own neighbourhood);
- the whole action scaled by 0.9 and 1.1 (the policy's output gain).

Each row is the candidate's score minus the pinned policy's on the same `--episodes` episodes of
seed stream `bench` (none that a build trains, checks or reports on), with its bootstrap 95%
interval (`xcompile.stats.diff_ci95`). A robot whose every interval contains or lies below 0 has
no headroom a one-knob calibration reaches: gains there need a change of behaviour (RL with a
budget beyond the default build's) rather than a retuned gain.

    python bench/headroom.py --episodes 16 --workers 2 --robots aliengo laikago
"""

from __future__ import annotations

import time
from typing import Any

import common
import numpy as np

from xcompile.evaluate import score_policy
from xcompile.executors import make_executor
from xcompile.models.fat import pin
from xcompile.passes.gain_search import GAIN_SLICES
from xcompile.policy import body_descriptors, load_fat_checkpoint, torch_act
from xcompile.sim.tasks import obs_dim, obs_layout
from xcompile.stats import diff_ci95
from xcompile.targets import list_robots, load_robot

INPUT_SCALES = (0.7, 1.4)
OUTPUT_SCALES = (0.9, 1.1)
SKIP = ("gait_sin_cos",)     # a clock, not a feedback signal


def candidates(robot) -> list[tuple[str, float, Any]]:
    """(what, scale, (obs gain vector or None, output scale)) for every probe of `robot`."""
    out, at = [], 0
    for name, width in obs_layout(robot):
        if name not in SKIP:
            for s in INPUT_SCALES:
                g = np.ones(obs_dim(robot), dtype=np.float32)
                g[at:at + width] = s
                owned = name in GAIN_SLICES.get(robot.family, ())
                out.append((f"{name}{' (gain search)' if owned else ''}", s, (g, 1.0)))
        at += width
    return out + [("action (output)", s, (None, s)) for s in OUTPUT_SCALES]


def bench_robot(args, name: str) -> tuple[dict[str, Any], list[list[Any]]]:
    robot = load_robot(name)
    ckpt = load_fat_checkpoint(args.checkpoint, robot)
    desc, _ = body_descriptors(ckpt, robot)
    act = torch_act(pin(ckpt.model, desc, robot.family).eval())
    cands = candidates(robot)
    if args.quick:
        cands = cands[:2]

    def run(gain, out_scale):
        def policy(obs):
            return act(obs if gain is None else obs * gain) * out_scale
        return score_policy(policy, robot, args.episodes, args.seed, stream=common.BENCH_STREAM)

    base = run(None, 1.0)
    probes, rows = [], []
    for what, s, (gain, out_scale) in cands:
        r = run(gain, out_scale)
        d, ci = diff_ci95(r.scores, base.scores)
        probes.append({"what": what, "scale": s, "score": r.score, "minus_pinned": d,
                       "minus_pinned_ci95": ci, "falls": r.falls})
        mark = " **gain**" if ci[0] > 0 else (" lower" if ci[1] < 0 else "")
        rows.append([name, what, f"× {s}", f"{r.score:.3f}",
                     f"{d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]{mark}"])
    best = max(probes, key=lambda p: p["minus_pinned"])
    res = {"robot": name, "pinned": base.score, "pinned_falls": base.falls, "probes": probes,
           "best": best, "headroom": any(p["minus_pinned_ci95"][0] > 0 for p in probes)}
    return res, rows


def _job(job):
    return bench_robot(*job)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], list_robots(), default_profile=None)
    ap.add_argument("--episodes", type=int, default=None,
                    help="episodes per candidate, the same for all (default 16; quick 1)")
    ap.add_argument("--workers", type=int, default=1,
                    help="robots at once, one process each (default 1)")
    args = common.parse(ap, argv, "headroom")
    args.episodes = args.episodes or (1 if args.quick else 16)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    started = time.perf_counter()
    with make_executor("process" if args.workers > 1 else "serial",
                       args.workers if args.workers > 1 else None) as ex:
        outs = ex.map(_job, [(args, robot) for robot in args.robots])
    results = [res for res, _ in outs]
    rows = [row for _, r in outs for row in r]
    summary = [[r["robot"], f"{r['pinned']:.3f}",
                f"{r['best']['what']} × {r['best']['scale']}",
                f"{r['best']['minus_pinned']:+.3f} [{r['best']['minus_pinned_ci95'][0]:+.3f}, "
                f"{r['best']['minus_pinned_ci95'][1]:+.3f}]",
                "yes" if r["headroom"] else "none found"] for r in results]
    md = (f"Pinned fat policy vs one-knob calibrations of it; {args.episodes} episodes per "
          f"candidate (episodes 0..{args.episodes - 1} of seed stream `{common.BENCH_STREAM}`, "
          f"seed {args.seed}, the same for every candidate); differences paired, bootstrap 95%."
          "\n\n" + common.md_table(["robot", "pinned", "best probe", "best − pinned [95%]",
                                    "headroom (an interval above 0)"], summary)
          + "\n\n" + common.md_table(["robot", "probe", "scale", "score", "− pinned [95%]"],
                                     rows))
    return common.finish(args, "headroom", results, md, [], started)


if __name__ == "__main__":
    main()
