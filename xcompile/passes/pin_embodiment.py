"""pin-embodiment: partial evaluation of the fat network on one robot body.

fat-checkpoint -> torch (kind "pinned"). Cost: one pass of the descriptor encoder and a copy of the
shared weights; seconds, no training.

Method: partial evaluation (constant folding). Everything that depends only on the body (the joint
descriptor embeddings, the family embedding) is computed once and stored as constants; other task
families' encoders and heads and the descriptor encoder are dropped; the joint count is fixed. The
descriptors come from the checkpoint's registry for a body it was trained on, or from the robot's
URDF for a body it never saw (zero-shot), exactly as the fat policy itself would be driven.

Check: the pinned policy (reloaded from its file) and the fat network act the same, to float
rounding, on random observations shaped like the robot's and on observations recorded in closed
loop on the target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from xcompile.artifact import Artifact
from xcompile.errors import PassCheckError, TargetError
from xcompile.passes.base import BuildContext, Pass, PassConfig, PassResult, register_pass


class PinConfig(PassConfig):
    n_check_obs: int = Field(4096, ge=1, description="random observations the check compares on")
    check_episodes: int = Field(
        1, ge=0, description="closed-loop episodes of the fat policy whose observations are "
        "added to the check (0: random observations only)")
    tolerance: float = Field(1e-5, gt=0, description="largest allowed |pinned - fat| over all "
                             "check observations, in action units")


def _load_fat(art: Artifact, ctx: BuildContext) -> Any:
    from xcompile.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(art.path)
    if ctx.robot.family not in ckpt.config.global_dims:
        raise TargetError(
            f"robot {ctx.robot.name!r} does {ctx.robot.family!r}, a task family the fat policy "
            f"{art.path.name} does not serve (it serves {ckpt.config.families}); pick a target "
            "of one of those families or a fat policy trained for it")
    return ckpt


@register_pass
class PinEmbodiment(Pass):
    name = "pin-embodiment"
    version = 1
    input_format = "fat-checkpoint"
    output_format = "torch"
    Config = PinConfig
    summary = "fold one body's descriptors into the fat network; drop what it does not use"

    def run(self, art: Artifact, cfg: PassConfig, ctx: BuildContext) -> PassResult:
        from xcompile.models.fat import pin
        from xcompile.models.slim import save_torch_policy, spec_of
        from xcompile.policy import body_descriptors

        ckpt = _load_fat(art, ctx)
        robot = ctx.robot
        desc, known = body_descriptors(ckpt, robot)
        pinned = pin(ckpt.model, desc, robot.family)
        spec = {**spec_of(pinned), "robot": robot.name, "joint_order": list(robot.joints.names),
                "known_body": known, "source_checkpoint_sha256": ckpt.sha256}
        path = save_torch_policy(ctx.workdir / "pinned.pt", pinned, spec)
        return PassResult(Artifact.create("torch", path, robot.name,
                                          meta={"kind": "pinned", "family": robot.family,
                                                "known_body": known},
                                          lineage=(*art.lineage, self.name)))

    def check(self, inp: Artifact, result: PassResult, cfg: PassConfig,
              ctx: BuildContext) -> dict[str, Any]:
        out = result.artifact
        import torch

        from xcompile.measure import count_params_bytes, random_obs, torch_single_thread
        from xcompile.models.slim import load_torch_policy
        from xcompile.policy import body_descriptors, fat_act

        assert isinstance(cfg, PinConfig)
        ckpt = _load_fat(inp, ctx)
        robot = ctx.robot
        desc, known = body_descriptors(ckpt, robot)
        pinned = load_torch_policy(out.path)

        obs = [random_obs(robot, cfg.n_check_obs, seed=ctx.seed)]
        if cfg.check_episodes:
            from xcompile.evaluate import evaluate

            fat_policy = fat_act(ckpt.model, desc, robot.family)
            with torch_single_thread():
                res = evaluate(fat_policy, robot, episodes=cfg.check_episodes, seed=ctx.seed,
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
