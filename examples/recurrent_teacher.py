"""A recurrent fat policy to compile: the sample policy with a leaky integral of its velocity error.

    python examples/recurrent_teacher.py OUT_DIR [--target a1] [--gain 1.0] [--leak 0.98]

writes OUT_DIR/teacher.onnx and OUT_DIR/teacher.toml, a foreign recurrent policy in the ONNX
front end's form (`[recurrent]` table, no body input) for one locomotion target.

Its hidden state is something the observation does not show: a leaky integral of the velocity
tracking error (commanded vx, vy and yaw rate minus the measured ones, per step

    i_out = leak * i_in + (1 - leak) * (command - measured)

reset to zeros at the start of every episode), added, times `gain`, to the command the sample
policy (pinned to the target) is given. A PI loop around the sample policy: the integral pushes
the command up when the body lags it. The state is hidden (the observation has the last action,
not the integral), so a student over one observation can only approximate what it does, one over
a short history only estimate it, and a GRU can carry it. `bench/foreign.py` compiles it with
each student (`bench/RESULTS.md`, "Foreign fat policies").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xcompile.models.fat import pin
from xcompile.policy import body_descriptors, load_fat_checkpoint
from xcompile.sim.env import obs_dim, obs_layout
from xcompile.targets import load_robot

TOML = """format = "xcompile-interface/1"
observation = "obs"
action = "action"
family = "locomotion"          # made for {target}: the sample policy pinned to it

[recurrent]
[[recurrent.state]]            # the leaky integral of the velocity error (vx, vy, yaw rate)
input = "i_in"
output = "i_out"
shape = [3]
dtype = "float32"
reset = "zeros"
"""


class IntegralTeacher(nn.Module):
    def __init__(self, pinned: nn.Module, layout: list[tuple[str, int]], gain: float,
                 leak: float) -> None:
        super().__init__()
        at, start = {}, 0
        for name, width in layout:
            at[name], start = start, start + width
        self.pinned, self.gain, self.leak = pinned, gain, leak
        self.cmd, self.vel, self.ang = at["cmd_vx_vy_yaw"], at["lin_vel_b"], at["ang_vel_b_x0.25"]

    def forward(self, obs: torch.Tensor, i_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cmd
        cmd = obs[:, c:c + 3]
        measured = torch.cat([obs[:, self.vel:self.vel + 2],
                              obs[:, self.ang + 2:self.ang + 3] / 0.25], dim=1)
        i_out = self.leak * i_in + (1 - self.leak) * (cmd - measured)
        obs = torch.cat([obs[:, :c], cmd + self.gain * i_out, obs[:, c + 3:]], dim=1)
        return self.pinned(obs), i_out


def to_onnx(teacher: IntegralTeacher, n_obs: int) -> Any:
    """The teacher as an ONNX program: obs, i_in -> action, i_out, batch dynamic."""
    batch = torch.export.Dim("batch")
    prog = torch.onnx.export(teacher, (torch.zeros(2, n_obs), torch.zeros(2, 3)), dynamo=True,
                             input_names=["obs", "i_in"], output_names=["action", "i_out"],
                             dynamic_shapes={"obs": {0: batch}, "i_in": {0: batch}},
                             opset_version=17, external_data=False, verbose=False)
    assert prog is not None
    return prog


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoint", default="examples/fat_policy.pt")
    ap.add_argument("--target", default="a1")
    ap.add_argument("--gain", type=float, default=1.0)
    ap.add_argument("--leak", type=float, default=0.98)
    a = ap.parse_args(argv)
    robot = load_robot(a.target)
    if robot.family != "locomotion":
        sys.exit(f"{a.target} is a {robot.family} robot; the integral acts on a velocity command")
    ckpt = load_fat_checkpoint(a.checkpoint, robot)
    pinned = pin(ckpt.model, body_descriptors(ckpt, robot)[0], robot.family).eval()
    teacher = IntegralTeacher(pinned, obs_layout(robot), a.gain, a.leak).eval()
    a.out.mkdir(parents=True, exist_ok=True)
    to_onnx(teacher, obs_dim(robot)).save(str(a.out / "teacher.onnx"))
    (a.out / "teacher.toml").write_text(TOML.format(target=a.target))
    print(f"wrote {a.out / 'teacher.onnx'} and {a.out / 'teacher.toml'}")


if __name__ == "__main__":
    main()
