"""xcompile: compile a fat multi-robot policy into a slim policy for one robot."""

__version__ = "0.1.0"
