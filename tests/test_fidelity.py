"""Fidelity on a policy that does its task: each stage scores what the one before it scores, and
each of these comparisons fails against a sabotaged copy of the stage.

The competent fixture (tests/fixtures/competent_fat.pt) scores about 1.0 on a1 and panda, so a
stage that breaks the policy loses score; on the tiny random fixture every stage scores 0 and the
same comparisons could not fail. Every score is taken on episodes 0..3 of the "report" seed stream
(`xcompile.measure.score`, what `xcompile eval --episodes 4` scores). Every comparison is run twice:
once on the real stage (it must hold) and once on the stage sabotaged the way a compiler bug would
break it (tests/sabotage.py: actions x 0.7, joint 1's action zeroed, the joints permuted); the
sabotaged twin must fail the very same comparison.

What is compared:
- exact stages (fat -> pinned -> ONNX): per episode, score to 1e-3 and what the robot did to a few
  mm (a1: distance made good; panda: final distance of the hand to the goal). Pinning and export
  are exact to float rounding, and a rollout amplifies rounding only a little in 4 s.
- int8 (quantize, weight-only on the cpu target) against its float ONNX: the mean score to 0.05.

Panda is a redundant 7-joint arm whose score asks only that the hand end within 5 cm of the goal:
the competent policy still reaches every goal with its joints in reverse order (score 1.0, the hand
off by 1-2.4 cm instead of 0.7-1 cm), and with any one of joints 1, 3, 5, 6, 7 held at 0. Its score cannot see
those faults, so for panda the permutation twin of the score-only int8 comparison is a cyclic shift
of the joints, and the reversed twin is caught by the exact comparisons' reach errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sabotage import SABOTAGES, onnx_sabotage, sabotage_onnx

from xcompile import measure
from xcompile.artifact import Artifact
from xcompile.evaluate import EvalResult, score_policy
from xcompile.passes.base import BuildContext, get_pass
from xcompile.policy import load_policy
from xcompile.targets import load_hardware, load_robot

ROBOTS = ("a1", "panda")
EPISODES = 4             # episodes 0..3 of the "report" stream
EXACT_SCORE = 1e-3       # per episode, fat vs pinned and pinned vs ONNX
EXACT_PHYSICS_M = 5e-3   # per episode: distance made good (a1) or reach error (panda), metres
INT8_SCORE = 0.05        # mean score, int8 vs float ONNX
# The sabotaged twins each comparison must catch (see the module docstring for panda).
EXACT_TWINS = {"a1": ("scaled", "zeroed", "reversed"),
               "panda": ("scaled", "zeroed", "reversed", "rolled")}
SCORE_TWINS = {"a1": ("scaled", "zeroed", "reversed"), "panda": ("scaled", "zeroed", "rolled")}


def physics(res: EvalResult) -> list[float]:
    return res.reach_errors_m or res.distances_m


def exact_gap(a: EvalResult, b: EvalResult) -> tuple[float, float]:
    """(largest per-episode |score difference|, largest per-episode |physical difference|)."""
    return (float(np.max(np.abs(np.subtract(a.scores, b.scores)))),
            float(np.max(np.abs(np.subtract(physics(a), physics(b))))))


def same_exactly(a: EvalResult, b: EvalResult) -> bool:
    ds, dp = exact_gap(a, b)
    return ds <= EXACT_SCORE and dp <= EXACT_PHYSICS_M


def close_in_score(a: EvalResult, b: EvalResult) -> bool:
    return abs(a.score - b.score) <= INT8_SCORE


def run_pass(name: str, art: Artifact, robot, workdir: Path, **cfg) -> Artifact:
    cls = get_pass(name)
    workdir.mkdir(parents=True)
    ctx = BuildContext(robot=robot, hardware=load_hardware("cpu"), workdir=workdir,
                       history=list(art.lineage))
    return cls().run(art, cls.Config(**cfg), ctx).artifact


@pytest.fixture(scope="module")
def stages(competent_fat_ckpt, tmp_path_factory):
    """robot name -> (robot, {"fat", "pinned", "onnx", "int8": Artifact}), built on first use."""
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            robot = load_robot(name)
            tmp = tmp_path_factory.mktemp(f"fidelity-{name}")
            fat = Artifact.create("fat-checkpoint", competent_fat_ckpt, name)
            pinned = run_pass("pin-embodiment", fat, robot, tmp / "pin", n_check_obs=256,
                              check_episodes=0)
            onnx = run_pass("export-onnx", pinned, robot, tmp / "onnx", n_check_obs=64)
            int8 = run_pass("quantize", onnx, robot, tmp / "int8", precision="int8",
                            calibration_episodes=2, heldout_episodes=1)
            built[name] = (robot, {"fat": fat, "pinned": pinned, "onnx": onnx, "int8": int8},
                           tmp)
        return built[name]

    return get


def score(art: Artifact, robot) -> EvalResult:
    return measure.score(art, robot, EPISODES, 0)


def onnx_twin(art: Artifact, robot, how: str, tmp: Path) -> EvalResult:
    """The score of a sabotaged copy of the ONNX artifact, written to disk and loaded like it."""
    path = sabotage_onnx(art.path, tmp / f"{art.path.stem}-{how}.onnx",
                         **onnx_sabotage(how, robot.n_joints))
    return score(Artifact.create("onnx", path, robot.name), robot)


@pytest.mark.parametrize("name", ROBOTS)
def test_fixture_does_its_task(name, stages):
    robot, arts, _ = stages(name)
    res = score(arts["fat"], robot)
    assert res.score >= 0.9, res.scores
    assert res.nonfinite_action_episodes == 0 and res.falls == 0


@pytest.mark.parametrize("name", ROBOTS)
def test_pinned_scores_as_fat(name, stages):
    robot, arts, _ = stages(name)
    fat, pinned = score(arts["fat"], robot), score(arts["pinned"], robot)
    assert pinned.score > 0.9
    assert same_exactly(fat, pinned), exact_gap(fat, pinned)
    act = load_policy(arts["pinned"].path, robot).act
    for how in EXACT_TWINS[name]:
        twin = score_policy(SABOTAGES[how](act), robot, EPISODES, 0)
        assert not same_exactly(fat, twin), (how, exact_gap(fat, twin))


@pytest.mark.parametrize("name", ROBOTS)
def test_onnx_scores_as_pinned(name, stages):
    robot, arts, tmp = stages(name)
    pinned, onnx = score(arts["pinned"], robot), score(arts["onnx"], robot)
    assert onnx.score > 0.9
    assert same_exactly(pinned, onnx), exact_gap(pinned, onnx)
    for how in EXACT_TWINS[name]:
        twin = onnx_twin(arts["onnx"], robot, how, tmp)
        assert not same_exactly(pinned, twin), (how, exact_gap(pinned, twin))


@pytest.mark.parametrize("name", ROBOTS)
def test_int8_scores_close_to_float(name, stages):
    robot, arts, tmp = stages(name)
    onnx, int8 = score(arts["onnx"], robot), score(arts["int8"], robot)
    assert int8.score > 0.9
    assert close_in_score(onnx, int8), (onnx.scores, int8.scores)
    for how in SCORE_TWINS[name]:
        twin = onnx_twin(arts["int8"], robot, how, tmp)
        assert not close_in_score(onnx, twin), (how, onnx.scores, twin.scores)
