"""Real models available without a network: PP-OCR (rapidocr-onnxruntime wheel) and the ONNX backend
test models shipped in the onnx wheel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    import onnx

    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"


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
