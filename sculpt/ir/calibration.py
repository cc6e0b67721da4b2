"""Calibration data for data-aware passes.

A CalibrationSet yields samples: dicts ``{input name: array}`` with a leading batch axis of 1.
Sources: an .npz file (arrays keyed by input name, first axis = samples), a folder of images with
stated preprocessing, or random data. Samples are produced one at a time (images are decoded on
demand), and ``sculpt.runtime.iter_activations`` runs onnxruntime sample by sample, so a pass holds
only the activations it asks for, for one sample at a time, unless it keeps them itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from sculpt.errors import CalibrationError, ShapeError
from sculpt.common import one_line
from sculpt.ir.model import Model
from sculpt.ir.random_inputs import check_random_input_size, random_inputs

MAX_IMAGE_SIDE = 8192  # pixels: a calibration image resized beyond this is a mistake (3·8192² floats = 800 MB)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class ImagePreprocessing:
    """How an image file becomes an input tensor: resize to (height, width), scale to [0, 1] by
    ``scale``, subtract ``mean`` and divide by ``std`` per channel (in ``channel_order``), then lay
    out as NCHW or NHWC."""

    height: int
    width: int
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    channel_order: str = "RGB"
    grayscale: bool = False

    def __post_init__(self):
        if self.layout.upper() not in ("NCHW", "NHWC"):
            raise CalibrationError(f"image layout must be NCHW or NHWC, got '{self.layout}'")
        if self.channel_order.upper() not in ("RGB", "BGR"):
            raise CalibrationError(f"image channel order must be RGB or BGR, got '{self.channel_order}'")
        if not (0 < int(self.height) <= MAX_IMAGE_SIDE and 0 < int(self.width) <= MAX_IMAGE_SIDE):
            raise CalibrationError(f"image size must be positive and at most {MAX_IMAGE_SIDE} per side, got "
                                   f"{self.height}x{self.width}")
        channels = 1 if self.grayscale else 3
        for what in ("mean", "std"):
            values = np.atleast_1d(np.asarray(getattr(self, what), dtype=np.float64))
            if values.ndim != 1 or 1 < len(values) < channels or len(values) == 0:
                raise CalibrationError(f"image {what} needs 1 or {channels} values, got {values.tolist()}")
            if not np.isfinite(values).all():
                raise CalibrationError(f"image {what} must be finite numbers, got {values.tolist()}")
        if not np.isfinite(float(self.scale)):
            raise CalibrationError(f"image scale must be a finite number, got {self.scale}")
        if any(float(v) == 0.0 for v in np.atleast_1d(np.asarray(self.std, dtype=np.float64))):
            raise CalibrationError(f"image std must be nonzero, got {list(np.atleast_1d(self.std))}")

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.grayscale else "RGB").resize((self.width, self.height),
                                                                         Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32)
        except Exception as e:
            raise CalibrationError(f"{path}: cannot read the image ({one_line(e)})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.channel_order.upper() == "BGR" and arr.shape[2] == 3:
            arr = arr[:, :, ::-1]
        arr = arr * self.scale
        c = arr.shape[2]
        mean = np.asarray(self.mean, dtype=np.float32)[:c]
        std = np.asarray(self.std, dtype=np.float32)[:c]
        arr = (arr - mean) / std
        if self.layout.upper() == "NCHW":
            arr = arr.transpose(2, 0, 1)
        elif self.layout.upper() != "NHWC":
            raise CalibrationError(f"image layout must be NCHW or NHWC, got '{self.layout}'")
        return np.ascontiguousarray(arr[None])


def default_held_out(count: int) -> int:
    """How many of ``count`` calibration samples are held out by default: a quarter, at least one
    when there are two or more (one sample cannot be both fitted to and held out)."""
    return max(1, count // 4) if count >= 2 else 0


def held_out_indices(count: int, held_out: int) -> list[int]:
    """``held_out`` indices evenly spaced through ``range(count)``: the last of each of ``held_out``
    equal runs (every 4th sample for a quarter)."""
    if not 0 <= held_out <= count:
        raise CalibrationError(f"cannot hold out {held_out} of {count} samples")
    return [(i + 1) * count // held_out - 1 for i in range(held_out)]


def _finite_sample(sample: dict[str, np.ndarray], description: str) -> dict[str, np.ndarray]:
    """The sample, or a CalibrationError naming the input that holds NaN or Inf (a fitted model would be
    NaN everywhere)."""
    for name, arr in sample.items():
        arr = np.asarray(arr)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise CalibrationError(f"calibration data ({description}): input '{name}' holds "
                                   f"{_nonfinite_words(arr)}; calibration values must be finite")
    return sample


def _nonfinite_words(arr: np.ndarray) -> str:
    nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    return " and ".join(w for w in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if w) + " value(s)"


@dataclass
class CalibrationSet:
    """A sequence of input samples. Build it with ``from_npz``, ``from_images``, ``random`` or
    ``from_source`` (what ``--calibration`` and the YAML ``calibration:`` key take)."""

    count: int
    _sample: Callable[[int], dict[str, np.ndarray]]
    description: str = ""
    input_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for k in range(self.count):
            yield self[k]

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if not 0 <= k < self.count:
            raise IndexError(k)
        return _finite_sample(self._sample(k), self.description)

    def take(self, n: int) -> "CalibrationSet":
        if n < 0:
            raise CalibrationError(f"cannot take {n} calibration samples")
        return CalibrationSet(min(n, self.count), self._sample, self.description, self.input_names)

    def subset(self, indices: Sequence[int], description: str) -> "CalibrationSet":
        """The samples at ``indices`` (in that order), as a set of their own."""
        picked = [int(k) for k in indices]
        if any(not 0 <= k < self.count for k in picked):
            raise CalibrationError(f"calibration data ({self.description}) has {self.count} samples; "
                                   f"cannot pick {picked}")
        sample = self._sample
        return CalibrationSet(len(picked), lambda k: sample(picked[k]), description, self.input_names)

    def split(self, held_out: int | None = None) -> "CalibrationSplit":
        """The fitting samples (what passes fit to) and the held-out ones (what errors are measured on,
        never shown to a pass): ``held_out`` samples (default: a quarter, at least one when there are
        two or more), evenly spaced through the set (samples ``n/h - 1``, ``2n/h - 1``, ...), so a
        folder sorted by name is sampled throughout. Deterministic: the same set splits the same way
        in ``sculpt run`` and ``sculpt compare``."""
        n = self.count
        h = default_held_out(n) if held_out is None else int(held_out)
        if not 0 <= h <= n:
            raise CalibrationError(f"cannot hold out {h} of the {n} calibration samples ({self.description})")
        held = held_out_indices(n, h)
        held_set = set(held)
        fitting = [k for k in range(n) if k not in held_set]
        return CalibrationSplit(
            self.subset(fitting, f"{len(fitting)} fitting samples of {self.description}"),
            self.subset(held, f"{h} held-out samples of {self.description}") if h else None,
            n)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Samples concatenated along the batch axis, ``batch_size`` at a time."""
        batch: list[dict[str, np.ndarray]] = []
        for sample in self:
            batch.append(sample)
            if len(batch) == batch_size:
                yield {k: np.concatenate([b[k] for b in batch]) for k in batch[0]}
                batch = []
        if batch:
            yield {k: np.concatenate([b[k] for b in batch]) for k in batch[0]}

    def check(self, model: Model) -> None:
        """Raise CalibrationError unless the samples feed exactly the model's real inputs."""
        expected = set(model.input_names)
        got = set(self.input_names)
        if got != expected:
            raise CalibrationError(f"calibration data ({self.description}) has inputs {sorted(got)}, "
                                   f"the model expects {sorted(expected)}")
        sample = self[0] if self.count else {}
        shapes = model.input_shapes()
        types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input
                 if vi.type.HasField("tensor_type")}
        for name, arr in sample.items():
            arr = np.asarray(arr)
            want = shapes.get(name) or []
            if want and (len(want) != arr.ndim or any(isinstance(d, int) and d > 0 and d != s
                                                      for d, s in zip(want, arr.shape))):
                raise CalibrationError(f"calibration input '{name}' has shape {list(arr.shape)}, the model "
                                       f"expects {want}")
            elem = types.get(name, 0)
            if elem:
                expected_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
                if arr.dtype != expected_dtype:
                    raise CalibrationError(f"calibration input '{name}' has dtype {arr.dtype}, the model "
                                           f"expects {expected_dtype}")

    # ---------------------------------------------------------------- sources
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], description: str = "arrays") -> "CalibrationSet":
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if not arrays:
            raise CalibrationError(f"{description}: no arrays")
        counts = {k: v.shape[0] if v.ndim else 0 for k, v in arrays.items()}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise CalibrationError(f"{description}: arrays must share a nonzero first (sample) axis, got {counts}")
        for name, a in arrays.items():
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                bad = np.flatnonzero(~np.isfinite(a).reshape(a.shape[0], -1).all(axis=1))
                raise CalibrationError(f"{description}: input '{name}' holds {_nonfinite_words(a)} (sample "
                                       f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}); "
                                       "calibration values must be finite")
        n = next(iter(counts.values()))
        return cls(n, lambda k: {name: a[k:k + 1] for name, a in arrays.items()}, description, list(arrays))

    @classmethod
    def from_npz(cls, path: str | os.PathLike, count: int | None = None) -> "CalibrationSet":
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: no such calibration file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as e:
            raise CalibrationError(f"{path}: not a readable .npz file ({e})") from None
        cal = cls.from_arrays(arrays, str(path))
        return cal.take(count) if count else cal

    @classmethod
    def from_images(cls, folder: str | os.PathLike, input_name: str, preprocessing: ImagePreprocessing,
                    count: int | None = None) -> "CalibrationSet":
        folder = Path(folder)
        if not folder.is_dir():
            raise CalibrationError(f"{folder}: no such image folder")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise CalibrationError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if count:
            files = files[:count]
        return cls(len(files), lambda k: {input_name: preprocessing(files[k])},
                   f"{len(files)} images from {folder}", [input_name])

    @classmethod
    def random(cls, model: Model, count: int = 8, seed: int = 0,
               input_shapes: Mapping[str, Sequence[int]] | None = None,
               low: float | None = None, high: float | None = None) -> "CalibrationSet":
        """Random samples: float inputs N(0, 1), or uniform in [low, high) when both are given."""
        if count <= 0:
            raise CalibrationError(f"random calibration: the sample count must be positive, got {count}")
        real = model.input_shapes()
        for name in input_shapes or {}:
            if name not in real:
                raise CalibrationError(f"random calibration: shape given for '{name}', but the model's inputs "
                                       f"are {', '.join(real) or '(none)'}")
        dynamic = model.dynamic_inputs()
        shapes = {n: list(s) for n, s in real.items()}
        shapes.update({k: list(v) for k, v in (input_shapes or {}).items()})
        for name, shape in shapes.items():
            given = name in (input_shapes or {})
            if (name in dynamic and not given) or any(
                    isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0 for d in shape):
                raise CalibrationError(f"random calibration: input '{name}' has a dynamic shape; give "
                                       f"--input-shape {name}=...")
            try:
                check_random_input_size(name, shape)
            except ShapeError as e:
                raise CalibrationError(f"random calibration: {e}") from None

        def sample(k: int) -> dict[str, np.ndarray]:
            feeds = random_inputs(model, seed=seed + k, shapes=shapes)  # no session: cheap per sample
            if low is not None and high is not None:
                rng = np.random.default_rng(seed + k)
                feeds = {n: (rng.uniform(low, high, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
                         for n, v in feeds.items()}
            return feeds

        return cls(count, sample, f"{count} random samples (seed {seed})", list(shapes))

    @classmethod
    def from_source(cls, source: str | Mapping, model: Model,
                    input_shapes: Mapping[str, Sequence[int]] | None = None) -> "CalibrationSet":
        """Build from ``--calibration`` text (``PATH.npz``, an image folder, ``random`` or
        ``random:COUNT``) or a YAML mapping ``{source: ..., count: N, mean: [...], std: [...],
        size: [H, W], layout: NCHW, channel_order: RGB, scale: 0.0039, seed: 0}``."""
        opts: dict = {}
        if isinstance(source, Mapping):
            opts = dict(source)
            if "source" not in opts:
                raise CalibrationError("calibration: the mapping needs a 'source' key")
            source = str(opts.pop("source"))
        known = {"count", "mean", "std", "size", "layout", "channel_order", "scale", "seed", "input",
                 "grayscale", "low", "high"}
        unknown = set(opts) - known
        if unknown:
            raise CalibrationError(f"calibration: unknown option '{sorted(unknown)[0]}' (known: {', '.join(sorted(known))})")
        count = opts.get("count")
        if count is not None:
            count = _positive_int(count, "calibration: 'count'")
        text = str(source)
        if text == "random" or text.startswith("random:"):
            n = _positive_int(text.split(":", 1)[1], f"calibration '{text}': the count") if ":" in text \
                else (count or 8)
            return cls.random(model, count=n, seed=int(opts.get("seed", 0)), input_shapes=input_shapes,
                              low=opts.get("low"), high=opts.get("high"))
        path = Path(text)
        if path.is_dir():
            names = model.input_names
            name = opts.get("input") or (names[0] if len(names) == 1 else None)
            if name is None:
                raise CalibrationError(f"{path}: the model has several inputs ({', '.join(names)}); say which one "
                                       "the images feed with 'input:'")
            if name not in names:
                raise CalibrationError(f"{path}: the images feed '{name}', which is not an input of the model "
                                       f"({', '.join(names) or 'none'})")
            shape = list((input_shapes or {}).get(name) or model.input_shapes().get(name) or [])
            layout = str(opts.get("layout", "NCHW")).upper()
            size = opts.get("size")
            if size is None:
                hw = shape[2:4] if layout == "NCHW" else shape[1:3]
                if len(hw) != 2 or any(not isinstance(d, int) or d <= 0 for d in hw):
                    raise CalibrationError(f"{path}: input '{name}' has no static height and width; give the "
                                           "image size (calibration 'size: [H, W]' or --input-shape)")
                size = hw
            channels = shape[1] if layout == "NCHW" and len(shape) == 4 else (shape[3] if len(shape) == 4 else 3)
            pre = ImagePreprocessing(
                height=int(size[0]), width=int(size[1]), mean=opts.get("mean", (0.0, 0.0, 0.0)),
                std=opts.get("std", (1.0, 1.0, 1.0)), scale=float(opts.get("scale", 1 / 255)), layout=layout,
                channel_order=str(opts.get("channel_order", "RGB")), grayscale=bool(opts.get("grayscale",
                                                                                          channels == 1)))
            return cls.from_images(path, name, pre, count=count)
        if path.suffix == ".npz" or path.is_file():
            return cls.from_npz(path, count=count)
        raise CalibrationError(f"{text}: calibration source not found (an .npz file, an image folder, "
                               "or 'random[:COUNT]')")


def _positive_int(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        n = int(value)
        if n != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise CalibrationError(f"{what} must be a positive integer, got {value!r}") from None
    if n <= 0:
        raise CalibrationError(f"{what} must be a positive integer, got {value!r}")
    return n


@dataclass
class CalibrationSplit:
    """A calibration set split in two: ``fitting`` (passes fit to these) and ``held_out`` (errors are
    measured on these; None when the set has fewer than two samples or nothing was held out)."""

    fitting: CalibrationSet
    held_out: CalibrationSet | None
    total: int

    def describe(self) -> str:
        """'8 held-out samples' style words for the measurement made on ``held_out``."""
        if self.held_out is None:
            return (f"{self.fitting.count} sample(s) the passes fitted to (none held out: give at least 2 "
                    "calibration samples)")
        return f"{self.held_out.count} held-out sample(s)"
