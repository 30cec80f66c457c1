"""RAPTOR flown zero-shot on every airframe, and compiled for one airframe at a time.

Part 1 (`--robots`, default: the built-in airframes): RAPTOR (PyPI foundation-policy, converted by
examples/raptor/convert.py) in the quadrotor world (xcompile/sim/quadrotor.py), `--episodes`
episodes of the "bench" seed stream per airframe (no build sees them). Beside it, on the same
episodes: the hover command held open loop (what doing nothing scores) and RAPTOR with its motor
order mirrored front to back (a wrong mapping). Per row: score with its bootstrap 95% interval,
crashes, position RMSE, settling time within 10 cm.

Part 2 (`--compile`, default crazyflie x500): `xcompile build raptor.onnx --interface raptor.toml
--target AIRFRAME --int8 --episodes N --json` with the default plan and profile: pin-embodiment
(nothing to fold: RAPTOR has no embodiment input), rl-finetune skipped (an ONNX input), distill
(the airframe's specialised student; `--student`, default the pass's own choice), export-onnx,
quantize, build-tensorrt skipped (recurrent, no GPU). Per airframe: RAPTOR's and the final int8
policy's scores on the report's episodes, their paired ratio with its interval, bytes, latency.

    python bench/quadrotor.py                 # about 25 min on 2 cores
    python bench/quadrotor.py --quick --robots crazyflie --compile crazyflie --episodes 2
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

from xcompile.evaluate import score_policy
from xcompile.frontends.graph import fat_graph_policy
from xcompile.policy import load_policy
from xcompile.stats import mean_ci95, ratio_ci95
from xcompile.targets import list_airframes, load_robot

QUICK_DISTILL = {"rounds": 1, "episodes_per_round": 1, "fit_epochs": 2, "final_fit_epochs": 0,
                 "eval_episodes": 1, "heldout_episodes": 1}   # --quick: plumbing, not numbers


class Mirrored:
    """A stateful policy with its motor order mirrored front to back (FR<->FL, BR<->BL)."""

    def __init__(self, act: Any):
        self.act = act

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.act(obs)[:, [3, 2, 1, 0]]

    def reset_states(self) -> None:
        self.act.reset_states()

    def set_rows(self, rows: list[int]) -> None:
        self.act.set_rows(rows)


def hover(robot: Any):
    u = robot.airframe.hover_speed()
    return lambda obs: np.full((len(obs), len(robot.actuators)), 2 * u - 1, np.float32)


def row(name: str, policy: str, res: Any) -> tuple[list[Any], dict[str, Any]]:
    d = res.as_dict()
    ci = d["score_ci95"]
    return ([name, policy, f"{d['score']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
             f"{d['falls']}/{d['episodes']}", common.fmt(100 * d["position_rmse_m"], ".1f"),
             common.fmt(d.get("settling_time_s"), ".2f"),
             f"{d['setpoints_settled']}/{d['setpoints']}"], d)


def steady_hover_cm(act: Any, robot: Any) -> list[Any]:
    """Mean position error (x, y, z; cm) of `act` holding home for 1.5-2.9 s in the nominal
    world (no randomisation, no pushes), from rest at home: the offset it settles to ("crashed"
    if it does not stay in the box)."""
    import pybullet as p

    from xcompile.evaluate import announce_rows, begin_rollout
    from xcompile.sim.env import make_env
    from xcompile.sim.tasks import Randomization

    env = make_env(robot, randomization=Randomization.off())
    env.reset(seed=0)
    p.resetBasePositionAndOrientation(env.body, env.home.tolist(), [0, 0, 0, 1],
                                      physicsClientId=env.cid)
    p.resetBaseVelocity(env.body, [0, 0, 0], [0, 0, 0], physicsClientId=env.cid)
    obs, errors = env._obs(), []
    begin_rollout(act)
    for t in range(290):
        announce_rows(act, [0])
        obs, _, crashed, *_ = env.step(act(obs[None])[0])
        if crashed:
            env.close()
            return ["crashed"] * 3
        if t >= 150:
            errors.append(obs[:3].astype(np.float64))
    env.close()
    return [round(100 * float(v), 2) for v in np.mean(errors, axis=0)]


def build(model: Path, iface: Path, robot: str, out: Path, args: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "xcompile", "build", str(model), "--interface", str(iface),
           "--target", robot, "--int8", "--profile", args.profile, "--episodes",
           str(args.episodes), "--seed", str(args.seed), "--out", str(out), "--force",
           "--cache-dir", str(Path(args.work_dir) / "quadrotor-cache"), "--json"]
    distill = {**({"student": args.student} if args.student else {}),
               **(QUICK_DISTILL if args.quick else {})}
    if distill:
        path = out.parent / f"{out.name}.toml"
        path.write_text("[pass.distill]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                     for k, v in distill.items()))
        cmd += ["--config", str(path)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode not in (0, 4):
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    rep = json.loads(res.stdout)
    rep["bench_build_s"] = round(time.perf_counter() - t0, 1)
    return rep


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__.split("\n\n")[0], list_airframes())
    ap.add_argument("--episodes", type=int, default=50, help="episodes per row (50)")
    ap.add_argument("--compile", nargs="*", default=["crazyflie", "x500"], metavar="AIRFRAME",
                    help="airframes to compile RAPTOR for (default crazyflie x500)")
    ap.add_argument("--student", choices=["mlp", "history_mlp", "gru"], default=None,
                    help="distill's student (default: the pass's own choice)")
    args = common.parse(ap, argv, "quadrotor", need_checkpoint=False)
    if args.quick:
        args.profile = "fast"
    t0 = time.perf_counter()
    work = Path(args.work_dir) / "quadrotor"
    work.mkdir(parents=True, exist_ok=True)
    conv = subprocess.run([sys.executable, str(common.REPO / "examples/raptor/convert.py"),
                           str(work)], capture_output=True, text=True, check=False)
    if conv.returncode != 0:
        sys.exit(f"examples/raptor/convert.py failed (pip install foundation-policy):\n"
                 f"{conv.stderr[-2000:]}")
    model, iface = work / "raptor.onnx", work / "raptor.toml"
    args.checkpoint = str(model)            # what the results file fingerprints

    # PART 1: zero-shot
    rows, part1 = [], {}
    for name in args.robots:
        robot = load_robot(name)
        act = fat_graph_policy(model, iface, robot).act
        part1[name] = {}
        for label, pol in (("RAPTOR", act), ("hover command, open loop", hover(robot)),
                           ("RAPTOR, motors mirrored", Mirrored(act))):
            res = score_policy(pol, robot, args.episodes, args.seed, stream=common.BENCH_STREAM)
            r, d = row(name, label, res)
            rows.append(r)
            part1[name][label] = d
    md = [f"Part 1: RAPTOR zero-shot, {args.episodes} episodes per row (seed stream "
          f"'{common.BENCH_STREAM}', seed {args.seed}; the same episodes for every row of an airframe). "
          "RMSE: distance to the setpoint, root mean square over the steps flown; settling: "
          "time until within 10 cm for the rest of a setpoint's period, mean over the periods "
          "that settled.", "",
          common.md_table(["airframe", "policy", "score [95% CI]", "crashes", "RMSE cm",
                           "settling s", "setpoints settled"], rows)]

    # PART 2: compiled for one airframe
    crows, part2, hover_rows = [], {}, []
    for name in args.compile:
        rep = build(model, iface, name, work / f"build-{name}", args)
        part2[name] = rep
        st = {s["name"]: s for s in rep["stages"]}
        fat, q, d = st["fat"], st["quantize"], st["distill"]
        r, ci = ratio_ci95(q["scores"], fat["scores"])
        rs, cis = ratio_ci95(d["scores"], fat["scores"])
        diff = [a - b for a, b in zip(q["scores"], fat["scores"])]
        dci = mean_ci95(diff)
        crows.append([name, common.fmt(fat["score"], ".3f"), common.fmt(q["score"], ".3f"),
                      f"{rs:.3f} [{cis[0]:.3f}, {cis[1]:.3f}]",
                      f"{r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
                      f"{np.mean(diff):+.3f} [{dci[0]:+.3f}, {dci[1]:+.3f}]",
                      (d.get("checks") or {}).get("student", "–"),
                      f"{common.fmt(fat['params'], ',')} → {common.fmt(q['params'], ',')}",
                      f"{common.fmt(fat['bytes'], ',')} → {common.fmt(q['bytes'], ',')}",
                      f"{common.fmt(fat['latency_p50_us'], '.1f')} → "
                      f"{common.fmt(q['latency_p50_us'], '.1f')}",
                      common.fmt(d["wall_s"], ".0f"), common.fmt(rep["bench_build_s"], ".0f")])
        robot = load_robot(name)
        for label, act in (("RAPTOR", fat_graph_policy(model, iface, robot).act),
                           ("final int8", load_policy(work / f"build-{name}" / "policy.onnx",
                                                      robot).act)):
            hover_rows.append([name, label, *steady_hover_cm(act, robot)])
        rep["steady_hover_cm"] = hover_rows[-2:]
    if crows:
        md += ["", f"Part 2: RAPTOR compiled for one airframe (`xcompile build raptor.onnx "
               f"--interface raptor.toml --target AIRFRAME --int8`, profile {args.profile}), "
               f"scored on the report's {args.episodes} episodes (paired):", "",
               common.md_table(["airframe", "RAPTOR", "final int8", "float student / RAPTOR",
                                "int8 / RAPTOR",
                                "int8 − RAPTOR", "student", "params", "bytes", "p50 µs",
                                "distill s", "build s"], crows),
               "", "Where each settles holding home in the nominal world (no randomisation or "
               "pushes, from rest; mean position error over 1.5-2.9 s, cm):", "",
               common.md_table(["airframe", "policy", "x", "y", "z"], hover_rows)]
    notes = ["rl-finetune is skipped in every build (a foreign ONNX input is not a "
             "differentiable torch policy); build-tensorrt too (recurrent or no GPU)"]
    results = {"part1": part1, "part2": part2}
    return common.finish(args, "quadrotor", results, "\n".join(md), notes, started=t0)


if __name__ == "__main__":
    main()
