"""The ONNX-based IR: Model, cost model, calibration data."""

from sculpt.ir.model import Model
from sculpt.ir.cost import CostReport, LayerCost, cost_of
from sculpt.ir.calibration import CalibrationSet

__all__ = ["Model", "CostReport", "LayerCost", "cost_of", "CalibrationSet"]
