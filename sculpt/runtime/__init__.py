"""The runtime layer: models run through onnxruntime, the reference every check compares with.

Sessions and runs (:mod:`sculpt.runtime.session`), the equivalence checker
(:mod:`sculpt.runtime.compare`), activation capture on calibration data and measured shapes
(:mod:`sculpt.runtime.capture`), layer inputs reached in network order (:mod:`sculpt.runtime.layer_inputs`).
Random inputs are made in the IR (:mod:`sculpt.ir.random_inputs`, nothing is run) and exported here too.

Importing this package installs :func:`~sculpt.runtime.capture.measured_shapes` as the cost model's way
to measure the shapes ONNX shape inference leaves unknown (the IR does not import this layer).
"""

from sculpt.errors import RuntimeFailure
from sculpt.ir.cost import set_shape_measurer
from sculpt.ir.random_inputs import MAX_RANDOM_INPUT_ELEMENTS, check_random_input_size, input_specs, random_inputs
from sculpt.runtime.capture import iter_activations, measured_shapes, sampled_activations
from sculpt.runtime.compare import Comparison, OutputError, compare_models, output_error
from sculpt.runtime.layer_inputs import LayerInputStream
from sculpt.runtime.session import interleaved_latency_ms, is_qdq_model, make_session, median_latency_ms, reference_session, run

set_shape_measurer(measured_shapes)

__all__ = ["Comparison", "LayerInputStream", "MAX_RANDOM_INPUT_ELEMENTS", "OutputError", "RuntimeFailure",
           "check_random_input_size", "compare_models", "input_specs", "interleaved_latency_ms", "is_qdq_model", "iter_activations",
           "make_session", "measured_shapes", "median_latency_ms", "output_error", "random_inputs", "reference_session",
           "run", "sampled_activations"]
