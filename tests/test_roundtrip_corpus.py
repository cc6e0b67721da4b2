"""Round trip on real models: load → canonicalize → save → reload → same outputs.

Every model of the onnx wheel's backend test data (light/, pytorch-converted/, pytorch-operator/,
simple/) runs with the inputs shipped beside it. The reference is onnxruntime; for models whose
opset onnxruntime no longer implements (old opset-1/6 kernels), onnx's reference evaluator runs
both models instead. Skips are listed with their reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sculpt.runtime import RuntimeFailure, make_session, output_error, run
from sculpt.ir.model import Model
from sculpt.models import backend_test_cases
from sculpt.passes import create_pass

CASES = backend_test_cases()
# models that no runtime here can execute, with the reason (an explained skip)
NOT_RUNNABLE = {
    "simple/test_gradient_of_add": "ai.onnx.preview.training Gradient is a training-only op: neither onnxruntime "
                                   "nor onnx's reference evaluator implements it",
    "simple/test_gradient_of_add_and_mul": "ai.onnx.preview.training Gradient is a training-only op",
}
EXACT_RTOL, EXACT_ATOL = 1e-5, 1e-6


def _feeds(case, model: Model) -> dict[str, np.ndarray]:
    arrays = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in case.input_paths]
    if arrays:
        return dict(zip(model.input_names, arrays))
    from sculpt.runtime import random_inputs

    return random_inputs(model, seed=0)


def _assert_same(case_id, ref_outputs, new_outputs):
    assert len(ref_outputs) == len(new_outputs), case_id
    for k, (a, b) in enumerate(zip(ref_outputs, new_outputs)):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind in "OUS":
            assert a.shape == b.shape and (a == b).all(), f"{case_id}: output {k} differs"
            continue
        err = output_error(str(k), b, a)
        assert err.shape_match, f"{case_id}: output {k} shape {b.shape} != {a.shape}"
        assert err.max_rel <= EXACT_RTOL or err.max_abs <= EXACT_ATOL, \
            f"{case_id}: output {k} max abs {err.max_abs:.3g}, relative {err.max_rel:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_canonicalize_round_trip(case, tmp_path):
    if case.id in NOT_RUNNABLE:
        pytest.skip(NOT_RUNNABLE[case.id])
    model = Model.load(case.model_path)
    result = create_pass("canonicalize")(model)
    out_path = tmp_path / "out.onnx"
    result.model.save(out_path)
    reloaded = Model.load(out_path)
    onnx.checker.check_model(str(out_path), full_check=True)
    reloaded.verify()
    feeds = _feeds(case, model)
    try:
        sess = make_session(model)
    except RuntimeFailure:
        sess = None
    if sess is not None:
        ref = list(run(model, feeds, session=sess).values())
        names = set(reloaded.input_names)
        new = list(run(reloaded, {k: v for k, v in feeds.items() if k in names}).values())
    else:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(model.proto).run(None, feeds)
        new = ReferenceEvaluator(reloaded.proto).run(None, {k: v for k, v in feeds.items()
                                                               if k in reloaded.input_names})
    _assert_same(case.id, ref, new)
    # canonicalization never grows the graph
    assert len(reloaded.graph.node) <= len(model.graph.node)
