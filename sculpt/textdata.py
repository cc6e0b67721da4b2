"""Rendered text: real inputs for the OCR models without a data set download.

Dark words on a light background drawn with PIL (DejaVu fonts when Debian's fonts-dejavu-core is
installed, else PIL's built-in font), preprocessed the way PP-OCR does: pixels / 255, then mean
0.5 and std 0.5, NCHW. The ground truth is the text itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["sculpt", "compresses", "ONNX", "models", "for", "ARM", "and", "mobile", "GPUs", "2026", "pruning",
         "int8", "latency", "accuracy", "phone", "board", "vision", "speech", "kernel", "tensor"]
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")


def fonts() -> list[str]:
    """Paths of the DejaVu TrueType fonts found on this machine (may be empty)."""
    return sorted(str(p) for p in DEJAVU.glob("DejaVu*.ttf")) if DEJAVU.is_dir() else []


def _font(size: int, rng: np.random.Generator):
    from PIL import ImageFont

    found = fonts()
    if found:
        return ImageFont.truetype(found[int(rng.integers(0, len(found)))], size)
    return ImageFont.load_default(size=size)


def render_text_image(height: int, width: int, seed: int = 0, words_per_line: int = 3) -> tuple[np.ndarray, list[str]]:
    """An RGB uint8 image (height, width, 3) with lines of random words, and the lines' text."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    size = max(12, min(32, height // 2))
    font = _font(size, rng)
    lines = []
    y = max(2, (height - size) // 2) if height < 3 * size else 4
    while y + size <= height:
        text = " ".join(rng.choice(WORDS, words_per_line))
        draw.text((int(rng.integers(2, 10)), y), text, fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)
        lines.append(text)
        y += size * 3
    return np.asarray(img), lines


def ppocr_preprocess(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (1, 3, H, W) float32 normalised as PP-OCR expects."""
    arr = image.astype(np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def text_input(shape, seed: int = 0) -> np.ndarray:
    """A PP-OCR input of ``shape`` (1, 3, H, W) holding rendered text."""
    _, _, h, w = shape
    image, _ = render_text_image(h, w, seed)
    return ppocr_preprocess(image)
