"""`python -m xcompile` is the `xcompile` command."""

from xcompile.cli import app

app(prog_name="xcompile")
