"""One family of exceptions whose messages a user can act on.

The CLI prints these without a traceback and exits non-zero; any other exception is a bug and keeps
its traceback.
"""


class XCompileError(Exception):
    """Base class: the message says what is wrong and what to do."""

    exit_code = 2


class TargetError(XCompileError):
    """A robot or hardware target is unknown or malformed."""


class CheckpointError(XCompileError):
    """A checkpoint is missing, unsafe, truncated, foreign or of an unknown version."""


class InterfaceError(CheckpointError):
    """An interface description is invalid or does not fit the model or the target
    (`xcompile.frontends.interface`)."""


class PlanError(XCompileError):
    """A pass pipeline cannot run as written (unknown pass, wrong order, bad option)."""


class PassCheckError(XCompileError):
    """A pass ran but its result failed its own check."""

    exit_code = 3


class GateError(XCompileError):
    """A build finished but missed a deployment gate (latency, size, score)."""

    exit_code = 4


class ContractError(XCompileError):
    """A compiled policy was used for a robot it was not compiled for."""


class ToolUnavailable(XCompileError):
    """A pass needs a tool or device this machine lacks (TensorRT, a CUDA GPU).

    The pass manager decides whether that skips the pass (it was a default) or fails the build (the
    user asked for it explicitly).
    """


class UnsupportedModel(XCompileError):
    """A model uses operators or a structure that a back end cannot compile."""
