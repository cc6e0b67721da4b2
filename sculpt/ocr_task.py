"""A real task with ground truth, to measure what compression costs: text recognition with PP-OCRv4 rec
and text-orientation classification with PP-OCR mobile v2.0 cls, on text lines rendered with PIL
(:func:`sculpt.textdata.text_lines`).

Preprocessing and decoding follow rapidocr_onnxruntime (``ch_ppocr_rec`` / ``ch_ppocr_cls``), which
follows PaddleOCR:

- images are BGR (rapidocr converts every image it loads to BGR; PaddleOCR reads with cv2.imread);
- rec: resize to height 48 keeping the aspect ratio (``ceil(48 * w / h)``, capped at 320) with
  ``cv2.resize`` (bilinear), ``(x / 255 - 0.5) / 0.5``, NCHW, zero-padded on the right to width 320;
- cls: the same at 48×192; the output is softmax over the labels ``['0', '180']``;
- CTC greedy decoding: argmax per time step, merge repeats, drop the blank. The classes are
  ``['blank'] + metadata['character'].splitlines() + [' ']`` (6625 for PP-OCRv4 rec).

At batch 1 with lines no wider than 320/48 (the data set keeps them so) this is exactly what
rapidocr's own TextRecognizer feeds the model.

Metrics: exact match (the decoded line equals the truth after collapsing runs of spaces and
stripping) and character accuracy ``1 - sum(edit distance) / sum(len(truth))`` over the set (may be
negative for a model that emits garbage); cls: fraction of lines whose argmax is the true
orientation (odd lines are rotated by 180°).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sculpt.ir.model import Model
from sculpt.models import PPOCR_SHAPES, ppocr_model_path
from sculpt.textdata import text_lines

REC_SHAPE = tuple(PPOCR_SHAPES["rec"])  # (1, 3, 48, 320)
CLS_SHAPE = tuple(PPOCR_SHAPES["cls"])  # (1, 3, 48, 192)
CLS_LABELS = ["0", "180"]
EVAL_SEED = 0
CALIBRATION_SEED = 1009  # calibration lines never come from the evaluation seed
DEFAULT_COUNT = 300


# ------------------------------------------------------------------------------------ preprocessing
def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    try:
        import cv2
    except ImportError:  # pragma: no cover - cv2 comes with rapidocr-onnxruntime
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return cv2.resize(image, (width, height))


def resize_norm(image: np.ndarray, height: int, width: int, *, bgr: bool = False) -> np.ndarray:
    """One uint8 (H, W, 3) RGB image (BGR if ``bgr``) → (1, 3, height, width) float32 as PP-OCR's
    ``resize_norm_img``: aspect-preserving resize to ``height`` (width capped at ``width``), scale to
    [-1, 1], pad the right with zeros."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if not bgr:
        image = image[:, :, ::-1]
    h, w = image.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    resized = _resize(np.ascontiguousarray(image), resized_w, height).astype(np.float32)
    resized = resized.transpose(2, 0, 1) / 255
    resized -= 0.5
    resized /= 0.5
    out = np.zeros((1, 3, height, width), dtype=np.float32)
    out[0, :, :, :resized_w] = resized
    return out


def rec_preprocess(image: np.ndarray, *, bgr: bool = False) -> np.ndarray:
    """RGB uint8 line image → the (1, 3, 48, 320) rec input."""
    return resize_norm(image, REC_SHAPE[2], REC_SHAPE[3], bgr=bgr)


def cls_preprocess(image: np.ndarray, *, bgr: bool = False) -> np.ndarray:
    """RGB uint8 line image → the (1, 3, 48, 192) cls input."""
    return resize_norm(image, CLS_SHAPE[2], CLS_SHAPE[3], bgr=bgr)


# ------------------------------------------------------------------------------------ decoding
def _as_model(model) -> Model:
    return model if isinstance(model, Model) else Model.load(model)


def character_list(model=None) -> list[str]:
    """The CTC classes of a rec model: ``['blank', *metadata['character'].splitlines(), ' ']``, as
    rapidocr's CTCLabelDecode builds them. ``model``: a Model, a path, or None (the PP-OCRv4 rec of the
    rapidocr wheel). A compressed model that lost its metadata is decoded with the original's."""
    proto = _as_model(model if model is not None else ppocr_model_path("rec")).proto
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        if model is not None:  # a compressed model without the metadata: the original's classes
            return character_list(None)
        raise ValueError("the PP-OCRv4 rec model has no 'character' metadata")
    return ["blank"] + meta["character"].splitlines() + [" "]


def ctc_greedy_decode(probs: np.ndarray, characters: Sequence[str]) -> list[str]:
    """(N, T, C) or (T, C) per-step class scores → N strings: argmax, merge repeats, drop blank (0)."""
    probs = np.asarray(probs)
    if probs.ndim == 2:
        probs = probs[None]
    if probs.shape[-1] != len(characters):
        raise ValueError(f"the model has {probs.shape[-1]} classes, the character list {len(characters)}")
    out = []
    for idx in probs.argmax(axis=-1):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(characters[i] for i in idx[keep]))
    return out


# ------------------------------------------------------------------------------------ metrics
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalize_text(text: str) -> str:
    """Runs of whitespace collapsed to one space, ends stripped."""
    return " ".join(text.split())


@dataclass
class RecMetrics:
    count: int
    exact_match: float  # fraction of lines decoded exactly
    char_accuracy: float  # 1 - sum(edit distance) / sum(len(truth))
    edit_distance: int
    chars: int
    predictions: list[str] = field(default_factory=list, repr=False)
    truths: list[str] = field(default_factory=list, repr=False)

    def errors(self, limit: int | None = None) -> list[tuple[str, str]]:
        """(truth, prediction) of the lines not decoded exactly."""
        bad = [(t, p) for t, p in zip(self.truths, self.predictions) if normalize_text(p) != normalize_text(t)]
        return bad[:limit] if limit is not None else bad

    def as_dict(self) -> dict:
        return {"count": self.count, "exact_match": self.exact_match, "char_accuracy": self.char_accuracy,
                "edit_distance": self.edit_distance, "chars": self.chars}


def rec_metrics(predictions: Sequence[str], truths: Sequence[str]) -> RecMetrics:
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
    preds = [normalize_text(p) for p in predictions]
    gts = [normalize_text(t) for t in truths]
    dist = sum(edit_distance(p, t) for p, t in zip(preds, gts))
    chars = sum(len(t) for t in gts)
    exact = sum(p == t for p, t in zip(preds, gts))
    n = len(gts)
    # floored at 0: a broken model can insert more characters than the truth has
    return RecMetrics(n, exact / n if n else 0.0, max(0.0, 1.0 - dist / chars) if chars else 0.0, dist, chars,
                      list(predictions), list(truths))


@dataclass
class ClsMetrics:
    count: int
    accuracy: float
    predictions: list[int] = field(default_factory=list, repr=False)
    labels: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"count": self.count, "accuracy": self.accuracy}


def cls_metrics(predictions: Sequence[int], labels: Sequence[int]) -> ClsMetrics:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    n = len(labels)
    right = sum(int(p) == int(t) for p, t in zip(predictions, labels))
    return ClsMetrics(n, right / n if n else 0.0, [int(p) for p in predictions], [int(t) for t in labels])


# ------------------------------------------------------------------------------------ data sets
@dataclass
class LineSet:
    """Rendered text lines preprocessed for a model: ``inputs`` (N, 3, H, W), one line each."""

    inputs: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class RecSet(LineSet):
    """Preprocessed rec inputs (N, 3, 48, 320) and the lines' text."""

    texts: list[str]
    images: list[np.ndarray] = field(default_factory=list, repr=False)


@dataclass
class ClsSet(LineSet):
    """Preprocessed cls inputs (N, 3, 48, 192) and labels (0: upright, 1: rotated by 180°)."""

    labels: list[int]
    images: list[np.ndarray] = field(default_factory=list, repr=False)


def _preprocessed(images: Sequence[np.ndarray], preprocess, shape: tuple) -> np.ndarray:
    """The images preprocessed and stacked on the first axis; (0, *shape[1:]) for none."""
    if not images:
        return np.zeros((0,) + shape[1:], np.float32)
    return np.concatenate([preprocess(img) for img in images])


def rotate_180(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[::-1, ::-1])


def rec_set(count: int = DEFAULT_COUNT, seed: int = EVAL_SEED, **line_kwargs) -> RecSet:
    lines = text_lines(count, seed, **line_kwargs)
    images = [img for img, _ in lines]
    return RecSet(_preprocessed(images, rec_preprocess, REC_SHAPE), [t for _, t in lines], images)


def cls_set(count: int = DEFAULT_COUNT, seed: int = EVAL_SEED, **line_kwargs) -> ClsSet:
    """Lines of ``seed``; every odd line rotated by 180° (label 1), so the classes are balanced."""
    lines = text_lines(count, seed, **line_kwargs)
    images = [rotate_180(img) if i % 2 else img for i, (img, _) in enumerate(lines)]
    labels = [i % 2 for i in range(len(lines))]
    inputs = _preprocessed(images, cls_preprocess, CLS_SHAPE)
    return ClsSet(inputs, labels, images)


# ------------------------------------------------------------------------------------ running models
def session_for(model, *, threads: int | None = None, shape: Sequence[int] | None = None):
    """An onnxruntime session for a Model or path, with the input ``x`` fixed to ``shape`` (when the
    model's own input shape is dynamic)."""
    from sculpt.runtime import make_session

    m = _as_model(model)
    if shape is not None and m.dynamic_inputs():
        m = m.clone().fix_input_shapes({m.input_names[0]: list(shape)})
    return make_session(m, threads=threads)


def _run_all(session, inputs: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: inputs[k:k + 1]})[0] for k in range(len(inputs))]
    return np.concatenate(outs) if outs else np.zeros((0,))


def evaluate_rec(model=None, data: RecSet | None = None, *, count: int = DEFAULT_COUNT, seed: int = EVAL_SEED,
                 threads: int | None = 2, characters: Sequence[str] | None = None, session=None) -> RecMetrics:
    """Recognition metrics of a rec model (Model or path; None: the original PP-OCRv4 rec) on ``data``
    (default: ``rec_set(count, seed)``), batch 1 at 1×3×48×320 in onnxruntime."""
    model = _as_model(model if model is not None else ppocr_model_path("rec"))
    data = data if data is not None else rec_set(count, seed)
    chars = list(characters) if characters is not None else character_list(model)
    sess = session or session_for(model, threads=threads, shape=REC_SHAPE)
    probs = _run_all(sess, data.inputs)
    return rec_metrics(ctc_greedy_decode(probs, chars) if len(data) else [], data.texts)


def evaluate_cls(model=None, data: ClsSet | None = None, *, count: int = DEFAULT_COUNT, seed: int = EVAL_SEED,
                 threads: int | None = 2, session=None) -> ClsMetrics:
    """Orientation accuracy of a cls model (Model or path; None: the original PP-OCR mobile v2.0 cls)
    on ``data`` (default: ``cls_set(count, seed)``), batch 1 at 1×3×48×192 in onnxruntime."""
    model = _as_model(model if model is not None else ppocr_model_path("cls"))
    data = data if data is not None else cls_set(count, seed)
    sess = session or session_for(model, threads=threads, shape=CLS_SHAPE)
    probs = _run_all(sess, data.inputs)
    return cls_metrics(probs.argmax(axis=1).tolist() if len(data) else [], data.labels)


def evaluate(kind: str, model=None, data=None, **kwargs):
    """``evaluate_rec`` or ``evaluate_cls`` by name."""
    if kind == "rec":
        return evaluate_rec(model, data, **kwargs)
    if kind == "cls":
        return evaluate_cls(model, data, **kwargs)
    raise ValueError(f"unknown OCR task model '{kind}' (rec or cls)")


def task_set(kind: str, count: int = DEFAULT_COUNT, seed: int = EVAL_SEED):
    if kind == "rec":
        return rec_set(count, seed)
    if kind == "cls":
        return cls_set(count, seed)
    raise ValueError(f"unknown OCR task model '{kind}' (rec or cls)")


def input_shape(kind: str) -> list[int]:
    return list(PPOCR_SHAPES[kind])


# ------------------------------------------------------------------------------------ calibration
def calibration_inputs(kind: str, count: int = 64, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """(count, 3, 48, W) float32 preprocessed lines for ``kind`` ('rec' or 'cls'), from a seed other
    than the evaluation set's. cls calibration lines are rotated by 180° every other line, like its
    evaluation set."""
    if seed == EVAL_SEED:
        raise ValueError(f"calibration seed {seed} is the evaluation seed")
    return task_set(kind, count, seed).inputs


def write_calibration(path: str | os.PathLike, kind: str, count: int = 64,
                      seed: int = CALIBRATION_SEED) -> Path:
    """Write an .npz with key ``x`` (the models' input name), first axis = samples, for
    ``sculpt run --calibration PATH`` or ``CalibrationSet.from_npz(PATH)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=calibration_inputs(kind, count, seed))
    return path


# ------------------------------------------------------------------------------------ latency
def median_latency_ms(session, feed: np.ndarray, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``runs`` single-sample runs of a session (after ``warmup`` runs)."""
    from sculpt.runtime import median_latency_ms as median_ms

    return median_ms(session, {session.get_inputs()[0].name: feed}, runs=runs, warmup=warmup)
