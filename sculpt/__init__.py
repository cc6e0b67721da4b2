"""sculpt: a model-compression compiler for ONNX models."""

__version__ = "0.1.0"

from sculpt.errors import SculptError  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402
import sculpt.runtime  # noqa: E402,F401  (installs onnxruntime shape measurement into the cost model)

__all__ = ["Model", "SculptError", "__version__"]
