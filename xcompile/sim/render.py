"""Headless frames and rollout GIFs (PyBullet's TinyRenderer: no display, no GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from xcompile.errors import XCompileError
from xcompile.outdir import atomic_write_via


class RobotEnv(Protocol):
    """What a frame is drawn from (`xcompile.sim.env.RobotEnv` is one)."""

    p: Any
    cid: int
    body: int
    family: str


def frame(env: RobotEnv, width: int = 320, height: int = 240) -> np.ndarray:
    p, c = env.p, env.cid
    pos, _ = p.getBasePositionAndOrientation(env.body, physicsClientId=c)
    if env.family == "locomotion":
        target, dist, yaw, pitch = [pos[0], pos[1], 0.25], 1.6, 30, -20
    elif env.family == "quadrotor":     # the setpoint's neighbourhood, scaled to the airframe
        sp = env.setpoint
        target, dist, yaw, pitch = list(sp), max(0.8, 8 * max(env.af.size_m)), 30, -20
    else:
        target, dist, yaw, pitch = [pos[0] + 0.3, pos[1], 0.5], 1.8, 50, -25
    view = p.computeViewMatrixFromYawPitchRoll(target, dist, yaw, pitch, 0, 2,
                                               physicsClientId=c)
    proj = p.computeProjectionMatrixFOV(60, width / height, 0.05, 20, physicsClientId=c)
    img = p.getCameraImage(width, height, view, proj, renderer=p.ER_TINY_RENDERER,
                           physicsClientId=c)[2]
    rgb = np.asarray(img, dtype=np.uint8).reshape(height, width, 4)[:, :, :3].copy()
    if env.family == "reach":
        _mark_goal(env.goal, rgb, view, proj, width, height)
    elif env.family == "quadrotor":
        _mark_goal(env.setpoint, rgb, view, proj, width, height)
    return rgb


def _mark_goal(goal: np.ndarray, rgb: np.ndarray, view, proj, w: int, h: int) -> None:
    """Draw a goal (reach) or setpoint (quadrotor) as a red square (TinyRenderer shows no debug
    items)."""
    v = np.asarray(view).reshape(4, 4).T
    pr = np.asarray(proj).reshape(4, 4).T
    clip = pr @ v @ np.append(goal, 1.0)
    if clip[3] <= 0:
        return
    x = int((clip[0] / clip[3] * 0.5 + 0.5) * w)
    y = int((1 - (clip[1] / clip[3] * 0.5 + 0.5)) * h)
    rgb[max(0, y - 3): y + 4, max(0, x - 3): x + 4] = (220, 30, 30)


def write_gif(frames: list[np.ndarray], path: str | Path, fps: int = 12) -> None:
    """Write `frames` as an animated GIF at `path`, atomically (`outdir.atomic_write_via`), so a
    failure (disk full, Ctrl-C) leaves no partial GIF."""
    from PIL import Image  # heavy: only when a GIF is written

    if not frames:
        raise ValueError("write_gif needs at least one frame")
    path = Path(path)
    images = [Image.fromarray(f) for f in frames]

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                           duration=int(1000 / fps), loop=0, optimize=True)

    try:
        atomic_write_via(path, write, suffix=".tmp")
    except OSError as e:
        raise XCompileError(f"cannot write the GIF {path}: {e.strerror or e} (is its folder "
                            f"{path.parent} there and writable?)") from e
