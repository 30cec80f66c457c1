"""A URDF read as plain XML, never by PyBullet: what it holds, and whether PyBullet may be handed it.

`parse_urdf` stream-parses the bytes with expat and stops at the first problem: a DTD or entity
declaration (entity expansion), more links or joints than MAX_URDF_LINKS / MAX_URDF_JOINTS, a link
or joint without a name, a joint whose parent or child is not a link, links that do not form one
tree, or a number that is not a plain finite decimal (C's strtod, which PyBullet uses, also reads
'nan', 'inf' and hex floats). Reading the file, its size limit and the parse cache are `loader.py`'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

from xcompile.targets.schema import MAX_URDF_JOINTS, MAX_URDF_LINKS, show

MOVABLE_JOINT_TYPES = ("revolute", "continuous", "prismatic")


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


class UrdfProblem(Exception):
    """What is wrong with a URDF, without the file name (the loader adds it)."""


# Attributes whose values are numbers (space-separated), by element, anywhere in a link or joint.
_NUMERIC = {
    "origin": ("xyz", "rpy"), "axis": ("xyz",), "mass": ("value",),
    "inertia": ("ixx", "ixy", "ixz", "iyy", "iyz", "izz"),
    "limit": ("lower", "upper", "effort", "velocity"), "dynamics": ("damping", "friction"),
    "box": ("size",), "cylinder": ("radius", "length"), "sphere": ("radius",),
    "capsule": ("radius", "length"), "mesh": ("scale",),
    "safety_controller": ("soft_lower_limit", "soft_upper_limit", "k_position", "k_velocity"),
}
_XML_DECL = re.compile(rb"<\?xml\s[^>]*\?>")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # a plain decimal: no nan, inf, hex


def parse_urdf(data: bytes) -> tuple[frozenset[str], tuple[tuple[str, str], ...],
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
        raise UrdfProblem("has a DOCTYPE or ENTITY declaration; a URDF needs none and xcompile "
                          "refuses them (entity expansion)")

    def start(tag: str, attrs: dict[str, str]) -> None:
        depth = len(stack)
        stack.append(tag)
        if depth == 0:
            if tag != "robot":
                raise UrdfProblem(f"root element is <{show(tag, 40)[1:-1]}>, not <robot>")
            return
        if depth == 1 and tag == "link":
            name = attrs.get("name")
            if not name:
                raise UrdfProblem(f"a <link> has no name (line {parser.CurrentLineNumber})")
            links.append(name)
            if len(links) > MAX_URDF_LINKS:
                raise UrdfProblem(f"has more than {MAX_URDF_LINKS} links; at most "
                                  f"{MAX_URDF_LINKS} allowed")
        elif depth == 1 and tag == "joint":
            name, jtype = attrs.get("name"), attrs.get("type")
            if not name or not jtype:
                raise UrdfProblem(f"a <joint> has no name or no type (line "
                                  f"{parser.CurrentLineNumber})")
            joints.append((name, jtype))
            if len(joints) > MAX_URDF_JOINTS:
                raise UrdfProblem(f"has more than {MAX_URDF_JOINTS} joints; at most "
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
            raise UrdfProblem(f"is not well-formed XML ({expat.ErrorString(e.code)}, line "
                              f"{e.lineno}, column {e.offset})") from None
    except RecursionError:  # pragma: no cover - expat does not recurse; be safe
        raise UrdfProblem("is nested too deeply") from None

    link_set = set(links)
    if len(link_set) != len(links):
        dup = next(n for n in links if links.count(n) > 1)
        raise UrdfProblem(f"defines link {show(dup)} twice")
    names = [n for n, _ in joints]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UrdfProblem(f"defines joint {show(dup)} twice")
    if not links:
        raise UrdfProblem("has no <link>")
    parent_of: dict[str, str] = {}
    children: dict[str, list[str]] = {}
    for joint, parent, child in edges:
        for role, link in (("parent", parent), ("child", child)):
            if link not in link_set:
                raise UrdfProblem(f"joint {show(joint)}: {role} link "
                                  f"{show(link or '')} is not a <link> of the file")
        if child in parent_of:
            raise UrdfProblem(f"link {show(child)} is the child of two joints")
        parent_of[child] = parent
        children.setdefault(parent, []).append(child)
    roots = [n for n in links if n not in parent_of]
    if len(roots) != 1:
        raise UrdfProblem(f"is not one tree of links: {len(roots)} root links "
                          f"({', '.join(show(r) for r in roots[:5])})")
    seen, todo = set(), [roots[0]]
    while todo:
        link = todo.pop()
        seen.add(link)
        todo.extend(children.get(link, []))
    if len(seen) != len(links):
        raise UrdfProblem("is not one tree of links: its joints form a loop")
    return frozenset(links), tuple(joints), frozenset(parent_of)


def _finite_numbers(tag: str, attr: str, value: str, line: int) -> None:
    # Plain decimals only: C's strtod, which PyBullet uses, also reads 'nan', 'inf' and hex floats.
    for tok in value.replace(",", " ").split():
        if not (_DECIMAL.fullmatch(tok) and math.isfinite(float(tok))):
            raise UrdfProblem(f"<{tag} {attr}={show(value, 40)}> (line {line}) is not a list "
                              "of finite numbers")
