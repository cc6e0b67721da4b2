"""Int8 quantization mechanism: scale/zero-point math, weight and bias quantization, and calibration
observers that turn activation statistics into a quantization range.

Conventions (those of ONNX QuantizeLinear/DequantizeLinear):

- ``q = saturate(round_half_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``;
- activations are per tensor, ``uint8`` asymmetric (the range always contains 0, so that 0 is exact)
  or ``int8`` symmetric (zero point 0, range ±127·scale);
- weights are ``int8`` symmetric in [-127, 127], per output channel (or per tensor);
- a bias is ``int32`` with scale ``input_scale * weight_scale`` (per channel) and zero point 0, which is
  what QLinearConv / int32 accumulation assume.

Range methods (:func:`choose_range`): ``minmax`` (observed extremes), ``percentile`` (tails beyond
the given percentile of the values clipped away), ``entropy`` (the clipping threshold of the
magnitudes that minimises the KL divergence between the value histogram and its quantized version,
as in TensorRT's calibrator) and ``mse`` (the clipping threshold that minimises the expected squared
quantization error, rounding and clipping together, under the value histogram).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

import numpy as np

ActivationType = Literal["uint8", "int8"]
RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]
RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")

WEIGHT_QMAX = 127  # int8 weights use the symmetric range [-127, 127]
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def qrange(dtype: ActivationType) -> tuple[int, int]:
    """The integer range of an activation type: uint8 → (0, 255); int8 → (-127, 127) (symmetric)."""
    if dtype == "uint8":
        return 0, 255
    if dtype == "int8":
        return -127, 127
    raise ValueError(f"unknown activation type '{dtype}' (uint8 or int8)")


def numpy_dtype(dtype: ActivationType):
    return np.uint8 if dtype == "uint8" else np.int8


@dataclass(frozen=True)
class QuantParams:
    """Per-tensor quantization parameters of an activation."""

    scale: float  # a float32 value
    zero_point: int
    dtype: ActivationType

    @property
    def lo(self) -> float:
        return float(np.float32(self.scale) * (qrange(self.dtype)[0] - self.zero_point))

    @property
    def hi(self) -> float:
        return float(np.float32(self.scale) * (qrange(self.dtype)[1] - self.zero_point))

    def scale_array(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float32)

    def zero_point_array(self) -> np.ndarray:
        return np.asarray(self.zero_point, dtype=numpy_dtype(self.dtype))


def activation_params(lo: float, hi: float, dtype: ActivationType = "uint8") -> QuantParams:
    """Scale and zero point for values in [lo, hi]. uint8: asymmetric, the range widened to contain 0;
    int8: symmetric about 0. A degenerate range (all zeros) gets scale 1."""
    lo, hi = float(min(lo, 0.0)), float(max(hi, 0.0))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"cannot quantize a non-finite range [{lo}, {hi}]")
    qmin, qmax = qrange(dtype)
    if dtype == "int8":
        bound = max(-lo, hi)
        scale = np.float32(bound / qmax) if bound > 0 else np.float32(1.0)
        return QuantParams(float(scale), 0, dtype)
    if hi - lo <= 0:
        return QuantParams(1.0, 0, dtype)
    scale = np.float32((hi - lo) / (qmax - qmin))
    zero_point = int(np.clip(np.round(qmin - lo / float(scale)), qmin, qmax))
    return QuantParams(float(scale), zero_point, dtype)


def quantize(x: np.ndarray, scale, zero_point, dtype, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (round half to even, saturate). ``scale``/``zero_point`` are
    scalars, or vectors along ``axis``."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point).astype(np.int64)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    np_dtype = np.dtype(dtype) if not isinstance(dtype, str) or dtype not in ("uint8", "int8") else \
        np.dtype(numpy_dtype(dtype))
    info = np.iinfo(np_dtype)
    q = np.rint(x / scale).astype(np.int64) + zp
    return np.clip(q, info.min, info.max).astype(np_dtype)


def dequantize(q: np.ndarray, scale, zero_point=0, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear in numpy."""
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point).astype(np.int64)
    if axis is not None and scale.ndim == 1:
        shape = [1] * np.ndim(q)
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((np.asarray(q).astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """x → dequantize(quantize(x)): the value a consumer of the QDQ pair sees."""
    return dequantize(quantize(x, params.scale, params.zero_point, params.dtype), params.scale, params.zero_point)


# ------------------------------------------------------------------------------------ weights and bias
@dataclass
class QuantizedWeight:
    values: np.ndarray  # int8
    scale: np.ndarray  # float32, shape (channels,) or ()
    axis: int | None  # None: per tensor

    def dequantized(self) -> np.ndarray:
        return dequantize(self.values, self.scale, 0, self.axis)


def weight_qmax(bits: int) -> int:
    """The symmetric weight range [-qmax, qmax] of ``bits``-bit weights (8: 127, 7: 63)."""
    if bits not in (7, 8):
        raise ValueError(f"weight bits must be 7 or 8, got {bits}")
    return (1 << (bits - 1)) - 1


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int = WEIGHT_QMAX) -> QuantizedWeight:
    """Symmetric int8 weights in [-qmax, qmax], per channel along ``axis`` (None: per tensor). A
    channel of zeros gets scale 1 (its values stay exactly 0)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        bound = float(np.max(np.abs(w))) if w.size else 0.0
        scale = np.asarray(bound / qmax if bound > 0 else 1.0, dtype=np.float32)
    else:
        axis = axis % w.ndim
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        bound = np.max(np.abs(w), axis=reduce) if w.size else np.zeros(w.shape[axis])
        scale = np.where(bound > 0, bound / qmax, 1.0).astype(np.float32)
    q = quantize(w, scale, np.zeros(scale.shape, np.int64), np.int8, axis)
    return QuantizedWeight(np.clip(q, -qmax, qmax).astype(np.int8), scale, axis)


def bias_scale(input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """The scale of an int32 bias: input scale × weight scale, in float32 as the runtimes compute it."""
    return (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)


def quantize_bias(b: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias and its scale (a vector when the weights are per channel)."""
    scale = bias_scale(input_scale, weight_scale)
    b = np.asarray(b, dtype=np.float64)
    q = np.clip(np.rint(b / scale.astype(np.float64)), INT32_MIN, INT32_MAX).astype(np.int32)
    return q, np.broadcast_to(scale, b.shape).astype(np.float32) if scale.ndim else scale


# ------------------------------------------------------------------------------------ observers
@dataclass
class TensorStats:
    """Statistics of one tensor over the calibration set: extremes, then (second sweep) a histogram of
    the values over the symmetric interval [-absmax, absmax]."""

    lo: float = np.inf
    hi: float = -np.inf
    bins: int = 2048
    hist: np.ndarray | None = None
    count: int = 0

    @property
    def absmax(self) -> float:
        return float(max(abs(self.lo), abs(self.hi))) if self.count else 0.0

    def observe_extremes(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        self.lo = min(self.lo, float(np.min(x)))
        self.hi = max(self.hi, float(np.max(x)))
        self.count += x.size

    def observe_histogram(self, x: np.ndarray) -> None:
        """Accumulate the value histogram (needs the extremes first)."""
        if self.hist is None:
            self.hist = np.zeros(2 * self.bins, dtype=np.float64)
        bound = self.absmax
        x = np.asarray(x, dtype=np.float32).ravel()
        if bound <= 0:
            self.hist[self.bins] += x.size
            return
        # bin index by arithmetic (np.histogram's general path is several times slower)
        idx = ((x + np.float32(bound)) * np.float32(self.bins / bound)).astype(np.int64)
        np.clip(idx, 0, 2 * self.bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=2 * self.bins)

    def centers(self) -> np.ndarray:
        bound = self.absmax
        width = 2 * bound / (2 * self.bins)
        return -bound + (np.arange(2 * self.bins) + 0.5) * width

    def magnitude_histogram(self) -> np.ndarray:
        """Histogram of |x| over [0, absmax] in ``bins`` bins (the two halves folded)."""
        assert self.hist is not None
        return self.hist[self.bins:] + self.hist[:self.bins][::-1]


def choose_range(stats: TensorStats, method: RangeMethod, dtype: ActivationType = "uint8", *,
                 percentile: float = 99.99) -> tuple[float, float]:
    """The [lo, hi] range to quantize a tensor with. ``minmax`` needs only the extremes; the others
    need the histogram."""
    if not stats.count:
        raise ValueError("no values observed")
    lo, hi = stats.lo, stats.hi
    if method == "minmax" or stats.absmax <= 0:
        return lo, hi
    if stats.hist is None:
        raise ValueError(f"calibration method '{method}' needs a histogram")
    if method == "percentile":
        return _percentile_range(stats, percentile)
    if method == "entropy":
        # levels over the magnitudes: a non-negative tensor in uint8 uses all 256, otherwise one side's 128
        levels = 256 if dtype == "uint8" and lo >= 0 else 128
        threshold = _entropy_threshold(stats.magnitude_histogram(), stats.absmax, levels)
    elif method == "mse":
        threshold = _mse_threshold(stats, dtype)
    else:
        raise ValueError(f"unknown calibration method '{method}' ({', '.join(RANGE_METHODS)})")
    return max(lo, -threshold), min(hi, threshold)


def _percentile_range(stats: TensorStats, percentile: float) -> tuple[float, float]:
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    cdf = np.cumsum(stats.hist)
    total = cdf[-1]
    tail = total * (100.0 - percentile) / 100.0
    edges = np.linspace(-stats.absmax, stats.absmax, 2 * stats.bins + 1)
    lo_idx = int(np.searchsorted(cdf, tail, side="right"))
    hi_idx = int(np.searchsorted(cdf, total - tail, side="left"))
    lo = max(stats.lo, float(edges[min(lo_idx, len(edges) - 1)]))
    hi = min(stats.hi, float(edges[min(hi_idx + 1, len(edges) - 1)]))
    return lo, hi


def _entropy_threshold(magnitudes: np.ndarray, absmax: float, levels: int) -> float:
    """TensorRT-style: the clipping threshold t over |x| minimising KL(P || Q), where P is the
    magnitude histogram clipped at t (outliers added to the last bin) and Q is P merged into
    ``levels`` quantization bins and expanded back over the non-empty bins."""
    bins = len(magnitudes)
    width = absmax / bins
    levels = max(2, min(levels, bins))
    candidates = np.unique(np.linspace(levels, bins, min(128, bins - levels + 1)).astype(int))
    best, best_kl = bins, np.inf
    for i in candidates:
        p = magnitudes[:i].astype(np.float64).copy()
        p[-1] += magnitudes[i:].sum()
        if p.sum() <= 0:
            continue
        idx = (np.arange(i) * levels) // i  # which quantization level each bin merges into
        nonzero = magnitudes[:i] > 0
        merged = np.bincount(idx, weights=magnitudes[:i].astype(np.float64), minlength=levels)
        support = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, merged[idx] / np.maximum(support[idx], 1), 0.0)
        if q.sum() <= 0:
            continue
        p_n, q_n = p / p.sum(), q / q.sum()
        mask = p_n > 0
        with np.errstate(divide="ignore"):
            kl = float(np.sum(p_n[mask] * np.log(p_n[mask] / np.where(q_n[mask] > 0, q_n[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return float(best * width)


def _mse_threshold(stats: TensorStats, dtype: ActivationType, steps: int = 100) -> float:
    """The clipping threshold (a fraction of absmax) whose quantization grid minimises the expected
    squared error of the histogram's values (rounding inside the range, clipping outside)."""
    centers = stats.centers()
    mask = stats.hist > 0
    centers, weights = centers[mask].astype(np.float64), stats.hist[mask]
    thresholds = stats.absmax * np.linspace(1.0 / steps, 1.0, steps)
    info = np.iinfo(numpy_dtype(dtype))  # QuantizeLinear saturates to the type's range
    errors = np.empty(steps)
    for i, t in enumerate(thresholds):  # one candidate grid at a time, all bins at once
        p = activation_params(max(stats.lo, -t), min(stats.hi, t), dtype)
        q = np.clip(np.rint(centers / p.scale) + p.zero_point, info.min, info.max)
        errors[i] = np.sum(weights * ((q - p.zero_point) * p.scale - centers) ** 2)
    return float(thresholds[int(np.argmin(errors))])


def collect_stats(batches: Iterable[Mapping[str, np.ndarray]], tensors: Iterable[str], *, histogram: bool,
                  rerun=None, bins: int = 2048) -> dict[str, TensorStats]:
    """Statistics of ``tensors`` over activation batches (``{tensor: value}`` per sample).
    ``histogram``: a second sweep over ``rerun()`` (a fresh iterable of the same batches) fills the
    histograms over the observed extremes."""
    stats = {t: TensorStats(bins=bins) for t in tensors}
    for acts in batches:
        for name, s in stats.items():
            s.observe_extremes(acts[name])
    if histogram:
        for acts in rerun():
            for name, s in stats.items():
                s.observe_histogram(acts[name])
    return stats


# ------------------------------------------------------------------------------------ layer error
@dataclass
class LayerError:
    """Quantization error of one layer measured on calibration data: the layer run on fake-quantized
    inputs with quantized weights (and its output quantized) against the float layer."""

    layer: str
    error_energy: float = 0.0  # sum of squared differences
    channel_sum: np.ndarray | None = None  # per output channel: sum and sum of squares of the float output
    channel_sumsq: np.ndarray | None = None
    channel_shift: np.ndarray | None = None  # per output channel: sum of (float - quantized) before output rounding
    positions: int = 0  # values per channel observed (over all samples)

    def observe(self, reference: np.ndarray, compared: np.ndarray, channel_axis: int) -> None:
        """One sample: the float output and the quantized layer's output as the next layer sees it."""
        ref = _per_channel_rows(reference, channel_axis)
        if self.channel_sum is None:
            self.channel_sum = np.zeros(ref.shape[1])
            self.channel_sumsq = np.zeros(ref.shape[1])
        self.channel_sum += ref.sum(0)
        self.channel_sumsq += (ref ** 2).sum(0)
        self.positions += ref.shape[0]
        self.error_energy += float(np.sum((ref - _per_channel_rows(compared, channel_axis)) ** 2))

    def observe_shift(self, reference: np.ndarray, quantized: np.ndarray, channel_axis: int) -> None:
        """Accumulate float minus quantized output per channel (before activation and output rounding)."""
        diff = _per_channel_rows(reference, channel_axis) - _per_channel_rows(quantized, channel_axis)
        self.channel_shift = diff.sum(0) if self.channel_shift is None else self.channel_shift + diff.sum(0)

    @property
    def signal_energy(self) -> float:
        """Sum of squared float outputs about their per-channel means."""
        if self.channel_sum is None or not self.positions:
            return 0.0
        return float(np.sum(self.channel_sumsq - self.channel_sum ** 2 / self.positions))

    @property
    def relative_error(self) -> float:
        """Noise-to-signal ratio ||y - y_q||² / ||y - mean||²."""
        signal = self.signal_energy
        return self.error_energy / signal if signal > 0 else (0.0 if self.error_energy == 0 else float("inf"))

    def mean_shift(self) -> np.ndarray | None:
        """Per-channel mean of float minus quantized output: what bias correction adds to the bias."""
        if self.channel_shift is None or not self.positions:
            return None
        return self.channel_shift / self.positions


def _per_channel_rows(a: np.ndarray, channel_axis: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(a, dtype=np.float64), channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def select_sensitive(errors: Mapping[str, float], *, count: int = 0, budget: float | None = None) -> list[str]:
    """Layers to keep in float, worst first: the ``count`` worst, and then more until the summed
    relative error of the layers still quantized is at most ``budget``."""
    ranked = sorted(errors, key=lambda k: (-errors[k], k))
    keep = ranked[:max(0, count)]
    if budget is not None:
        rest = ranked[len(keep):]
        remaining = float(sum(errors[k] for k in rest))
        while rest and remaining > budget:
            worst = rest.pop(0)
            keep.append(worst)
            remaining -= errors[worst]
    return keep
