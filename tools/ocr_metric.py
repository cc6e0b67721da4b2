"""The OCR task's accuracy as `sculpt optimize --metric` functions (each takes a model path, returns a
number, higher is better), on rendered text lines of a seed the calibration data never uses.

    sculpt optimize REC.onnx --calibration rec_cal.npz -o out --metric tools/ocr_metric.py:rec_char_accuracy --max-drop 1

``SCULPT_OCR_METRIC_LINES`` (default 200) and ``SCULPT_OCR_METRIC_SEED`` (default 0, the evaluation seed)
choose the lines; tools/optimize_ocr.py checks the chosen model again on lines of another seed.
"""

from __future__ import annotations

import os
from functools import lru_cache

from sculpt import ocr_task


def _lines() -> int:
    return int(os.environ.get("SCULPT_OCR_METRIC_LINES", "200"))


def _seed() -> int:
    return int(os.environ.get("SCULPT_OCR_METRIC_SEED", str(ocr_task.EVAL_SEED)))


@lru_cache(maxsize=4)
def _data(kind: str, count: int, seed: int):
    return ocr_task.task_set(kind, count, seed)


def rec_char_accuracy(model_path: str) -> float:
    """Character accuracy of a PP-OCR recognizer, in percent."""
    return 100.0 * ocr_task.evaluate_rec(model_path, _data("rec", _lines(), _seed())).char_accuracy


def rec_exact_match(model_path: str) -> float:
    """Lines decoded exactly by a PP-OCR recognizer, in percent."""
    return 100.0 * ocr_task.evaluate_rec(model_path, _data("rec", _lines(), _seed())).exact_match


def cls_accuracy(model_path: str) -> float:
    """Orientation accuracy (0/180 degrees) of a PP-OCR text-line classifier, in percent."""
    return 100.0 * ocr_task.evaluate_cls(model_path, _data("cls", _lines(), _seed())).accuracy
