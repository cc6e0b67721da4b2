"""The equivalence checker: two models run through onnxruntime on the same inputs, the error of each
output relative to its scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from sculpt.ir.model import Model
from sculpt.ir.random_inputs import random_inputs
from sculpt.runtime.session import make_session, run


# a quantizer's output may be one step from onnxruntime's where onnxruntime's x / scale lies this close
# to a rounding tie (k + 0.5), in steps: two correct evaluations compute x to float32 rounding, in
# different orders (flips measured on the zoo's QDQ builds: at most 1.9e-4 steps from a tie)
ROUNDING_TIE_TOLERANCE = 1e-2


def rounding_tie_distance(x: np.ndarray, scale: np.ndarray, axis: int = 1) -> np.ndarray:
    """|x / scale - (k + 0.5)| in steps, elementwise, with x / scale computed in float32 as a
    QuantizeLinear does; a 1-D ``scale`` of several values runs along ``axis``."""
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    if scale.size > 1 and x.ndim:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = scale.size
        scale = scale.reshape(shape)
    v = (x / scale).astype(np.float64)
    return np.abs(v - np.floor(v) - 0.5)


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float  # max |a - b| / max(max |b|, tiny): error relative to the output's scale
    shape_match: bool = True
    nonfinite: bool = False  # the candidate gave NaN or Inf where the reference's value is finite

    def as_dict(self) -> dict:
        return {"output": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "shape_match": self.shape_match, "nonfinite": self.nonfinite}


@dataclass
class Comparison:
    """Per-output errors of a candidate model against a reference, over all compared inputs."""

    outputs: list[OutputError] = field(default_factory=list)
    samples: int = 0

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def nonfinite_outputs(self) -> list[str]:
        """Outputs where the candidate gave NaN or Inf and the reference a finite value."""
        return [o.name for o in self.outputs if o.nonfinite]

    def within(self, rtol: float, atol: float = 0.0) -> bool:
        """True when every output is within ``rtol`` relative (to its scale) or ``atol`` absolute."""
        return all(o.shape_match and (o.max_rel <= rtol or o.max_abs <= atol) for o in self.outputs)

    def as_dict(self) -> dict:
        return {"samples": self.samples, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "outputs": [o.as_dict() for o in self.outputs]}


def output_error(name: str, got: np.ndarray, ref: np.ndarray) -> OutputError:
    if got.shape != ref.shape:
        return OutputError(name, float("inf"), float("inf"), shape_match=False)
    if got.size == 0:
        return OutputError(name, 0.0, 0.0)
    nonfinite = False
    if got.dtype.kind in "fc" or ref.dtype.kind in "fc":
        a = got.astype(np.float64)
        b = ref.astype(np.float64)
        nonfinite = bool(np.any(~np.isfinite(a) & np.isfinite(b)))
        nan_mismatch = np.isnan(a) != np.isnan(b)
        if nan_mismatch.any():
            return OutputError(name, float("inf"), float("inf"), nonfinite=nonfinite)
        both_inf_equal = np.isinf(b) & (a == b)
        with np.errstate(invalid="ignore"):  # inf - inf where both are the same inf: masked below
            diff = np.where(np.isnan(b) | both_inf_equal, 0.0, np.abs(a - b))
        max_abs = float(np.max(diff))
        finite = np.abs(b[np.isfinite(b)])
        scale = float(finite.max()) if finite.size else 0.0
    else:
        max_abs = float(np.max(np.abs(got.astype(np.int64) - ref.astype(np.int64)))) if got.dtype != np.bool_ \
            else float(np.any(got != ref))
        scale = float(np.max(np.abs(ref.astype(np.float64)))) if ref.dtype != np.bool_ else 1.0
    rel = max_abs / max(scale, 1e-30) if max_abs else 0.0
    return OutputError(name, max_abs, rel, nonfinite=nonfinite)


def compare_models(reference: Model, candidate: Model, inputs: Iterable[Mapping[str, np.ndarray]] | None = None,
                   *, seed: int = 0, count: int = 1, shapes: Mapping[str, Sequence[int]] | None = None,
                   output_map: Mapping[str, str] | None = None) -> Comparison:
    """Run both models through onnxruntime on the same inputs; max abs and relative error per output.

    ``inputs``: an iterable of feed dicts; by default ``count`` random feeds. Outputs are matched by
    name (``output_map`` maps reference names to candidate names where they differ); a reference
    output missing from the candidate is reported as a mismatch.
    """
    ref_sess = make_session(reference)
    cand_sess = make_session(candidate)
    if inputs is None:
        inputs = [random_inputs(reference, seed=seed + k, shapes=shapes, session=ref_sess) for k in range(count)]
    output_map = dict(output_map or {})
    cand_names = {o.name for o in cand_sess.get_outputs()}
    errors: dict[str, OutputError] = {}
    samples = 0
    cand_inputs = {i.name for i in cand_sess.get_inputs()}
    for feeds in inputs:
        samples += 1
        ref_out = run(reference, feeds, session=ref_sess)
        cand_out = run(candidate, {k: v for k, v in feeds.items() if k in cand_inputs}, session=cand_sess)
        for name, ref in ref_out.items():
            cname = output_map.get(name, name)
            if cname not in cand_names:
                err = OutputError(name, float("inf"), float("inf"), shape_match=False)
            else:
                err = output_error(name, np.asarray(cand_out[cname]), np.asarray(ref))
            prev = errors.get(name)
            if prev is None:
                errors[name] = err
            else:
                errors[name] = OutputError(name, max(prev.max_abs, err.max_abs), max(prev.max_rel, err.max_rel),
                                           prev.shape_match and err.shape_match, prev.nonfinite or err.nonfinite)
    return Comparison(list(errors.values()), samples)
