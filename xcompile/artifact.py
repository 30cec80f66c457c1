"""Artifacts: what flows between passes.

An artifact is one policy file in one format plus what is needed to use and trust it: the robot it
is for, its I/O signature, free-form metadata and its lineage (the passes that made it). Its id is
a hash of its file's bytes and its metadata, so an artifact is immutable by construction and any
measurement of it can be cached under its id.

Formats:
    fat-checkpoint  the input: a fat multi-robot checkpoint (.pt / .safetensors)
    torch           a one-robot torch policy saved by `xcompile.models.slim.save_torch_policy`
    onnx            a one-robot ONNX graph, `obs` -> `action`, contract in its metadata
    tensorrt        a serialized TensorRT engine (.plan) beside its ONNX
    c               C99 source (policy.c, policy.h beside it) emitted from an ONNX policy
    fat-graph       the input: a foreign fat policy (.onnx, or .pt2 from torch.export) with its
                    validated interface description in `meta["interface"]` (xcompile.frontends)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("fat-checkpoint", "torch", "onnx", "tensorrt", "c", "fat-graph")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    format: str
    path: Path
    robot: str
    meta: dict[str, Any] = field(default_factory=dict)
    lineage: tuple[str, ...] = ()
    sha256: str = ""

    @classmethod
    def create(cls, format: str, path: str | Path, robot: str, meta: dict[str, Any] | None = None,
               lineage: tuple[str, ...] = ()) -> Artifact:
        if format not in FORMATS:
            raise ValueError(f"unknown artifact format {format!r}")
        path = Path(path)
        return cls(format, path, robot, dict(meta or {}), tuple(lineage), file_sha256(path))

    @property
    def id(self) -> str:
        blob = json.dumps({"sha": self.sha256, "format": self.format, "robot": self.robot,
                           "meta": self.meta, "lineage": self.lineage},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def n_bytes(self) -> int:
        return self.path.stat().st_size

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "path": str(self.path), "robot": self.robot,
                "meta": self.meta, "lineage": list(self.lineage), "sha256": self.sha256,
                "id": self.id}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Artifact:
        return cls(d["format"], Path(d["path"]), d["robot"], d.get("meta", {}),
                   tuple(d.get("lineage", ())), d["sha256"])
