"""Training on the ONNX graph itself: the graph as a differentiable PyTorch module
(``onnx_to_torch``) and the distillation loop that trains its float weights (``distillation``).

PyTorch is an optional extra (``pip install -e ".[train]"``). Nothing here imports it at import
time, so ``import sculpt`` works without it; :func:`require_torch` is the one place that says what
to install when it is missing.
"""

from __future__ import annotations

from sculpt.errors import SculptError

TRAIN_EXTRA_HINT = "pip install -e \".[train]\" (PyTorch CPU: pip install torch==2.13.0)"


class TrainingUnavailable(SculptError):
    """PyTorch, the training engine, is not installed."""


def require_torch(what: str = "training"):
    """The ``torch`` module, or a one-line TrainingUnavailable naming the extra to install."""
    try:
        import torch
    except ImportError:
        raise TrainingUnavailable(f"{what} needs PyTorch, which is not installed: {TRAIN_EXTRA_HINT}") from None
    return torch
