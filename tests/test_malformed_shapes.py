"""Runnable but malformed models: declared output / value_info shapes that contradict what the nodes
compute are dropped with one warning line naming them, instead of failing onnx's full check.

The malformed models are the real PP-OCR text-orientation classifier with its declared shapes edited
(the output's class count, a value_info's channel count and rank), the shape of the mistakes an
exporter makes when a head is swapped after the graph was traced."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from markers import needs_ppocr
from sculpt.cli import main
from sculpt.ir.model import DeclaredShapeWarning, Model
from sculpt.passes import create_pass

SHAPE = [1, 3, 48, 192]
pytestmark = needs_ppocr


def _cls_path() -> str:
    from sculpt.models import ppocr_model_path

    return str(ppocr_model_path("cls"))


def _set_dims(vi: onnx.ValueInfoProto, dims: list[int]) -> None:
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d


@pytest.fixture(scope="module")
def static_cls() -> Model:
    """The cls model canonicalized at a static shape: every value_info and the output are declared."""
    model = Model.load(_cls_path())
    model.fix_input_shapes({"x": SHAPE})
    return create_pass("canonicalize")(model).model


def _ort_outputs(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # onnxruntime warns about the declared output shape; the test checks ours
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _corrupt(model: Model) -> tuple[Model, str, str]:
    """A copy with a wrong output dim and a value_info of the wrong rank; returns it and both names."""
    bad = model.clone()
    out = bad.graph.output[0]
    _set_dims(out, [1, 7])  # the classifier computes 2 classes
    conv_out = next(n.output[0] for n in bad.graph.node if n.op_type == "Conv")
    vi = next(v for v in bad.graph.value_info if v.name == conv_out)
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    _set_dims(vi, dims[:2] + [dims[2] * dims[3]])  # rank 3 instead of 4
    bad.graph_edited(nodes=False)
    return bad, out.name, conv_out


def test_consistent_model_is_left_alone(static_cls):
    model = static_cls.clone()
    before = model.proto.SerializeToString()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeclaredShapeWarning)
        assert model.drop_conflicting_shapes() == []
    assert model.proto.SerializeToString() == before


def test_wrong_declarations_are_dropped_with_one_warning(static_cls):
    bad, out_name, vi_name = _corrupt(static_cls)
    with pytest.raises(Exception, match="differ"):
        onnx.checker.check_model(bad.proto, full_check=True)
    with pytest.warns(DeclaredShapeWarning) as caught:
        dropped = bad.drop_conflicting_shapes()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert out_name in message and vi_name in message and "\n" not in message
    assert len(dropped) == 2
    assert any(f"output '{out_name}' declares shape [1,7], the nodes compute [1,2]" == d for d in dropped)
    assert any(d.startswith(f"value_info '{vi_name}' declares rank 3") for d in dropped)
    # the other declarations stay; the output keeps its name and element type
    assert len(bad.graph.value_info) == len(static_cls.graph.value_info) - 1
    assert bad.graph.output[0].name == out_name
    assert bad.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    bad.infer_shapes()
    bad.verify()
    assert [d.dim_value for d in bad.graph.output[0].type.tensor_type.shape.dim] == [1, 2]
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    for a, b in zip(_ort_outputs(static_cls.proto, x), _ort_outputs(bad.proto, x)):
        np.testing.assert_array_equal(a, b)


def test_wrong_element_type_is_replaced(static_cls):
    bad = static_cls.clone()
    bad.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    with pytest.warns(DeclaredShapeWarning, match="element type INT64, the nodes compute FLOAT"):
        assert len(bad.drop_conflicting_shapes()) == 1
    assert bad.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    bad.infer_shapes()
    bad.verify()


def _run_cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_cli_canonicalize_repairs_the_dynamic_model(tmp_path, capsys):
    """The shipped (dynamic) model with its declared class count edited: at load shape inference cannot
    see through the shape computations, so canonicalize drops it once they are folded."""
    proto = onnx.load(_cls_path())
    _set_dims(proto.graph.output[0], [-1, 7])
    src, out = tmp_path / "cls_bad.onnx", tmp_path / "out.onnx"
    onnx.save(proto, src)
    rc, err = _run_cli(capsys, "run", src, "--input-shape", "x=" + ",".join(map(str, SHAPE)),
                       "--pass", "canonicalize", "-o", out)
    assert rc == 0, err
    warning_lines = [ln for ln in err.splitlines() if ln.startswith("sculpt: warning:")]
    assert len(warning_lines) == 1, err
    assert proto.graph.output[0].name in warning_lines[0] and "[?,7]" in warning_lines[0]
    assert "Traceback" not in err and "checker" not in err
    result = onnx.load(out)
    onnx.checker.check_model(result, full_check=True)
    assert [d.dim_value for d in result.graph.output[0].type.tensor_type.shape.dim] == [1, 2]
    x = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    np.testing.assert_allclose(_ort_outputs(result, x)[0], _ort_outputs(proto, x)[0], rtol=1e-5, atol=1e-6)


def test_cli_repairs_at_load_for_any_pass(static_cls, tmp_path, capsys):
    """A static model with a wrong value_info: `sculpt run` with a pass that is not canonicalize."""
    bad, _, vi_name = _corrupt(static_cls)
    src, out = tmp_path / "static_bad.onnx", tmp_path / "out.onnx"
    onnx.save(bad.proto, src)
    rc, err = _run_cli(capsys, "run", src, "--pass", "remove-identity", "-o", out)
    assert rc == 0, err
    warning_lines = [ln for ln in err.splitlines() if ln.startswith("sculpt: warning:")]
    assert len(warning_lines) == 1 and vi_name in warning_lines[0], err
    onnx.checker.check_model(onnx.load(out), full_check=True)
