"""The onnxruntime reference under its former name: everything here lives in :mod:`sculpt.runtime`
(kept so that ``from sculpt.backends.ort import compare_models`` and the like keep working)."""

from sculpt.runtime import (MAX_RANDOM_INPUT_ELEMENTS, Comparison, OutputError, RuntimeFailure,
                            check_random_input_size, compare_models, make_session, median_latency_ms,
                            output_error, random_inputs, run)

__all__ = ["Comparison", "MAX_RANDOM_INPUT_ELEMENTS", "OutputError", "RuntimeFailure", "check_random_input_size",
           "compare_models", "make_session", "median_latency_ms", "output_error", "random_inputs", "run"]
