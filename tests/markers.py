"""Markers shared by test modules."""

from __future__ import annotations

import importlib.util

import pytest

# the PP-OCR models come from the rapidocr-onnxruntime wheel (in the [test] extra); the tests that
# need those real models and nothing else skip without it, the rest run on the built-in example
needs_ppocr = pytest.mark.skipif(importlib.util.find_spec("rapidocr_onnxruntime") is None,
                                 reason="the PP-OCR models come from the optional rapidocr-onnxruntime wheel")
