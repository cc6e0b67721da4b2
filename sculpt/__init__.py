"""sculpt: a model-compression compiler for ONNX models."""

__version__ = "0.1.0"

from sculpt.errors import SculptError  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402
import sculpt.runtime  # noqa: E402,F401  (installs onnxruntime shape measurement into the cost model)

__all__ = ["Model", "SculptError", "__version__", "optimize"]


def __getattr__(name: str):
    """``sculpt.optimize(...)``: the Python form of `sculpt optimize` (sculpt.optimizer.optimize), imported
    when first used."""
    if name == "optimize":
        # the root package is the facade above every layer; lower modules import `sculpt` for __version__
        # only, so the top layer is imported by name when used, not at import time
        import importlib

        return importlib.import_module("sculpt.optimizer").optimize
    raise AttributeError(f"module 'sculpt' has no attribute '{name}'")
