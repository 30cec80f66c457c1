"""Write bench/RESULTS.md from the full (non-quick) results files in bench/results/.

A script without a results file gets a TODO line with the command that makes it: never a number
that was not measured.

    python bench/render_results.py
"""

from __future__ import annotations

import json
from pathlib import Path

import common

SECTIONS = [  # script, title, command
    ("inference", "Inference: latency, bytes, throughput", "python bench/inference.py"),
    ("quality-thin", "Thin builds: pin → ONNX → int8, all robots",
     "python bench/quality.py --plan thin"),
    ("quality-default", "Default builds: every stage of `xcompile build --int8`, all robots",
     "python bench/quality.py --profile default"),
    ("quality-default-arms", "Default builds of the arms, distill's steps weighted by the score",
     "python bench/quality.py --profile default --episodes 50 --workers 2 --robots kuka_iiwa "
     "panda xarm6 --out bench/results/quality-default-arms.json"),
    ("finetune", "Fine-tuning for the body: what it adds, and what the slim policy keeps "
     "(default builds)", "python bench/finetune.py --source bench/results/quality-default.json "
     "bench/results/quality-default-arms.json"),
    ("quality-unseen", "A body the fat policy never saw: the default build of the unseen arm",
     "python bench/quality.py --profile default --episodes 50 --robots "
     "examples/unseen_arm/arm5.toml --out bench/results/quality-unseen.json"),
    ("finetune-unseen", "Fine-tuning a body the fat policy never saw (zero-shot PPO)",
     "python bench/finetune.py --source bench/results/quality-unseen.json "
     "--out bench/results/finetune-unseen.json"),
    ("headroom", "Headroom: what one-knob calibrations of the pinned fat policy add",
     "python bench/headroom.py --episodes 16 --workers 2 --robots aliengo mini_cheetah laikago "
     "panda kuka_iiwa"),
    ("quality", "Quality: score per stage, all robots (profile fast)", "python bench/quality.py"),
    ("robustness", "Robustness: the fault suite, fat vs tuned vs final int8 (default builds)",
     "python bench/robustness.py --profile default --episodes 50 --workers 2"),
    ("robustness-robust", "Robustness: the fault suite, robust builds (`xcompile build --robust`)",
     "python bench/robustness.py --profile default --episodes 50 --workers 2 --robust"),
    ("robustness-arms", "Robustness of the arms' default builds, with 8 DAgger episodes per round",
     "python bench/robustness.py --profile default --episodes 50 --workers 2 --robots panda "
     "kuka_iiwa --out bench/results/robustness-arms.json"),
    ("robustness-robust-arms", "Robustness of the arms' robust builds, with 8 DAgger episodes per "
     "round", "python bench/robustness.py --profile default --episodes 50 --workers 2 --robust "
     "--robots panda kuka_iiwa --out bench/results/robustness-robust-arms.json"),
    ("robustness-robust-xarm6", "Robustness of xarm6's robust build, with the gain searches",
     "python bench/robustness.py --profile default --episodes 50 --workers 1 --robust --robots "
     "xarm6 --out bench/results/robustness-robust-xarm6.json"),
    ("robustness-robust-quadrupeds", "Robustness of mini cheetah's and aliengo's robust builds",
     "python bench/robustness.py --profile default --episodes 50 --workers 2 --robust --robots "
     "mini_cheetah aliengo --out bench/results/robustness-robust-quadrupeds.json"),
    ("robustness-robust-laikago", "Robustness of laikago's robust build",
     "python bench/robustness.py --profile default --episodes 50 --workers 1 --robust --robots "
     "laikago --out bench/results/robustness-robust-laikago.json"),
    ("build_cost", "Build cost: time and memory per pass (profile fast)",
     "python bench/build_cost.py --profiles fast --bodies 2,8"),
    ("build_cost-default", "Build cost: time and memory per pass (profile default)",
     "python bench/build_cost.py --profiles default --sizes 1M,5M --bodies 8 "
     "--out bench/results/build_cost-default.json"),
    ("build_time", "Build time: a user's default build on 2 cores, pass by pass",
     "python bench/build_time.py --robots laikago --workers 2"),
    ("runtime_floor", "Runtime floor: latency vs arithmetic vs call overhead",
     "python bench/runtime_floor.py"),
    ("latency_scaling", "Latency ratio vs fat size: pinned ONNX vs slim int8",
     "python bench/latency_scaling.py"),
    ("fleet", "Fleet builds: serial vs process pool vs Ray, and evaluation throughput",
     "python bench/fleet.py"),
    ("raptor", "RAPTOR (foundation-policy) converted to ONNX: bytes, latency, error per precision",
     "python bench/raptor.py"),
    ("foreign", "Foreign fat policies: the default plan, and distilling a recurrent teacher",
     "python bench/foreign.py"),
    ("quadrotor", "Quadrotors: RAPTOR flown zero-shot, and compiled for one airframe",
     "python bench/quadrotor.py"),
    ("c_backend", "C back end: emitted C vs onnxruntime vs torch, the same int8 student",
     "python bench/c_backend.py --builds DIR   # DIR/<robot>/policy.onnx of default builds"),
]

HEAD = """# Benchmark results

Each section: the command that made it, the machine, the date and the table, as the script
printed it (its JSON is in `bench/results/`). Timings are ratios within one run: every variant of a
table was timed back to back in the same process. The scripts ran one after another, with no other
heavy job on the machine (load average in each machine line; 2 cores, so a load near 2 is the
script itself). Sections marked
TODO were not run on the recorded machine: run the command shown to fill them (then
`python bench/render_results.py`). No number here is estimated. A section's wall time is that run's:
the scripts share a pass cache (`.xcompile/bench/`), so a section whose builds were already cached
ran in seconds; from cold, `quality.py --profile default --episodes 50 --workers 2` took 33
minutes for 8 robots (2026-11-27).

Since the seed streams (measurement protocol 2, `xcompile/seeds.py`), scores are on the report
stream's episodes, which no pass trains, checks or chooses on, with bootstrap 95% intervals; the
score sections measured before them say so.

On 2026-11-26 the worlds changed (measurement protocol 3): commands that change during 12 s
episodes with pushes and randomised friction, mass and motor strength; reach goals every 2.5 s
over a wide workspace; a continuous per-step score (README, "The tasks and their score"); and a
sample fat policy retrained on them. A section measured before that says so in bold at its top.

On 2026-11-27 the sample fat policy was continued on teachers that walk on aliengo and mini
cheetah (run 4, examples/README.md). A section measured on an earlier sample says so in bold at
its top: its scores are that policy's; its bytes are the same (same architecture). The default
and thin builds were re-run on the new sample with `--workers 2` (two robots built at a time; the
test suite ran beside the thin builds): their scores are exact, their latencies noisier than a
lone run's.

The default builds were re-run again the same day after rl-finetune's keep-better guard changed
(it keeps the tuned policy only when the paired difference's 95% interval is above 0, on 10
held-out episodes): 2674 s for 8 robots, on a machine shared with niced robustness and distill
runs, so their build times (up to 964 s, laikago) and latency ratios are inflated; their scores
are exact.

The default builds were re-run on 2026-11-27 after rl-finetune's gain search and distill's search
on the arms' students (`python bench/finetune.py` turns that run into the fine-tuning table):
4005 s for 8 robots, on a machine shared with the test suite, a robustness run and an unseen-arm
build (load average 4-6 on 2 cores), so their pass times (rl-finetune up to 979 s, mini cheetah)
and latency ratios are inflated; their scores are exact.

All 8 default builds were re-run once more on 2026-11-27/28 with the code of commit fa7fc6f (16
DAgger episodes per round for the arms, per-channel int8, the zero-shot PPO budget; the gain
search's pool path came after it and changes no result): the "Default builds" and "Fine-tuning for
the body" sections. Two robots were built at a time, each build serial (one core each), with a
niced robustness run and a test run beside them for part of the time (load average about 4 on
2 cores), so their pass seconds are those of one core, not of a lone build on two.

On 2026-11-28 laikago's default build was timed alone on both cores, as a user runs it with
`--executor process` ("Build time"), and the headroom probe ran on four of the five robots where
fine-tuning does not pay (not laikago, for time); no build's scores were re-run that day.

Later on 2026-11-28 mini cheetah's and aliengo's robust builds were made and scored under the
fault suite (50 bench episodes per cell), each build on one core with the other beside it;
laikago's followed (next paragraph).

On 2026-11-28 distill began weighting each labelled step by how much the task's score depends on
it (`weight_steps`; the reach family only: near the goal most). The arms' default builds were
re-run with it (kuka, panda, xarm6; 50 report episodes, two robots at a time, one core each,
beside laikago's robust build and a test run: their pass seconds are inflated) in "Default builds
of the arms", and the fine-tuning table takes the arms' rows from that run; laikago's robust
build (locomotion: no weights, unchanged by it) was scored under the fault suite beside them.
"""


SCORED = ("quality", "quality-thin", "quality-default",  # sections with scores
          "finetune", "robustness", "robustness-robust", "robustness-arms",
          "robustness-robust-arms", "robustness-robust-xarm6", "robustness-robust-quadrupeds",
          "quality-default-arms", "robustness-robust-laikago",
          "headroom",
          "quality-unseen", "finetune-unseen")
WORLD_FREE = ("raptor", "quadrotor")   # sections that use neither the sample fat policy nor
                                        # its worlds
# What changed since a section was measured, where it touches its numbers.
ARMS_4 = ("**Built before the arms' distillation default went to 8 DAgger episodes per round** "
          "(4 here): the arms' rows are superseded by the two sections that follow the robust "
          "builds' (the arms re-run); the quadrupeds' rows are what a build makes today.")
BEFORE_SEARCH = ("**Built before rl-finetune's gain search** (2026-11-27): rl-finetune then ran "
                 "PPO only and its guard kept the start on every robot, so \"tuned\" = fat "
                 "here; distill had no gain search on the arms' students. A build today changes "
                 "the policy (see the default builds above). Not re-run. ")
PER_CHANNEL = ("**Built before weight-only int8 kept one scale per output channel** "
               "(2026-11-27, quantize `per_channel`): its int8 rows had one scale per weight "
               "matrix. Not re-run. ")
ARMS_16 = ("**Built before the arms' distillation went to 16 DAgger episodes per round** (8 "
           "here). Not re-run. ")
WEIGHTED = ("**Built before distill weighted each labelled step by how much the score depends on "
            "it** (2026-11-28, `weight_steps`: the reach students). Not re-run. ")
CHANGED_SINCE = {
    "robustness": BEFORE_SEARCH + ARMS_4 + PER_CHANNEL,
    "robustness-robust": BEFORE_SEARCH + ARMS_4 + PER_CHANNEL,
    "robustness-arms": BEFORE_SEARCH + PER_CHANNEL + WEIGHTED,
    "robustness-robust-arms": BEFORE_SEARCH + PER_CHANNEL + WEIGHTED,
    "robustness-robust-xarm6": ARMS_16 + PER_CHANNEL + WEIGHTED,
    "quality-default": ("**The arms' rows were built before distill weighted each labelled step "
                        "by how much the score depends on it** (2026-11-28, `weight_steps`): "
                        "the next section re-runs the arms, and the fine-tuning table takes "
                        "their rows from it."),
    "quality-unseen": WEIGHTED,
    "finetune-unseen": WEIGHTED,
    "quality-thin": PER_CHANNEL,
    "inference": PER_CHANNEL,
    "c_backend": PER_CHANNEL,
    "foreign": ("**Part 2's int8 rows were measured before 2026-11-27,** when quantize kept a "
                "recurrent student's recurrent weights in float (its first/last-layer walk "
                "started at the state's inputs and outputs): the GRU's int8 file is 0.91x its "
                "float one here, about 0.41x with quantize as it is now. Not re-run. "
                + WEIGHTED.replace(" Not re-run. ",
                                   " Its panda rows are of the distill before it; not re-run.")),
}


def _earlier_sample(doc: dict, current: dict | None) -> str:
    """A bold line where a section measured the sample fat policy as it was before the one in
    examples/ now (its sha256 differs): its scores are that policy's."""
    ck = doc.get("checkpoint_id")
    if not ck or not current or Path(doc["checkpoint"]).as_posix() != common.DEFAULT_CKPT \
            or ck["sha256"] == current["sha256"]:
        return ""
    return (f"**Measured on an earlier sample fat policy** (sha256 {ck['sha256'][:12]}; the one in "
            f"`{common.DEFAULT_CKPT}` now is {current['sha256'][:12]}, the same architecture, "
            "so the same bytes and about the same latencies): its scores are that policy's. "
            "Not re-run.\n\n")


def section(script: str, title: str, command: str, results: Path,
            current: dict | None = None) -> str:
    path = results / f"{script}.json"
    if not path.is_file():
        return f"## {title}\n\nTODO: not run yet. Command: `{command}`\n"
    doc = json.loads(path.read_text())
    notes = "".join(f"- {n}\n" for n in doc["notes"])
    ck = doc.get("checkpoint_id")
    if ck:
        ckpt = (f"Checkpoint: `{doc['checkpoint']}`, {ck['bytes']:,} bytes, "
                f"sha256 {ck['sha256'][:12]}" + (f" ({ck['note']})" if ck.get("note") else ""))
    elif doc["checkpoint"].startswith("("):            # build_cost.py makes its own
        ckpt = f"Checkpoint: {doc['checkpoint']}"
    else:
        ckpt = (f"Checkpoint: `{doc['checkpoint']}` (not fingerprinted: measured before results "
                "recorded the checkpoint's sha256)")
    protocol = doc.get("protocol", 1)
    stale = ("" if protocol >= 3 or script in WORLD_FREE else
             "**Not re-run on the tasks of 2026-11-26 (measurement protocol 3):** it measured the "
             "previous sample fat policy on the old worlds (forward-only commands, 3-4 s "
             "episodes, a score clipped at \"made the distance\" or \"within 5 cm\")"
             + ("; its scores are on the old episodes `seed + i` and carry no intervals"
                if protocol < 2 and script in SCORED else "")
             + ". Sizes and latencies were of that policy's builds.\n\n")
    if script in CHANGED_SINCE:
        stale += CHANGED_SINCE[script] + "\n\n"
    if protocol >= 3:
        stale += _earlier_sample(doc, current)
    return (f"## {title}\n\n{stale}Command: `{doc['command']}` (wall {doc['wall_s']} s)\n\n"
            f"Machine: {common.machine_line(doc['machine'])}\n\n{ckpt}\n\n{doc['markdown']}\n"
            + (f"\nNotes:\n\n{notes}" if notes else ""))


def main() -> None:
    results = common.REPO / "bench" / "results"
    current = common.checkpoint_id(common.REPO / common.DEFAULT_CKPT)
    text = HEAD + "\n" + "\n".join(section(*s, results, current) for s in SECTIONS)
    out = common.REPO / "bench" / "RESULTS.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
