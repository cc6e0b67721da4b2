"""Real models available without a network: PP-OCR (rapidocr-onnxruntime wheel) and the ONNX backend
test models shipped in the onnx wheel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from sculpt.errors import SculptError
from sculpt.ir.model import Model

PPOCR_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
# the static shapes sculpt uses for them (the models themselves are dynamic)
PPOCR_SHAPES = {"det": [1, 3, 320, 320], "rec": [1, 3, 48, 320], "cls": [1, 3, 48, 192]}


def ppocr_model_path(kind: str) -> Path:
    if kind not in PPOCR_FILES:
        raise SculptError(f"unknown PP-OCR model '{kind}' (det, rec or cls)")
    try:
        import rapidocr_onnxruntime
    except ImportError:
        raise SculptError("the PP-OCR models come from the 'rapidocr-onnxruntime' package: "
                          "pip install rapidocr-onnxruntime") from None
    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / PPOCR_FILES[kind]
    if not path.is_file():
        raise SculptError(f"{path}: missing from the rapidocr-onnxruntime installation")
    return path


def ppocr_model(kind: str) -> Model:
    return Model.load(ppocr_model_path(kind))


def backend_test_data_dir() -> Path:
    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"


def reweight(model: Model, seed: int = 0) -> Model:
    """``model`` with its Conv/Gemm/MatMul float32 weights replaced by seeded He-normal values (fan-in
    scaled) and their biases by 0.01-scaled normal ones, in place (returned for chaining). The onnx
    wheel's light models ship every weight as 0.02: every output channel is the same and a final softmax
    uniform, so a result compared with onnxruntime's says nothing about channel indexing (a kernel
    reading the wrong channel, or one past the tensor, matched). Reweighted, the outputs depend on the
    weights; the graph and so the timings are the same. A weight made by a node (the light models'
    ConstantOfShape) becomes an initializer and the node goes."""
    rng = np.random.default_rng(seed)
    producers = model.producers()

    def replace(name: str, value: np.ndarray) -> None:
        if name in producers:
            model.remove_node(producers.pop(name))
            if model.proto.ir_version < 4:  # then every initializer is a graph input too
                model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, value.shape))
        model.set_initializer(name, value.astype(np.float32))

    initializers = {t.name: t for t in model.graph.initializer}  # also graph inputs in the light models

    def shape_of(name: str) -> tuple[int, ...] | None:  # a float32 constant's shape, else None
        made = producers.get(name)
        if made is not None and made.op_type == "ConstantOfShape":
            shape = (onnx.numpy_helper.to_array(initializers[made.input[0]]) if made.input[0] in initializers
                     else model.get_constant(made.input[0]))
            value = next((a.t for a in made.attribute if a.name == "value"), None)
            float32 = value is None or value.data_type == onnx.TensorProto.FLOAT
            return tuple(int(d) for d in shape) if shape is not None and float32 else None
        w = model.get_constant(name)
        return tuple(w.shape) if w is not None and w.dtype == np.float32 else None

    def source(name: str) -> str:  # through Reshapes (Inception v1's classifier weight is reshaped)
        while name in producers and producers[name].op_type == "Reshape":
            name = producers[name].input[0]
        return name

    for node in list(model.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = source(node.input[1])
        shape = shape_of(weight)
        if shape is None:
            continue
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        fan_in = int(np.prod(shape[1:])) if node.op_type == "Conv" or transposed else shape[0]
        replace(weight, rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))
        bias = shape_of(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            replace(node.input[2], rng.standard_normal(bias) * 0.01)
    return model


def light_model(name: str, seed: int = 0) -> Model:
    """The onnx wheel's ``light/light_<name>.onnx`` with seeded weights (``reweight``)."""
    return reweight(Model.load(backend_test_data_dir() / "light" / f"light_{name}.onnx"), seed)


@dataclass
class BackendTestCase:
    """One model of the onnx wheel's backend test data with its first test data set."""

    suite: str  # light, pytorch-converted, pytorch-operator, simple, node
    name: str
    model_path: Path
    input_paths: list[Path]
    output_paths: list[Path]

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.name}"


def backend_test_cases(suites=("light", "pytorch-converted", "pytorch-operator", "simple")) -> list[BackendTestCase]:
    root = backend_test_data_dir()
    cases = []
    for suite in suites:
        base = root / suite
        if not base.is_dir():
            continue
        if suite == "light":
            for model in sorted(base.glob("*.onnx")):
                outs = sorted(base.glob(model.stem + "_output_*.pb"))
                cases.append(BackendTestCase(suite, model.stem, model, [], outs))
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            model = d / "model.onnx"
            if not model.is_file():
                continue
            ds = d / "test_data_set_0"
            ins = sorted(ds.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1])) if ds.is_dir() else []
            outs = sorted(ds.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1])) if ds.is_dir() else []
            cases.append(BackendTestCase(suite, d.name, model, ins, outs))
    return cases


def recurrent_node_cases() -> list[tuple[object, list, list, str]]:
    """(node, inputs, expected outputs, name) of the onnx wheel's LSTM, GRU and RNN node tests
    (``onnx.backend.test.case.node``), collected by running their generators."""
    from onnx.backend.test.case.node import gru, lstm, rnn

    cases = []

    def capture(node, inputs, outputs, name, **_):
        cases.append((node, list(inputs), list(outputs), name))

    for module, op in ((lstm, lstm.LSTM), (gru, gru.GRU), (rnn, rnn.RNN)):
        original = module.expect
        module.expect = capture
        try:
            for attr in sorted(dir(op)):
                if attr.startswith("export"):
                    getattr(op, attr)()
        finally:
            module.expect = original
    return cases
