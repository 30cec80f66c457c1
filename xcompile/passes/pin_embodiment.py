"""pin-embodiment: partial evaluation of the fat network on one robot body.

fat-checkpoint -> torch (kind "pinned"); fat-graph (a foreign fat policy, .onnx or .pt2) -> onnx,
by binding the body's embodiment inputs and folding them with onnxscript's optimizer
(`xcompile.frontends.pin`, which says how and what its check compares).

Cost: one pass of the descriptor encoder and a copy of the shared weights; seconds, no training.

Method: partial evaluation (constant folding). Everything that depends only on the body (the joint
descriptor embeddings, the family embedding) is computed once and stored as constants; other task
families' encoders and heads and the descriptor encoder are dropped; the joint count is fixed. The
descriptors come from the checkpoint's registry for a body it was trained on, or from the robot's
URDF for a body it never saw (zero-shot), exactly as the fat policy itself would be driven.

Check: the pinned policy (reloaded from its file) and the fat network act the same, to float
rounding, on random observations shaped like the robot's and on observations recorded in closed
loop on the target (episodes of seed stream "pin-check", `xcompile.seeds`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from xcompile.artifact import Artifact
from xcompile.errors import PassCheckError
from xcompile.evaluate import score_policy
from xcompile.frontends.pin import check_pinned, run_pinned
from xcompile.measure import count_params_bytes
from xcompile.models.fat import pin
from xcompile.models.slim import load_torch_policy, save_torch_policy, spec_of
from xcompile.passes.base import BuildContext, Pass, PassConfig, PassResult, register_pass
from xcompile.policy import body_descriptors, fat_act, load_fat_checkpoint
from xcompile.sim.observations import random_obs

CHECK_STREAM = "pin-check"   # the fat policy's closed-loop episodes the check compares on


class PinConfig(PassConfig):
    n_check_obs: int = Field(4096, ge=1, description="random observations the check compares on")
    check_episodes: int = Field(
        1, ge=0, description="closed-loop episodes of the fat policy whose observations are "
        "added to the check (0: random observations only)")
    tolerance: float = Field(1e-5, gt=0, description="largest allowed |pinned - fat| over all "
                             "check observations, in action units")


@register_pass
class PinEmbodiment(Pass):
    name = "pin-embodiment"
    version = 1
    input_format = "fat-checkpoint"
    output_format = "torch"
    input_formats = ("fat-checkpoint", "fat-graph")
    Config = PinConfig
    summary = "fold one body's descriptors into the fat network; drop what it does not use"

    @classmethod
    def output_for(cls, fmt: str) -> str:
        return "onnx" if fmt == "fat-graph" else cls.output_format

    def run(self, art: Artifact, cfg: PassConfig, ctx: BuildContext) -> PassResult:
        if art.format == "fat-graph":
            return run_pinned(art, ctx, (*art.lineage, self.name))
        ckpt = load_fat_checkpoint(art.path, ctx.robot)
        robot = ctx.robot
        desc, known = body_descriptors(ckpt, robot)
        pinned = pin(ckpt.model, desc, robot.family)
        spec = {**spec_of(pinned), "robot": robot.name, "joint_order": robot.actuators,
                "known_body": known, "source_checkpoint_sha256": ckpt.sha256}
        path = save_torch_policy(ctx.workdir / "pinned.pt", pinned, spec)
        return PassResult(Artifact.create("torch", path, robot.name,
                                          meta={"kind": "pinned", "family": robot.family,
                                                "known_body": known},
                                          lineage=(*art.lineage, self.name)))

    def check(self, inp: Artifact, result: PassResult, cfg: PassConfig,
              ctx: BuildContext) -> dict[str, Any]:
        out = result.artifact
        assert isinstance(cfg, PinConfig)
        if inp.format == "fat-graph":
            return check_pinned(inp, out, cfg.n_check_obs, cfg.check_episodes, cfg.tolerance,
                                ctx, CHECK_STREAM)
        ckpt = load_fat_checkpoint(inp.path, ctx.robot)
        robot = ctx.robot
        desc, known = body_descriptors(ckpt, robot)
        pinned = load_torch_policy(out.path)

        obs = [random_obs(robot, cfg.n_check_obs, seed=ctx.seed)]
        if cfg.check_episodes:
            res = score_policy(fat_act(ckpt.model, desc, robot.family), robot,
                               cfg.check_episodes, ctx.seed, stream=CHECK_STREAM,
                               record_obs=True)
            obs += res.observations
        x = torch.as_tensor(np.concatenate(obs))
        with torch.inference_mode():
            want = ckpt.model.act(x, torch.as_tensor(desc), robot.family)
            got = pinned(x)
        err = float((got - want).abs().max())
        if not err <= cfg.tolerance:  # also catches NaN
            raise PassCheckError(
                f"pin-embodiment: pinned policy differs from the fat policy on {robot.name} by "
                f"{err:.3g} (tolerance {cfg.tolerance:g}); this is a bug in pinning, please "
                "report it with the checkpoint")
        fat_pb, pin_pb = count_params_bytes(inp), count_params_bytes(out)
        return {"params_fat": fat_pb["params"], "params_pinned": pin_pb["params"],
                "params_removed": fat_pb["params"] - pin_pb["params"],
                "bytes_fat": fat_pb["bytes"], "bytes_pinned": pin_pb["bytes"],
                "bytes_removed": fat_pb["bytes"] - pin_pb["bytes"],
                "max_abs_err": err, "n_check_obs": int(x.shape[0]), "known_body": known,
                "zero_shot": not known}
