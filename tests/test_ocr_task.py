"""The OCR task: rendered text lines, PP-OCR preprocessing and CTC decoding, metrics, calibration data.

Floors measured on the original models (40 lines of the evaluation seed, DejaVu fonts): rec exact
match 97.5%, character accuracy 99.8%; cls orientation accuracy 97.5%. The asserts leave margin
for other font or Pillow versions.
"""

import numpy as np
import pytest

from sculpt import ocr_task
from sculpt.ir.calibration import CalibrationSet
from sculpt.models import ppocr_model
from sculpt.textdata import MAX_LINE_ASPECT, fonts, text_lines

N = 40


@pytest.fixture(scope="module")
def rec_data():
    return ocr_task.rec_set(N, ocr_task.EVAL_SEED)


# ------------------------------------------------------------------ data set
def test_text_lines_deterministic():
    a = text_lines(12, seed=5)
    b = text_lines(12, seed=5)
    assert [t for _, t in a] == [t for _, t in b]
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, b))
    # line i depends only on (seed, i): a shorter list is a prefix
    c = text_lines(4, seed=5)
    assert [t for _, t in c] == [t for _, t in a[:4]]
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(c, a))
    other = text_lines(12, seed=6)
    assert [t for _, t in other] != [t for _, t in a]


def test_text_lines_shape_and_content():
    lines = text_lines(60, seed=1)
    for image, text in lines:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert 1 <= len(text.split()) <= 4 and text == text.strip() and text.isascii()
        assert image.shape[1] <= MAX_LINE_ASPECT * image.shape[0] + 1e-9
        # dark ink on a light background
        assert image.mean() > 120 and image.min() < 110
    texts = " ".join(t for _, t in lines)
    assert any(c.isdigit() for c in texts) and any(c.isupper() for c in texts) and any(c.islower() for c in texts)


@pytest.mark.skipif(not fonts(), reason="DejaVu fonts not installed")
def test_text_lines_use_several_fonts():
    from sculpt.textdata import line_fonts

    assert len(line_fonts()) >= 6


# ------------------------------------------------------------------ metrics and decoding
@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2),
                                     ("same", "same", 0), ("ab", "ba", 2)])
def test_edit_distance(a, b, d):
    assert ocr_task.edit_distance(a, b) == d
    assert ocr_task.edit_distance(b, a) == d


def test_rec_metrics_aggregate():
    m = ocr_task.rec_metrics(["hello world", "kitten", "x  y "], ["hello world", "sitting", "x y"])
    assert m.count == 3 and m.exact_match == pytest.approx(2 / 3)
    # distances 0 + 3 + 0 over 11 + 7 + 3 characters of truth
    assert m.edit_distance == 3 and m.chars == 21
    assert m.char_accuracy == pytest.approx(1 - 3 / 21)
    assert m.errors() == [("sitting", "kitten")]
    c = ocr_task.cls_metrics([0, 1, 1, 0], [0, 1, 0, 0])
    assert c.accuracy == pytest.approx(0.75)


def test_ctc_greedy_decode():
    chars = ["blank", "a", "b", " "]
    steps = [0, 1, 1, 0, 1, 2, 2, 3, 2, 0]  # blank a a blank a b b space b blank → "aab b"
    probs = np.eye(4, dtype=np.float32)[steps]
    assert ocr_task.ctc_greedy_decode(probs, chars) == ["aab b"]
    blanks = np.eye(4, dtype=np.float32)[[0] * len(steps)]
    assert ocr_task.ctc_greedy_decode(np.stack([probs, blanks]), chars) == ["aab b", ""]


def test_character_list_matches_rec_output():
    chars = ocr_task.character_list()
    assert chars[0] == "blank" and chars[-1] == " " and len(chars) == 6625
    assert set("abcxyzABCXYZ0123456789") <= set(chars)


# ------------------------------------------------------------------ preprocessing
def test_rec_preprocess_layout(rec_data):
    x = rec_data.inputs
    assert x.shape == (N, 3, 48, 320) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # aspect ratio kept: right-padding with zeros after ceil(48 * w / h) columns
    image = rec_data.images[0]
    w = int(np.ceil(48 * image.shape[1] / image.shape[0]))
    assert w <= 320
    assert np.all(x[0, :, :, w:] == 0) and np.any(x[0, :, :, w - 1] != 0)
    cls = ocr_task.cls_preprocess(image)
    assert cls.shape == (1, 3, 48, 192)


def test_same_as_rapidocr(rec_data):
    """Our preprocessing and decoding give exactly what rapidocr's own TextRecognizer gives."""
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    from pathlib import Path

    from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

    base = Path(rapidocr.__file__).parent
    rec = TextRecognizer({"model_path": str(base / "models" / "ch_PP-OCRv4_rec_infer.onnx"),
                          "rec_batch_num": 1, "rec_img_shape": [3, 48, 320]})
    k = 8
    bgr = [np.ascontiguousarray(im[:, :, ::-1]) for im in rec_data.images[:k]]
    for i in range(k):
        np.testing.assert_array_equal(rec.resize_norm_img(bgr[i], 320 / 48)[None], rec_data.inputs[i:i + 1])
    theirs, _ = rec(bgr)
    ours = ocr_task.evaluate_rec(None, ocr_task.RecSet(rec_data.inputs[:k], rec_data.texts[:k]))
    assert ours.predictions == [t for t, _ in theirs]


# ------------------------------------------------------------------ the original models
def test_original_rec_accuracy(rec_data):
    m = ocr_task.evaluate_rec(None, rec_data)
    assert m.count == N
    assert m.exact_match >= 0.85, m.errors()
    assert m.char_accuracy >= 0.97, m.errors()


def test_original_cls_accuracy():
    data = ocr_task.cls_set(N, ocr_task.EVAL_SEED)
    assert sum(data.labels) == N // 2
    m = ocr_task.evaluate_cls(None, data)
    assert m.accuracy >= 0.9


# ------------------------------------------------------------------ calibration
@pytest.mark.parametrize("kind", ["rec", "cls"])
def test_calibration_npz(kind, tmp_path):
    path = ocr_task.write_calibration(tmp_path / f"{kind}.npz", kind, count=6)
    cal = CalibrationSet.from_npz(path)
    assert len(cal) == 6 and cal.input_names == ["x"]
    model = ppocr_model(kind).clone().fix_input_shapes({"x": ocr_task.input_shape(kind)})
    cal.check(model)  # raises unless the samples feed the model's input
    sample = cal[0]["x"]
    assert sample.shape == tuple(ocr_task.input_shape(kind)) and sample.dtype == np.float32
    # not the evaluation lines
    evaluation = ocr_task.task_set(kind, 6, ocr_task.EVAL_SEED).inputs
    assert not any(np.array_equal(cal[i]["x"][0], evaluation[i]) for i in range(6))
    with pytest.raises(ValueError):
        ocr_task.calibration_inputs(kind, 2, seed=ocr_task.EVAL_SEED)


def test_evaluate_accepts_a_path_and_a_model():
    from sculpt.models import ppocr_model_path

    data = ocr_task.cls_set(6, seed=3)
    a = ocr_task.evaluate_cls(ppocr_model_path("cls"), data)
    b = ocr_task.evaluate_cls(ppocr_model("cls"), data)
    assert a.predictions == b.predictions


def test_character_list_falls_back_to_the_original():
    model = ppocr_model("rec").clone()
    del model.proto.metadata_props[:]
    assert ocr_task.character_list(model) == ocr_task.character_list()
