"""Joint descriptors: how a fat policy is told which body it drives.

Each joint becomes a token whose constant part is a vector of numbers read from the URDF (through
PyBullet's parser) and the robot TOML: where the joint sits and how it turns in the base frame at the
default pose, its limits, gains, torque limit and the mass it moves. Nothing here is a learned
per-body id, so a body the fat policy never saw is described the same way as a known one.
"""

from __future__ import annotations

import math

import numpy as np

from xcompile.errors import TargetError
from xcompile.targets import RobotTarget

DESC_FEATURES = (
    "pos_x", "pos_y", "pos_z",          # joint frame in base frame at default pose, m
    "axis_x", "axis_y", "axis_z",       # joint axis in base frame
    "lower", "upper",                   # limits, rad (clipped to +-pi)
    "default",                          # default angle, rad
    "log_kp", "log_kd", "log_torque",   # gains and torque limit, log10
    "log_child_mass",                   # log10 of the mass of the subtree the joint moves, kg
    "action_scale",                     # rad per unit of action
)
DESC_DIM = len(DESC_FEATURES)


def joint_descriptors(robot: RobotTarget) -> np.ndarray:
    """Return an (n_joints, DESC_DIM) float32 array for `robot`, in policy joint order."""
    import pybullet as p

    from xcompile.sim.world import load_body

    client = p.connect(p.DIRECT)
    try:
        body, joint_ids = load_body(client, robot)
        for jid, q0 in zip(joint_ids, robot.joints.default):
            p.resetJointState(body, jid, q0, physicsClientId=client)
        base_pos, base_orn = p.getBasePositionAndOrientation(body, physicsClientId=client)
        inv_pos, inv_orn = p.invertTransform(base_pos, base_orn)
        n_all = p.getNumJoints(body, physicsClientId=client)
        parents = {i: p.getJointInfo(body, i, physicsClientId=client)[16] for i in range(n_all)}
        masses = {i: p.getDynamicsInfo(body, i, physicsClientId=client)[0] for i in range(n_all)}

        def subtree_mass(link: int) -> float:
            kids = [c for c, par in parents.items() if par == link]
            return masses[link] + sum(subtree_mass(c) for c in kids)

        rows = []
        j = robot.joints
        for k, jid in enumerate(joint_ids):
            info = p.getJointInfo(body, jid, physicsClientId=client)
            state = p.getLinkState(body, jid, computeForwardKinematics=True,
                                   physicsClientId=client)
            # worldLinkFramePosition/Orientation: the URDF link frame, i.e. the joint frame.
            pos, orn = p.multiplyTransforms(inv_pos, inv_orn, state[4], state[5])
            rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
            axis = rot @ np.array(info[13])
            lo, hi = float(info[8]), float(info[9])
            if not lo < hi:  # continuous or unlimited joint
                lo, hi = -math.pi, math.pi
            rows.append([
                *pos, *axis,
                max(lo, -math.pi), min(hi, math.pi),
                j.default[k],
                # Floors keep log10 defined for kp = 0 (allowed) and any value the loader let by.
                math.log10(max(j.kp[k], 1e-3)), math.log10(max(j.kd[k], 1e-3)),
                math.log10(max(j.torque_limit[k], 1e-3)),
                math.log10(max(subtree_mass(jid), 1e-3)),
                j.action_scale,
            ])
        out = np.asarray(rows, dtype=np.float32)
        if not np.all(np.isfinite(out)):
            bad = sorted({DESC_FEATURES[c] for c in np.argwhere(~np.isfinite(out))[:, 1]})
            raise TargetError(f"{robot.name}: joint descriptors {bad} are not finite numbers; "
                              f"check the URDF {robot.urdf_path()} and the robot TOML")
        return out
    finally:
        p.disconnect(client)
