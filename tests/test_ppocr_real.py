"""canonicalize on the real PP-OCR models (rapidocr-onnxruntime wheel), compared in onnxruntime,
then imported into TVM Relax, compiled for llvm and run against onnxruntime."""

import numpy as np
import onnx
import pytest

from sculpt.runtime import compare_models
from sculpt.ir.cost import cost_of
from sculpt.models import PPOCR_SHAPES, ppocr_model
from sculpt.passes import Pipeline
from sculpt.textdata import text_input

KINDS = ["det", "rec", "cls"]


def image_like(shape, seed):
    """Rendered text, preprocessed as PP-OCR does: real activations, so that the det model's
    probability map is not all near zero (random noise gives outputs ~1e-4 and meaningless ratios)."""
    return {"x": text_input(shape, seed)}


@pytest.fixture(scope="module")
def canonical():
    out = {}
    for kind in KINDS:
        original = ppocr_model(kind)
        res = Pipeline.from_specs(["canonicalize"], input_shapes={"x": PPOCR_SHAPES[kind]}, verify_each=True,
                                  statistics=False).run(original)
        out[kind] = (original, res.model, res.records[0])
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_ppocr_equals_original(canonical, kind, tmp_path):
    original, model, record = canonical[kind]
    feeds = [image_like(PPOCR_SHAPES[kind], s) for s in range(2)]
    cmp = compare_models(original, model, feeds)
    assert cmp.max_rel <= 1e-4, cmp.as_dict()
    path = tmp_path / f"{kind}.onnx"
    model.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"BatchNormalization", "Identity", "Constant", "Shape", "Dropout"}, ops
    before = cost_of(original, {"x": PPOCR_SHAPES[kind]})
    after = cost_of(model)
    assert after.params <= before.params and after.macs <= before.macs
    assert not after.unknown_macs
    assert len(model.graph.node) < len(original.graph.node) / 1.5


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_ppocr_compiles_and_runs_in_tvm(canonical, kind):
    from sculpt.runtime import run
    from sculpt.backends.tvm import build, import_to_relax, run_relax

    _, model, _ = canonical[kind]
    mod = import_to_relax(model)
    exe = build(mod, "llvm")
    feeds = image_like(PPOCR_SHAPES[kind], 7)
    got = run_relax(exe, feeds, model.input_names)
    ref = list(run(model, feeds).values())
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(r).max())))


def test_original_ppocr_is_rejected_by_tvm_without_canonicalize():
    """The reason canonicalize exists: Relax's importer rejects the computed Reshape of rec and cls."""
    from sculpt.backends.tvm import import_to_relax
    from sculpt.backends.tvm.relax_import import TVMImportError

    with pytest.raises(TVMImportError, match="canonicalize"):
        import_to_relax(ppocr_model("cls"), {"x": PPOCR_SHAPES["cls"]})
