"""Dynamic shapes kept (issue 16 item 2): a model with a dynamic batch and width keeps both through
canonicalize, channel-pruning and qdq. Passes that need static shapes run at the working shapes (the
calibration samples' or --sample-shape) and their result declares the dynamic dimensions again
(sculpt.passes.working_shapes); only --input-shape freezes them.

Every output is checked the same way: it declares the symbolic dimensions, passes the full checker, and
runs in onnxruntime at two other (batch, width) pairs, where it matches the input model (exact passes
at 1e-5; lossy ones within the error they have at the calibration shape) and a batch of two gives each
line's own output."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sculpt.cli import main
from sculpt.errors import SculptError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, register, registered_temporarily
from sculpt.passes.pipeline import Pipeline
from sculpt.passes.simplify_shapes import SimplifyShapes
from sculpt.passes.working_shapes import FrozenShapesWarning, probe_shapes
from sculpt.runtime import compare_models, run
from tests.markers import needs_ppocr

WORKING = [1, 1, 16, 24]  # N, C, H, W of the calibration samples
OTHER = ([2, 1, 16, 40], [3, 1, 16, 8])  # two other batches and widths


def recognizer() -> Model:
    """A small CRNN-shaped text recognizer, dynamic in batch and width: two convs (BN, Relu), the
    height folded into the channels by a Reshape whose target is computed from Shape (as PyTorch's
    exporter writes it), a MatMul over the classes per column, Softmax. Output [N, W, 12]. The same
    weights on every call."""
    rng = np.random.default_rng(16)

    def f32(*shape, scale=1.0, low=None, high=None):
        if low is not None:
            return rng.uniform(low, high, shape).astype(np.float32)
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    target = [
        helper.make_node("Shape", ["r2"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0, name="batch"),
        helper.make_node("Gather", ["s", "i3"], ["w"], axis=0, name="width"),
        helper.make_node("Concat", ["n", "ch", "w"], ["target"], axis=0, name="target"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[4, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),  # [N, 16, 4, W]
        *target,
        helper.make_node("Reshape", ["r2", "target"], ["seq"], name="fold_height"),  # [N, 64, W]
        helper.make_node("Transpose", ["seq"], ["cols"], perm=[0, 2, 1], name="columns"),
        helper.make_node("MatMul", ["cols", "wc"], ["logits"], name="classes"),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax"),
    ]
    inits = {"w1": f32(16, 1, 3, 3, scale=0.5), "b1": f32(16, scale=0.1), "g1": f32(16, low=0.5, high=1.5),
             "be1": f32(16, scale=0.1), "m1": f32(16, scale=0.1), "v1": f32(16, low=0.5, high=1.5),
             "w2": f32(16, 16, 3, 3, scale=0.2), "b2": f32(16, scale=0.1), "wc": f32(64, 12, scale=0.3),
             "i0": np.array([0], np.int64), "i3": np.array([3], np.int64), "ch": np.array([64], np.int64)}
    graph = helper.make_graph(
        nodes, "recognizer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "W", 12])],
        initializer=[onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model(proto)


def lines(shape, seed) -> np.ndarray:
    """Text-like inputs: dark strokes (columns of varying ink) on a light background."""
    rng = np.random.default_rng(seed)
    ink = (rng.random((shape[0], 1, 1, shape[3])) < 0.4) * rng.random((shape[0], 1, shape[2], shape[3]))
    return (1.0 - ink + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def calibration(count=12) -> CalibrationSet:
    return CalibrationSet(count, lambda k: {"x": lines(WORKING, 100 + k)}, f"{count} lines", ["x"])


def declared_dims(model: Model, name: str) -> list:
    vi = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}[name]
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in vi.type.tensor_type.shape.dim]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def check_still_dynamic(original: Model, out: Model, lossy_error: float | None) -> None:
    """The output declares N and W, passes the full checker, and runs at two other shapes like the
    input model: exact (1e-5) for ``lossy_error`` None, else within 2x its error at the working shape
    (+0.01); each line of a batch of two gives its own output."""
    onnx.checker.check_model(out.proto, full_check=True)
    out.verify()
    x_dims, y_dims = declared_dims(out, "x"), declared_dims(out, "y")
    assert isinstance(x_dims[0], str) and isinstance(x_dims[3], str), x_dims
    assert isinstance(y_dims[0], str) and isinstance(y_dims[1], str), y_dims
    bound = 1e-5 if lossy_error is None else 2 * lossy_error + 0.01
    for k, shape in enumerate(OTHER):
        x = lines(shape, 7 + k)
        want, got = run(original, {"x": x})["y"], run(out, {"x": x})["y"]
        assert got.shape == want.shape == (shape[0], shape[3], 12)
        assert rel_error(got, want) <= bound, (shape, rel_error(got, want), bound)
        one = np.concatenate([run(out, {"x": x[i:i + 1]})["y"] for i in range(shape[0])])
        np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-6)


def test_canonicalize_keeps_batch_and_width():
    model = recognizer()
    out = Pipeline.from_specs(["canonicalize"], sample_shapes={"x": WORKING}).run(model).model
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)  # it did canonicalize
    # the Reshape's target, computed from Shape, is now the constant that copies N and infers W
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    assert list(out.get_constant(reshape.input[1])) == [0, 64, -1]
    assert not any(n.op_type == "Shape" for n in out.graph.node)
    check_still_dynamic(model, out, None)


@pytest.fixture(scope="module")
def pruned_and_quantized():
    """canonicalize, channel-pruning, qdq with calibration at WORKING, no --input-shape; and the same
    pipeline frozen at WORKING by input_shapes. (canonicalize gives the computed Reshape target the
    constant [0, 64, -1] in both, so the channel graph sees the same model and prunes conv2 alike.)"""
    specs = ["canonicalize", "channel-pruning:ratio=0.25,round_to=1,min_channels=4", "qdq:samples=8"]
    dynamic = Pipeline.from_specs(specs, calibration=calibration(), held_out=4).run(recognizer())
    frozen = Pipeline.from_specs(specs, calibration=calibration(), held_out=4,
                                 input_shapes={"x": WORKING}).run(recognizer())
    return dynamic, frozen


def test_channel_pruning_and_qdq_keep_batch_and_width(pruned_and_quantized):
    dynamic, frozen = pruned_and_quantized
    model = recognizer()
    out = dynamic.model
    pruned = [r for r in dynamic.records if r.name == "channel-pruning"][0]
    assert pruned.modified and pruned.cost_after["params"] < pruned.cost_before["params"]
    conv2 = next(n for n in out.graph.node if n.op_type == "Conv" and n.name == "conv2")
    assert out.tensor_shape(conv2.input[1])[0] < 16  # conv2, read by the Reshape, pruned too
    assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    held_out = [lines(WORKING, 200 + k) for k in range(4)]
    error = compare_models(model, out, [{"x": x} for x in held_out]).max_rel
    assert 0 < error < 0.5
    check_still_dynamic(model, out, error)
    # the same decisions as the pipeline frozen at the working shape: identical numbers there
    assert declared_dims(frozen.model, "x") == WORKING
    for x in held_out:
        np.testing.assert_array_equal(run(out, {"x": x})["y"], run(frozen.model, {"x": x})["y"])


def test_channel_pruning_alone_keeps_the_dims():
    after_pruning = Pipeline.from_specs(["channel-pruning:ratio=0.25,round_to=1,min_channels=4"],
                                        calibration=calibration(), held_out=4).run(recognizer()).model
    error = compare_models(recognizer(), after_pruning, [{"x": lines(WORKING, 300)}]).max_rel
    check_still_dynamic(recognizer(), after_pruning, error)


def test_working_shape_pass_without_shapes_names_both_ways():
    with pytest.raises(SculptError, match=r"dynamic shape \[N,1,16,W\].*--input-shape x=.*--sample-shape"):
        Pipeline.from_specs(["channel-pruning"]).run(recognizer())


@dataclasses.dataclass
class _FoldAllShapes(Pass):
    """A pass that bakes the working shape into constants (simplify-shapes at fixed shapes)."""

    name = "test-fold-all-shapes"
    exact = True
    needs_static_shapes = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return SimplifyShapes().run(model, ctx)


def test_a_result_that_bakes_in_the_working_shape_is_kept_frozen_with_a_warning():
    model = recognizer()
    with registered_temporarily(_FoldAllShapes), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = Pipeline.from_specs(["test-fold-all-shapes"], sample_shapes={"x": WORKING}).run(model).model
    frozen = [w for w in caught if issubclass(w.category, FrozenShapesWarning)]
    assert len(frozen) == 1 and "test-fold-all-shapes" in str(frozen[0].message) and "x=1x1x16x24" in str(
        frozen[0].message)
    assert declared_dims(out, "x") == WORKING  # it says so and keeps the shape it works at
    x = lines(WORKING, 3)
    np.testing.assert_allclose(run(out, {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_probe_shapes_change_only_the_dims_the_model_can_change():
    # H is declared dynamic but conv2's stride and the Reshape to 64 channels fix it at 16
    model = recognizer()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    assert probe_shapes(model, {"x": WORKING}) == {"x": [2, 1, 16, 32]}


def test_cli_run_keeps_dims_unless_input_shape_asks(tmp_path, capsys):
    src, dyn, fixed = tmp_path / "rec.onnx", tmp_path / "dyn.onnx", tmp_path / "fixed.onnx"
    recognizer().save(src)
    # a dynamic model without calibration or --sample-shape: one line naming the input and both flags
    assert main(["run", str(src), "--pass", "canonicalize", "-o", str(dyn), "--latency-runs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input 'x'" in err[0] and "--sample-shape x=" in err[0] and "--input-shape" in err[0]
    assert not dyn.exists()
    assert main(["run", str(src), "--pass", "canonicalize", "--pass", "channel-pruning:ratio=0.25,round_to=1",
                 "--calibration", "random:8", "--sample-shape", "x=1,1,16,24", "-o", str(dyn),
                 "--latency-runs", "0"]) == 0
    out = Model.load(dyn)
    assert declared_dims(out, "x") == ["N", 1, 16, "W"]
    assert run(out, {"x": lines([2, 1, 16, 40], 1)})["y"].shape == (2, 40, 12)
    assert main(["run", str(src), "--pass", "canonicalize", "--input-shape", "x=1,1,16,24", "-o", str(fixed),
                 "--latency-runs", "0"]) == 0
    assert declared_dims(Model.load(fixed), "x") == WORKING
    capsys.readouterr()
    assert main(["run", str(src), "--pass", "canonicalize", "--sample-shape", "x=1,2,16,24", "-o", str(fixed),
                 "--latency-runs", "0"]) == 2
    assert "dimension 1 is fixed to 1" in capsys.readouterr().err


@pytest.mark.slow
@needs_ppocr
def test_ppocr_rec_keeps_dynamic_width_and_batch():
    """The real PP-OCRv4 recognizer (dynamic batch, height and width) through canonicalize, channel-pruning and
    qdq, calibrated on rendered text lines at 48x320: the output declares the batch and width dynamic and reads
    lines at widths 320 and 480 (batch 2) as the input model does."""
    from sculpt import ocr_task
    from sculpt.models import ppocr_model

    model = ppocr_model("rec")
    data = ocr_task.rec_set(24, seed=5)
    x320 = data.inputs.astype(np.float32)  # [24, 3, 48, 320]
    cal = CalibrationSet(16, lambda k: {"x": x320[k:k + 1]}, "16 rendered lines", ["x"])
    res = Pipeline.from_specs(["canonicalize", "channel-pruning:ratio=0.1", "qdq:samples=12"], calibration=cal,
                              held_out=4).run(model)
    out = res.model
    onnx.checker.check_model(out.proto, full_check=True)
    dims = declared_dims(out, "x")
    assert isinstance(dims[0], str) and isinstance(dims[3], str), dims
    chars = ocr_task.character_list(model)
    for x in (x320[16:18], np.concatenate([x320[18:20], np.ones_like(x320[18:20][..., :160])], axis=3)):
        want, got = run(model, {"x": x}), run(out, {"x": x})
        (w,), (g,) = want.values(), got.values()
        assert g.shape == w.shape and g.shape[0] == 2
        assert rel_error(g, w) < 0.5
        agree = np.mean(ocr_task.ctc_greedy_decode(g, chars) == np.array(ocr_task.ctc_greedy_decode(w, chars)))
        assert agree >= 0.5, agree


def test_tvm_builds_symbolic_batch_and_width():
    """Named dynamic dimensions stay symbolic in TVM: one build runs at two batches and widths and matches
    onnxruntime (sculpt's CPU kernels need static shapes: TVM's own loops, with a warning)."""
    pytest.importorskip("tvm")
    from sculpt.backends.tvm.relax_import import (SymbolicShapesWarning, build, import_to_relax, run_relax,
                                                  symbolic_input_dims)

    model = Pipeline.from_specs(["canonicalize"], sample_shapes={"x": WORKING}).run(recognizer()).model
    mod = import_to_relax(model, canonicalized=True, symbolic=True)
    assert symbolic_input_dims(mod) == ["N", "W"]
    with pytest.warns(SymbolicShapesWarning, match="N, W symbolic"):
        executable = build(mod, "llvm")
    for shape in OTHER:
        x = lines(shape, 11)
        got = run_relax(executable, {"x": x}, ["x"])[0]
        want = run(model, {"x": x})["y"]
        assert got.shape == want.shape
        assert rel_error(got, want) < 1e-4


def test_tvm_symbolic_import_names_the_dim_to_fix():
    pytest.importorskip("tvm")
    from sculpt.backends.tvm.relax_import import import_to_relax
    from sculpt.errors import ShapeError

    model = recognizer()
    model.graph.input[0].type.tensor_type.shape.dim[2].Clear()  # the height: dynamic, no name
    with pytest.raises(ShapeError, match=r"input 'x' dimension 2 is dynamic without a name.*x=\[N,1,<size>,W\]"):
        import_to_relax(model, symbolic=True)
    # fixing it and naming the others is enough (after canonicalize, which makes the Reshape's target constant)
    model.fix_input_shapes({"x": ["N", 1, 16, "W"]})
    model = Pipeline.from_specs(["canonicalize"], sample_shapes={"x": WORKING}).run(model).model
    mod = import_to_relax(model, canonicalized=True, symbolic=True)
    assert len(mod["main"].params) == 1
