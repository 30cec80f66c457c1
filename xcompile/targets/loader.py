"""Find, read and load robot and hardware targets, and check the URDF a robot names.

A robot is named (`spot`, a file in `robots/`) or given as a path to a TOML file whose URDF lies
beside it; both give the same `RobotTarget`, so a body that ships with nobody is usable everywhere a
built-in one is. Validation errors name the file and the bad field.

Everything a target file says is untrusted input: files are read with a size limit and never
through a FIFO or device, the TOML is checked against the schema (`schema.py`), and the robot's URDF
is parsed as plain XML (`urdf.py`; bounded size, parsed once per file version) and must hold every
joint the TOML drives, before PyBullet sees anything: `check_robot_urdf` is the one gate to it.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
from pathlib import Path

from pydantic import ValidationError

from xcompile.errors import TargetError
from xcompile.targets.schema import (
    AIRFRAMES_DIR,
    HARDWARE_DIR,
    MAX_ABS_ANGLE,
    MAX_ACTION_CLIP,
    MAX_ACTION_SCALE,
    MAX_CONTROL_HZ,
    MAX_EPISODE_PHYSICS_STEPS,
    MAX_EPISODE_S,
    MAX_GAIN_KD,
    MAX_GAIN_KP,
    MAX_GAIT_HZ,
    MAX_GOAL_RANGE,
    MAX_HEIGHT_M,
    MAX_IDENT_LEN,
    MAX_LATENCY_US,
    MAX_MEMORY_MB,
    MAX_NAME_LEN,
    MAX_PATH_LEN,
    MAX_PHYSICS_HZ,
    MAX_SPEED_MPS,
    MAX_SUBSTEPS,
    MAX_TEXT_LEN,
    MAX_TOLERANCE_M,
    MAX_TOML_BYTES,
    MAX_TORQUE,
    MAX_URDF_BYTES,
    MAX_URDF_JOINTS,
    MAX_URDF_LINKS,
    MIN_CONTROL_HZ,
    NAME_PATTERN,
    ROBOTS_DIR,
    HardwareTarget,
    Joints,
    LocomotionTask,
    ReachTask,
    RobotTarget,
    show,
)
from xcompile.targets.urdf import MOVABLE_JOINT_TYPES, UrdfInfo, UrdfProblem, parse_urdf

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Names that lived here before the schema and the URDF parser had modules of their own.
__all__ = [
    "HARDWARE_DIR", "MAX_ABS_ANGLE", "MAX_ACTION_CLIP", "MAX_ACTION_SCALE", "MAX_CONTROL_HZ",
    "MAX_EPISODE_PHYSICS_STEPS", "MAX_EPISODE_S", "MAX_GAIN_KD", "MAX_GAIN_KP", "MAX_GAIT_HZ",
    "MAX_GOAL_RANGE", "MAX_HEIGHT_M", "MAX_IDENT_LEN", "MAX_LATENCY_US", "MAX_MEMORY_MB",
    "MAX_NAME_LEN", "MAX_PATH_LEN", "MAX_PHYSICS_HZ", "MAX_SPEED_MPS", "MAX_SUBSTEPS",
    "MAX_TEXT_LEN", "MAX_TOLERANCE_M", "MAX_TOML_BYTES", "MAX_TORQUE", "MAX_URDF_BYTES",
    "MAX_URDF_JOINTS", "MAX_URDF_LINKS", "MIN_CONTROL_HZ", "MOVABLE_JOINT_TYPES", "NAME_PATTERN",
    "ROBOTS_DIR", "HardwareTarget", "Joints", "LocomotionTask", "ReachTask", "RobotTarget",
    "UrdfInfo", "check_robot_urdf", "list_airframes", "list_hardware", "list_robots",
    "load_hardware", "load_robot", "tomllib", "urdf_info",
]


# ---------------------------------------------------------------------------------- files


def _stat_file(path: Path, what: str) -> os.stat_result:
    """stat `path` and require a regular file; every failure is one TargetError."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise TargetError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # name too long, not a directory, NUL byte, permissions
        raise TargetError(f"{show(str(path))}: cannot open {what} "
                          f"({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise TargetError(f"{path}: is a directory; give a {what} file")
    if not stat.S_ISREG(st.st_mode):
        raise TargetError(f"{path}: is not a regular file; give a {what} file")
    return st


def _read_bounded(path: Path, what: str, limit: int) -> tuple[bytes, os.stat_result]:
    st = _stat_file(path, what)
    if st.st_size > limit:
        raise TargetError(f"{path}: {what} is {st.st_size:,} bytes; at most {limit:,} bytes "
                          "allowed")
    try:
        # Non-blocking, and checked again on the open file: a path swapped for a FIFO or a device
        # after the stat above can neither block nor stream forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise TargetError(f"{path}: is not a regular file; give a {what} file")
            data = f.read(limit + 1)
    except OSError as e:
        raise TargetError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > limit:
        raise TargetError(f"{path}: {what} is over {limit:,} bytes; at most {limit:,} bytes "
                          "allowed")
    return data, st


def _read_toml(path: Path, what: str = "TOML") -> dict:
    data, _ = _read_bounded(path, what, MAX_TOML_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TargetError(f"{path}: not valid TOML (not UTF-8 text: {e.reason} at byte "
                          f"{e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise TargetError(f"{path}: not valid TOML (nested too deeply)") from None


def _validation_message(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid target"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def _resolve(name_or_path: str | Path, folder: Path | tuple[Path, ...], kind: str) -> Path:
    """A built-in target's TOML for a name, else the path given; one TargetError otherwise.

    A `Path`, or a string ending in `.toml` or holding a path separator, is a path. Any other string
    is a built-in name if it is one, else an existing regular file, else an error.
    """
    what = f"{kind} TOML"
    if isinstance(name_or_path, Path):
        path = name_or_path
    else:
        s = str(name_or_path)
        if not s or len(s) > MAX_PATH_LEN or "\x00" in s:
            raise TargetError(f"{show(s)} is not a {kind} target: give a built-in name "
                              f"({_builtins(folder)}) or a path to a {what} file")
        is_path = s.endswith(".toml") or "/" in s or os.sep in s or bool(os.altsep and
                                                                         os.altsep in s)
        if not is_path and NAME_PATTERN.fullmatch(s) and ".." not in s:
            for d in (folder if isinstance(folder, tuple) else (folder,)):
                if (d / f"{s}.toml").is_file():
                    return d / f"{s}.toml"
            if not _is_file(Path(s)):
                raise TargetError(
                    f"unknown {kind} target '{s}'. Built-in: {_builtins(folder)}. "
                    f"Or give a path to a {what} file."
                )
        elif not is_path and not _is_file(Path(s)):
            raise TargetError(
                f"{show(s)} is neither a built-in {kind} name (1-{MAX_NAME_LEN} letters, "
                f"digits, '_', '.', '-'; built-in: {_builtins(folder)}) nor a {what} file")
        path = Path(s)
    if len(str(path)) > MAX_PATH_LEN:
        raise TargetError(f"{show(str(path))}: path is longer than {MAX_PATH_LEN} characters")
    _stat_file(path, what)
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _builtins(folder: Path | tuple[Path, ...]) -> str:
    folders = folder if isinstance(folder, tuple) else (folder,)
    return ", ".join(sorted(p.stem for d in folders for p in d.glob("*.toml")))


# ---------------------------------------------------------------------------------- URDF


_parse_urdf = parse_urdf  # looked up here at each parse, so that a test can count the parses


@functools.lru_cache(maxsize=64)
def _urdf_info_cached(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> UrdfInfo:
    del dev, ino, size, mtime_ns  # cache key only: an edited file is parsed again
    data, _ = _read_bounded(Path(path), "URDF", MAX_URDF_BYTES)
    links, joints, child_links = _parse_urdf(data)
    return UrdfInfo(Path(path), links, joints, child_links)


def urdf_info(path: str | Path) -> UrdfInfo:
    """Parse and check a URDF file (cached by path, inode, size and mtime).

    Raises TargetError (naming the file) for anything PyBullet should not be handed.
    """
    path = Path(path)
    st = _stat_file(path, "URDF")
    if st.st_size > MAX_URDF_BYTES:
        raise TargetError(f"URDF {path} is {st.st_size:,} bytes; at most {MAX_URDF_BYTES:,} "
                          "bytes allowed")
    try:
        return _urdf_info_cached(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except UrdfProblem as e:
        raise TargetError(f"URDF {path} {e}") from None


def check_robot_urdf(robot: RobotTarget, where: str | Path | None = None) -> Path | None:
    """The robot's URDF path, after checking it fits the robot; raise TargetError otherwise.
    None for an airframe, which has no URDF (its TOML is all there is to check).

    The one gate before PyBullet: `sim.world.load_body` loads only a path returned from here.
    """
    if not robot.urdf:
        return None
    where = where or robot.source or robot.name
    try:
        path = robot.urdf_path()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, bad bytes
        raise TargetError(f"{where}: urdf {show(robot.urdf)} is not a usable path ({e})") from None
    if not _exists(path):
        raise TargetError(f"{where}: urdf '{robot.urdf}' not found at {path}")
    try:
        info = urdf_info(path)
    except TargetError as e:
        raise TargetError(f"{where}: urdf: {e}") from None
    movable = info.movable
    if not movable:
        raise TargetError(f"{where}: URDF {path} has no movable joints "
                          f"({', '.join(MOVABLE_JOINT_TYPES)})")
    types = dict(info.joints)
    for name in robot.joints.names:
        if name not in types:
            raise TargetError(
                f"{where}: joints.names: joint {show(name)} is not in URDF {path}; movable "
                f"joints there: {_preview(movable)}")
        if types[name] not in MOVABLE_JOINT_TYPES:
            raise TargetError(
                f"{where}: joints.names: joint {show(name)} of URDF {path} is of type "
                f"'{show(types[name])[1:-1]}', not movable ({', '.join(MOVABLE_JOINT_TYPES)})")
    if robot.family == "reach" and robot.task.ee_link not in info.child_links:
        why = "is the base link" if robot.task.ee_link in info.links else "is not a link"
        raise TargetError(f"{where}: task.ee_link: {show(robot.task.ee_link)} {why} of URDF "
                          f"{path}; give a link that a joint moves")
    return path


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _preview(names: list[str], n: int = 12) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ---------------------------------------------------------------------------------- API


def load_robot(name_or_path: str | Path) -> RobotTarget:
    """Load a built-in robot by name, or any robot TOML by path; URDF checked too."""
    path = _resolve(name_or_path, (ROBOTS_DIR, AIRFRAMES_DIR), "robot")
    data = _read_toml(path, "robot TOML")
    data["source"] = str(path.resolve())
    try:
        robot = RobotTarget.model_validate(data)
    except ValidationError as e:
        raise TargetError(_validation_message(path, e)) from None
    check_robot_urdf(robot, path)
    return robot


def load_hardware(name_or_path: str | Path) -> HardwareTarget:
    path = _resolve(name_or_path, HARDWARE_DIR, "hardware")
    data = _read_toml(path, "hardware TOML")
    data["source"] = str(path.resolve())
    try:
        return HardwareTarget.model_validate(data)
    except ValidationError as e:
        raise TargetError(_validation_message(path, e)) from None


def list_robots() -> list[str]:
    """The built-in jointed robots (locomotion and reach): the sample fat policy's bodies."""
    return sorted(p.stem for p in ROBOTS_DIR.glob("*.toml"))


def list_airframes() -> list[str]:
    """The built-in quadrotors."""
    return sorted(p.stem for p in AIRFRAMES_DIR.glob("*.toml"))


def list_hardware() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.toml"))
