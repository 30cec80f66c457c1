"""The `xcompile` command line: a thin layer over the Python API.

`common` holds the app and what every command shares; `info` the commands that describe (targets,
inspect, passes, report, convert); `evaluate` the one that scores (eval); `run` the one that
compiles (build). Importing them registers their commands on the app.
"""

from xcompile.cli import evaluate, info, run  # noqa: F401  (registers the commands)
from xcompile.cli.common import app

__all__ = ["app"]
