"""Typed loader for robot and hardware TOML files.

A robot is named (`spot`, a file in `robots/`) or given as a path to a TOML file whose URDF lies
beside it; both give the same `RobotTarget`, so a body that ships with nobody is usable everywhere a
built-in one is. Validation errors name the file and the bad field.

Everything a target file says is treated as untrusted input and checked here, before any work and
before PyBullet sees anything: names are names (a robot's name becomes the output folder
`build/<name>`), every number is finite and inside a stated range, and the URDF is parsed as plain
XML (no DTD, bounded size, bounded number of links and joints, a tree, finite numbers) and must hold
every joint the TOML drives. The limits below are far above every real robot's values (see the
built-in TOMLs) and far below what would hang or crash the simulator.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from xml.parsers import expat

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from xcompile.errors import TargetError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).parent
ROBOTS_DIR = HERE / "robots"
HARDWARE_DIR = HERE / "hardware"

# ---------------------------------------------------------------------------------- limits
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_NAME_LEN = 64
MAX_PATH_LEN = 4096              # PATH_MAX on Linux
MAX_TOML_BYTES = 1_000_000       # the built-in TOMLs are ~1.5 kB
MAX_URDF_BYTES = 20_000_000      # pybullet_data's largest robot URDFs are well under 1 MB
MAX_URDF_JOINTS = 256            # real robots: 6-30; PyBullet tracebacks at ~1,000, segfaults at 10k
MAX_URDF_LINKS = 512
MAX_TEXT_LEN = 2000              # description
MAX_IDENT_LEN = 256              # joint and link names

MAX_ABS_ANGLE = 2 * math.pi      # default pose, rad
MAX_GAIN_KP = 1e5                # Nm/rad   (built-ins: 20-300)
MAX_GAIN_KD = 1e4                # Nm s/rad (built-ins: 0.5-15)
MAX_TORQUE = 1e5                 # Nm       (built-ins: 12-176)
MAX_ACTION_SCALE = 2 * math.pi   # rad per unit of action (built-ins: 0.25, 1.0)
MAX_ACTION_CLIP = 100.0          # (built-ins: 3.2, 4.0)
MIN_CONTROL_HZ, MAX_CONTROL_HZ = 1.0, 1000.0    # built-ins: 50
MAX_PHYSICS_HZ = 10_000.0                       # built-ins: 500
MAX_SUBSTEPS = 100               # physics steps per control step (built-ins: 10)
MAX_EPISODE_S = 120.0            # built-ins: 3-4 s
# Physics steps in one episode (episode_s x physics_hz): 120 s at 2 kHz, ~20 s of CPU at the
# ~80 us a PD-controlled physics step takes here. Built-ins: 1,500-2,000.
MAX_EPISODE_PHYSICS_STEPS = 240_000
MAX_GAIT_HZ = 50.0               # built-ins: 2
MAX_SPEED_MPS = 10.0             # commanded forward speed (built-ins: 0.3-0.6)
MAX_HEIGHT_M = 10.0              # spawn height (built-ins: 0.30-0.54)
MAX_TOLERANCE_M = 1.0            # reach success radius (built-ins: 0.05)
MAX_GOAL_RANGE = math.pi         # rad (built-ins: 0.6)
MAX_LATENCY_US = 1e7             # 10 s (built-ins: 200, 500)
MAX_MEMORY_MB = 1e6              # 1 TB (built-ins: 512, 1024)

MOVABLE_JOINT_TYPES = ("revolute", "continuous", "prismatic")


def _check_name(v: str) -> str:
    if not NAME_PATTERN.fullmatch(v) or ".." in v:
        raise ValueError(
            f"{_show(v)} is not a valid name: use 1-{MAX_NAME_LEN} letters, digits, '_', '.' or "
            "'-', starting with a letter or digit, no '..' and no path separators (the name "
            "becomes a folder, build/<name>)")
    return v


def _show(s: str, n: int = 60) -> str:
    """A user-given string for a message: quoted, escaped, cut short."""
    r = repr(s)
    return r if len(r) <= n else r[: n - 5] + "...'" + f" ({len(s)} characters)"


def _check_path_text(v: str) -> str:
    if any(ord(c) < 32 or c == "\x7f" for c in v):
        raise ValueError(f"{_show(v)} has control characters; give a plain path")
    return v


Name = Annotated[str, AfterValidator(_check_name)]
PathText = Annotated[str, AfterValidator(_check_path_text)]
Ident = Annotated[str, Field(min_length=1, max_length=MAX_IDENT_LEN)]


def _num(**limits: float):
    """A finite number (int or float in the TOML, never a string or bool) within `limits`."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **limits)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Joints(_Strict):
    names: list[Ident] = Field(min_length=1, max_length=MAX_URDF_JOINTS,
                               description="movable URDF joints, in policy order")
    default: list[_num(ge=-MAX_ABS_ANGLE, le=MAX_ABS_ANGLE)] = Field(
        max_length=MAX_URDF_JOINTS, description="default pose, rad, one per joint")
    kp: list[_num(ge=0, le=MAX_GAIN_KP)] = Field(
        max_length=MAX_URDF_JOINTS, description="PD stiffness, Nm/rad, one per joint")
    kd: list[_num(ge=0, le=MAX_GAIN_KD)] = Field(
        max_length=MAX_URDF_JOINTS, description="PD damping, Nm s/rad, one per joint")
    torque_limit: list[_num(gt=0, le=MAX_TORQUE)] = Field(
        max_length=MAX_URDF_JOINTS, description="torque limit, Nm, one per joint")
    action_scale: _num(gt=0, le=MAX_ACTION_SCALE) = Field(
        description="rad of target offset per unit of action")
    action_clip: _num(gt=0, le=MAX_ACTION_CLIP) = Field(
        description="actions are clipped to [-clip, clip]")

    @model_validator(mode="after")
    def _lengths(self) -> Joints:
        n = len(self.names)
        for field in ("default", "kp", "kd", "torque_limit"):
            if len(getattr(self, field)) != n:
                raise ValueError(
                    f"joints.{field} has {len(getattr(self, field))} values, "
                    f"joints.names has {n}: give one per joint"
                )
        if len(set(self.names)) != n:
            raise ValueError("joints.names has duplicates")
        return self


class LocomotionTask(_Strict):
    family: Literal["locomotion"]
    episode_s: _num(gt=0, le=MAX_EPISODE_S) = Field(description="episode length, s")
    command_vx_mps: tuple[_num(gt=0, le=MAX_SPEED_MPS), _num(gt=0, le=MAX_SPEED_MPS)] = Field(
        description="range (lo, hi) of commanded forward speed")
    gait_hz: _num(gt=0, le=MAX_GAIT_HZ) = Field(
        description="gait clock frequency given to the policy")
    spawn_height_m: _num(gt=0, le=MAX_HEIGHT_M) = Field(description="base height at reset")
    fall_height_m: _num(gt=0, le=MAX_HEIGHT_M) = Field(
        description="base below this height counts as a fall")

    @model_validator(mode="after")
    def _order(self) -> LocomotionTask:
        lo, hi = self.command_vx_mps
        if lo > hi:
            raise ValueError(f"task.command_vx_mps is a range [lo, hi] with lo <= hi; got "
                             f"[{lo:g}, {hi:g}]")
        if self.fall_height_m >= self.spawn_height_m:
            raise ValueError(f"task.fall_height_m ({self.fall_height_m:g}) must be below "
                             f"task.spawn_height_m ({self.spawn_height_m:g}), or every episode "
                             "starts as a fall")
        return self


class ReachTask(_Strict):
    family: Literal["reach"]
    episode_s: _num(gt=0, le=MAX_EPISODE_S)
    ee_link: Ident = Field(description="URDF link whose origin must reach the goal")
    tolerance_m: _num(gt=0, le=MAX_TOLERANCE_M) = Field(description="success radius")
    goal_joint_range: _num(gt=0, le=MAX_GOAL_RANGE) = Field(
        description="goals are FK of default pose +- this (rad), so always reachable"
    )


class RobotTarget(_Strict):
    name: Name
    description: str = Field(default="", max_length=MAX_TEXT_LEN)
    urdf: PathText = Field(min_length=1, max_length=MAX_PATH_LEN,
                      description="'pybullet_data:REL' or a path relative to the TOML file")
    fixed_base: StrictBool
    gravity_compensation: StrictBool = Field(
        default=False, description="the robot's own controller adds gravity torques (arms)"
    )
    control_hz: _num(ge=MIN_CONTROL_HZ, le=MAX_CONTROL_HZ)
    physics_hz: _num(ge=MIN_CONTROL_HZ, le=MAX_PHYSICS_HZ)
    hardware: Name = Field(default="cpu", description="default hardware target (a built-in name)")
    joints: Joints
    task: LocomotionTask | ReachTask = Field(discriminator="family")
    source: str = Field(default="", description="where the TOML was loaded from (set by loader)")

    @model_validator(mode="after")
    def _rates(self) -> RobotTarget:
        ratio = self.physics_hz / self.control_hz
        k = round(ratio)
        if k < 1 or abs(ratio - k) > 1e-9 * ratio:
            raise ValueError(f"physics_hz ({self.physics_hz:g}) must be a whole multiple of "
                             f"control_hz ({self.control_hz:g})")
        if k > MAX_SUBSTEPS:
            raise ValueError(f"physics_hz / control_hz is {k}; at most {MAX_SUBSTEPS} physics "
                             "steps per control step")
        steps = round(self.task.episode_s * self.control_hz)
        if steps < 1:
            raise ValueError(f"task.episode_s ({self.task.episode_s:g}) is shorter than one "
                             f"control step (control_hz {self.control_hz:g})")
        if steps * k > MAX_EPISODE_PHYSICS_STEPS:
            raise ValueError(f"task.episode_s x physics_hz is {steps * k:,} physics steps per "
                             f"episode; at most {MAX_EPISODE_PHYSICS_STEPS:,} (e.g. "
                             f"{MAX_EPISODE_S:g} s at {MAX_EPISODE_PHYSICS_STEPS / MAX_EPISODE_S:g} "
                             "Hz): shorten the episode or lower physics_hz")
        return self

    @property
    def n_joints(self) -> int:
        return len(self.joints.names)

    @property
    def family(self) -> str:
        return self.task.family

    @property
    def substeps(self) -> int:
        """Physics steps per control step (validated: a whole number in [1, MAX_SUBSTEPS])."""
        return max(1, round(self.physics_hz / self.control_hz))

    @property
    def episode_steps(self) -> int:
        """Control steps per episode (validated: at least 1)."""
        return max(1, round(self.task.episode_s * self.control_hz))

    def urdf_path(self) -> Path:
        if self.urdf.startswith("pybullet_data:"):
            import pybullet_data

            return Path(pybullet_data.getDataPath()) / self.urdf.split(":", 1)[1]
        base = Path(self.source).parent if self.source else ROBOTS_DIR
        return (base / self.urdf).resolve()


class HardwareTarget(_Strict):
    name: Name
    description: str = Field(default="", max_length=MAX_TEXT_LEN)
    runtime: Literal["onnxruntime-cpu", "tensorrt"]
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(min_length=1, max_length=3)
    latency_budget_us: _num(gt=0, le=MAX_LATENCY_US)
    memory_mb: _num(gt=0, le=MAX_MEMORY_MB)
    source: str = ""


# ---------------------------------------------------------------------------------- files


def _stat_file(path: Path, what: str) -> os.stat_result:
    """stat `path` and require a regular file; every failure is one TargetError."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise TargetError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # name too long, not a directory, NUL byte, permissions
        raise TargetError(f"{_show(str(path))}: cannot open {what} "
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


def _resolve(name_or_path: str | Path, folder: Path, kind: str) -> Path:
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
            raise TargetError(f"{_show(s)} is not a {kind} target: give a built-in name "
                              f"({_builtins(folder)}) or a path to a {what} file")
        is_path = s.endswith(".toml") or "/" in s or os.sep in s or bool(os.altsep and
                                                                         os.altsep in s)
        if not is_path and NAME_PATTERN.fullmatch(s) and ".." not in s:
            builtin = folder / f"{s}.toml"
            if builtin.is_file():
                return builtin
            if not _is_file(Path(s)):
                raise TargetError(
                    f"unknown {kind} target '{s}'. Built-in: {_builtins(folder)}. "
                    f"Or give a path to a {what} file."
                )
        elif not is_path and not _is_file(Path(s)):
            raise TargetError(
                f"{_show(s)} is neither a built-in {kind} name (1-{MAX_NAME_LEN} letters, "
                f"digits, '_', '.', '-'; built-in: {_builtins(folder)}) nor a {what} file")
        path = Path(s)
    if len(str(path)) > MAX_PATH_LEN:
        raise TargetError(f"{_show(str(path))}: path is longer than {MAX_PATH_LEN} characters")
    _stat_file(path, what)
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _builtins(folder: Path) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob("*.toml")))


# ---------------------------------------------------------------------------------- URDF


@dataclass(frozen=True)
class UrdfInfo:
    """What the loader needs to know of a URDF, read as plain XML (no PyBullet)."""

    path: Path
    links: frozenset[str]
    joints: tuple[tuple[str, str], ...]     # (name, type) in file order
    child_links: frozenset[str]             # links with a PyBullet link index (a joint's child)

    @property
    def movable(self) -> list[str]:
        return [n for n, t in self.joints if t in MOVABLE_JOINT_TYPES]


class _UrdfProblem(Exception):
    """Internal: what is wrong with a URDF, without the file name."""


# Attributes whose values are numbers (space-separated), by element, anywhere in a link or joint.
_NUMERIC = {
    "origin": ("xyz", "rpy"), "axis": ("xyz",), "mass": ("value",),
    "inertia": ("ixx", "ixy", "ixz", "iyy", "iyz", "izz"),
    "limit": ("lower", "upper", "effort", "velocity"), "dynamics": ("damping", "friction"),
    "box": ("size",), "cylinder": ("radius", "length"), "sphere": ("radius",),
    "capsule": ("radius", "length"), "mesh": ("scale",),
    "safety_controller": ("soft_lower_limit", "soft_upper_limit", "k_position", "k_velocity"),
}


def _parse_urdf(data: bytes) -> tuple[frozenset[str], tuple[tuple[str, str], ...],
                                      frozenset[str]]:
    """Stream-parse URDF bytes with expat; stop at the first problem (or past the limits)."""
    # PyBullet's XML reader takes an XML declaration after comments or blank lines and ignores
    # what follows the root element (pybullet_data has both); blank the declaration out (same
    # length, so line numbers hold) and stop at the root's end.
    data = _XML_DECL.sub(lambda m: b" " * len(m.group()), data)
    parser = expat.ParserCreate(encoding="utf-8")
    links: list[str] = []
    joints: list[tuple[str, str]] = []
    edges: list[tuple[str, str | None, str | None]] = []   # (joint, parent, child)
    stack: list[str] = []
    current: dict[str, str | None] = {}
    done = []

    def refuse_dtd(*_args) -> None:
        raise _UrdfProblem("has a DOCTYPE or ENTITY declaration; a URDF needs none and xcompile "
                           "refuses them (entity expansion)")

    def start(tag: str, attrs: dict[str, str]) -> None:
        depth = len(stack)
        stack.append(tag)
        if depth == 0:
            if tag != "robot":
                raise _UrdfProblem(f"root element is <{_show(tag, 40)[1:-1]}>, not <robot>")
            return
        if depth == 1 and tag == "link":
            name = attrs.get("name")
            if not name:
                raise _UrdfProblem(f"a <link> has no name (line {parser.CurrentLineNumber})")
            links.append(name)
            if len(links) > MAX_URDF_LINKS:
                raise _UrdfProblem(f"has more than {MAX_URDF_LINKS} links; at most "
                                   f"{MAX_URDF_LINKS} allowed")
        elif depth == 1 and tag == "joint":
            name, jtype = attrs.get("name"), attrs.get("type")
            if not name or not jtype:
                raise _UrdfProblem(f"a <joint> has no name or no type (line "
                                   f"{parser.CurrentLineNumber})")
            joints.append((name, jtype))
            if len(joints) > MAX_URDF_JOINTS:
                raise _UrdfProblem(f"has more than {MAX_URDF_JOINTS} joints; at most "
                                   f"{MAX_URDF_JOINTS} allowed")
            current.clear()
            current.update(joint=name, parent=None, child=None)
        elif depth == 2 and stack[1] == "joint" and tag in ("parent", "child"):
            current[tag] = attrs.get("link")
        if depth >= 2 and stack[1] in ("link", "joint") and tag in _NUMERIC:
            for attr in _NUMERIC[tag]:
                if attr in attrs:
                    _finite_numbers(tag, attr, attrs[attr], parser.CurrentLineNumber)

    def end(tag: str) -> None:
        stack.pop()
        if not stack:
            done.append(True)
        if len(stack) == 1 and tag == "joint":
            edges.append((current["joint"], current["parent"], current["child"]))

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        if not done:  # junk after </robot> is ignored, as PyBullet does
            raise _UrdfProblem(f"is not well-formed XML ({expat.ErrorString(e.code)}, line "
                               f"{e.lineno}, column {e.offset})") from None
    except RecursionError:  # pragma: no cover - expat does not recurse; be safe
        raise _UrdfProblem("is nested too deeply") from None

    link_set = set(links)
    if len(link_set) != len(links):
        dup = next(n for n in links if links.count(n) > 1)
        raise _UrdfProblem(f"defines link {_show(dup)} twice")
    names = [n for n, _ in joints]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _UrdfProblem(f"defines joint {_show(dup)} twice")
    if not links:
        raise _UrdfProblem("has no <link>")
    parent_of: dict[str, str] = {}
    children: dict[str, list[str]] = {}
    for joint, parent, child in edges:
        for role, link in (("parent", parent), ("child", child)):
            if link not in link_set:
                raise _UrdfProblem(f"joint {_show(joint)}: {role} link "
                                   f"{_show(link or '')} is not a <link> of the file")
        if child in parent_of:
            raise _UrdfProblem(f"link {_show(child)} is the child of two joints")
        parent_of[child] = parent
        children.setdefault(parent, []).append(child)
    roots = [n for n in links if n not in parent_of]
    if len(roots) != 1:
        raise _UrdfProblem(f"is not one tree of links: {len(roots)} root links "
                           f"({', '.join(_show(r) for r in roots[:5])})")
    seen, todo = set(), [roots[0]]
    while todo:
        link = todo.pop()
        seen.add(link)
        todo.extend(children.get(link, []))
    if len(seen) != len(links):
        raise _UrdfProblem("is not one tree of links: its joints form a loop")
    return frozenset(links), tuple(joints), frozenset(parent_of)


_XML_DECL = re.compile(rb"<\?xml\s[^>]*\?>")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _finite_numbers(tag: str, attr: str, value: str, line: int) -> None:
    # Plain decimals only: C's strtod, which PyBullet uses, also reads 'nan', 'inf' and hex floats.
    for tok in value.replace(",", " ").split():
        if not (_DECIMAL.fullmatch(tok) and math.isfinite(float(tok))):
            raise _UrdfProblem(f"<{tag} {attr}={_show(value, 40)}> (line {line}) is not a list "
                               "of finite numbers")


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
    except _UrdfProblem as e:
        raise TargetError(f"URDF {path} {e}") from None


def check_robot_urdf(robot: RobotTarget, where: str | Path | None = None) -> Path:
    """The robot's URDF path, after checking it fits the robot; raise TargetError otherwise.

    The one gate before PyBullet: `sim.world.load_body` loads only a path returned from here.
    """
    where = where or robot.source or robot.name
    try:
        path = robot.urdf_path()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, bad bytes
        raise TargetError(f"{where}: urdf {_show(robot.urdf)} is not a usable path ({e})") from None
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
                f"{where}: joints.names: joint {_show(name)} is not in URDF {path}; movable "
                f"joints there: {_preview(movable)}")
        if types[name] not in MOVABLE_JOINT_TYPES:
            raise TargetError(
                f"{where}: joints.names: joint {_show(name)} of URDF {path} is of type "
                f"'{_show(types[name])[1:-1]}', not movable ({', '.join(MOVABLE_JOINT_TYPES)})")
    if robot.family == "reach" and robot.task.ee_link not in info.child_links:
        why = "is the base link" if robot.task.ee_link in info.links else "is not a link"
        raise TargetError(f"{where}: task.ee_link: {_show(robot.task.ee_link)} {why} of URDF "
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
    path = _resolve(name_or_path, ROBOTS_DIR, "robot")
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
    return sorted(p.stem for p in ROBOTS_DIR.glob("*.toml"))


def list_hardware() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.toml"))
