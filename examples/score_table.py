"""The score table of examples/README.md: each robot's expert vs the sample fat policy.

The same episodes for both: the report stream's, as `xcompile eval` scores (xcompile/seeds.py).

    python examples/score_table.py --episodes 20 --seed 0
"""

from __future__ import annotations

import argparse

from xcompile.evaluate import evaluate
from xcompile.policy import load_policy
from xcompile.sim.experts import evaluate_expert
from xcompile.targets import list_robots, load_robot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", default="examples/fat_policy.pt")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print("| robot | task | expert score | fat score | fat / expert | falls (fat) | "
          "success within tolerance (fat) |")
    print("|---|---|---|---|---|---|---|")
    for name in list_robots():
        robot = load_robot(name)
        ex = evaluate_expert(robot, a.episodes, a.seed)
        fat = evaluate(load_policy(a.checkpoint, robot).act, robot, a.episodes, a.seed)
        loco = robot.family == "locomotion"
        print(f"| {name} | {robot.family} | {ex.score:.3f} | {fat.score:.3f} | "
              f"{fat.score / max(ex.score, 1e-9):.2f} | "
              f"{f'{fat.falls}/{a.episodes}' if loco else '-'} | "
              f"{'-' if loco else f'{100 * fat.success_rate:.0f}%'} |", flush=True)


if __name__ == "__main__":
    main()
