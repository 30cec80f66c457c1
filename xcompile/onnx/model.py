"""Writing ONNX models: weights inside, atomically, and the same bytes for the same graph.

`metadata_props` (where the deployment contract lives, see `contract`) is read and written as a
plain dict, in sorted key order.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from xcompile.outdir import atomic_write


@contextlib.contextmanager
def quiet_exporter(*more_loggers: str) -> Iterator[None]:
    """torch's ONNX exporter (and `more_loggers`) without its logs, prints and warnings, under
    no_grad: it reports a lot (opset conversion notes, missing torchvision ops); a failure still
    raises with its message."""
    import torch  # heavy: only where a graph is exported

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", *more_loggers)]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def strip_volatile(model: Any) -> None:
    """Drop what differs between machines for the same graph: doc strings, and node metadata
    (the dynamo exporter stores stack traces with absolute paths there)."""
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for fn in model.functions:
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]


def get_metadata(model: Any) -> dict[str, str]:
    """`model.metadata_props` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: Any, props: Mapping[str, str]) -> None:
    """Replace `model.metadata_props` by `props`, in sorted key order (deterministic bytes)."""
    del model.metadata_props[:]
    for key in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, props[key]


def save_onnx(model: Any, path: Path) -> Path:
    """Write an ONNX model (weights inside) atomically; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, model.SerializeToString())
    return path
