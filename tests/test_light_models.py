"""The onnx wheel's light models with seeded weights (sculpt.models.light_model): as shipped every
weight is 0.02, so every channel is the same and a result compared with onnxruntime's proves nothing
about channel indexing."""

import numpy as np
import onnx
import pytest

from sculpt.models import backend_test_data_dir, light_model
from sculpt.ir.model import Model
from sculpt.runtime import make_session


def _output(model: Model) -> np.ndarray:
    shape = [int(d) for d in next(iter(model.input_shapes().values()))]
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    return make_session(model).run(None, {model.input_names[0]: x})[0]


@pytest.mark.parametrize("name", ["bvlc_alexnet", "inception_v1", "squeezenet"])
def test_a_light_model_with_seeded_weights_is_valid_and_its_output_depends_on_them(name):
    shipped = Model.load(backend_test_data_dir() / "light" / f"light_{name}.onnx")
    model = light_model(name)
    onnx.checker.check_model(model.proto, full_check=True)
    assert not any(n.op_type in ("Conv", "Gemm") and n.input[1] in model.producers() and
                   model.producers()[n.input[1]].op_type == "ConstantOfShape" for n in model.graph.node)
    before, after = _output(shipped), _output(model)
    assert np.ptp(before) == 0  # as shipped: a softmax of equal logits
    assert np.isfinite(after).all() and np.ptp(after) > 1e-4 * np.abs(after).max()
    assert not np.allclose(_output(light_model(name, seed=1)), after)  # the seed matters
    np.testing.assert_array_equal(_output(light_model(name)), after)  # and fixes them
