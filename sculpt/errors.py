"""Errors that sculpt raises on bad input.

Every error a user can cause derives from :class:`SculptError`; its message is one line that names
the file, node, pass or option at fault. The CLI prints it and exits with a nonzero status.
"""

from __future__ import annotations


class SculptError(Exception):
    """Base class of the errors a user can cause (bad file, bad option, unsupported model)."""


class ModelLoadError(SculptError):
    """The file or bytes are not a loadable ONNX model."""


class InvalidModelError(SculptError):
    """The model loaded, but is not valid (checker failure or a broken sculpt invariant)."""


class ShapeError(SculptError):
    """An input shape is missing, dynamic where a static one is needed, or malformed."""


class OptionError(SculptError):
    """An unknown pass, an unknown option or an option value of the wrong type."""


class PassError(SculptError):
    """A pass cannot run on this model; the message names the pass and the node."""

    def __init__(self, pass_name: str, message: str, node: str | None = None):
        self.pass_name = pass_name
        self.node = node
        where = f" at node '{node}'" if node else ""
        super().__init__(f"pass '{pass_name}'{where}: {message}")


class VerificationError(SculptError):
    """An exact pass changed the model's outputs beyond its tolerance."""


class PipelineError(SculptError):
    """A pass failed inside a pipeline; names the passes that had already run."""

    def __init__(self, message: str, passes_run: list[str], cause: BaseException | None = None):
        self.passes_run = list(passes_run)
        self.cause = cause
        done = ", ".join(self.passes_run) if self.passes_run else "none"
        super().__init__(f"{message} (passes already run: {done})")


class CalibrationError(SculptError):
    """The calibration data is missing, unreadable or does not match the model's inputs."""


class RuntimeFailure(SculptError):
    """onnxruntime refused or failed to run the model (or no input data can be made for it)."""


class SculptWarning(UserWarning):
    """Something sculpt repaired or worked around and the user should know of (the CLI prints one
    ``sculpt: warning: ...`` line for each)."""
