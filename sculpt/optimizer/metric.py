"""What `optimize` keeps within the budget: the user's own metric (``FILE.py:FUNC``, a function of a model
path returning a number, higher is better), or a fidelity proxy measured against the input model on
held-out calibration samples when there is none.

The proxies: *top-1 agreement* (percent of the samples and positions where the arg-max over the last axis
of the first output is the input model's: classifier-like outputs, a rank-2 or rank-3 output whose last
axis has at least two classes), otherwise the *relative output error* (max |a-b| / max |b| over the
samples and outputs, the error `sculpt run` reports). Each metric says how a value compares with the
input model's (``drop``): in the metric's own units, positive when worse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from sculpt.common import one_line
from sculpt.errors import OptionError, SculptError
from sculpt.ir.model import Model


class MetricError(SculptError):
    """The user's metric failed, or returned something that is not a finite number."""


@dataclass
class Metric:
    """A measure of a candidate model; ``evaluate(model, path)`` gives its value (``path``: the model
    saved to disk, what a user metric reads)."""

    name: str
    higher_is_better: bool
    units: str
    identity: str  # what the cache keys on: the metric and, for a user metric, its file's content
    evaluate: Callable[[Model, Path], float] = field(repr=False)
    kind: str = "user"  # user | agreement | error
    resolution: float | None = None  # the smallest change the metric can show (a proxy on few samples)

    def drop(self, base: float, value: float) -> float:
        """How much worse ``value`` is than ``base``, in the metric's units (negative: better)."""
        return base - value if self.higher_is_better else value - base

    def describe(self) -> str:
        if self.kind == "user":
            return f"the user's metric {self.name} (higher is better)"
        where = "held-out calibration samples against the input model"
        if self.kind == "agreement":
            return f"proxy: top-1 agreement with the input model in percent, on {where}"
        return f"proxy: relative output error (max |a-b| / max |b|), on {where}"


def load_user_metric(spec: str) -> Metric:
    """``FILE.py:FUNC`` → a Metric calling ``FUNC(model_path)``; one-line errors for a missing file or
    function, a file that fails to import, or a FUNC that is not callable."""
    path_text, sep, func_name = str(spec).rpartition(":")
    if not sep or not path_text or not func_name:
        raise OptionError(f"--metric '{spec}': give FILE.py:FUNC, a Python file and the function in it "
                          "that takes a model path and returns a number (higher is better)")
    path = Path(path_text)
    if not path.is_file():
        raise OptionError(f"--metric {path}: no such file")
    if not func_name.isidentifier():
        raise OptionError(f"--metric '{spec}': '{func_name}' is not a Python function name")
    content = path.read_bytes()
    module_name = f"sculpt_user_metric_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise OptionError(f"--metric {path}: not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling inside the user's file look it up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise OptionError(f"--metric {path}: importing it failed: {one_line(e, 300)}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise OptionError(f"--metric {path}: has no function '{func_name}'")

    def evaluate(model: Model, saved: Path) -> float:
        try:
            value = func(str(saved))
        except Exception as e:
            raise MetricError(f"--metric {path}:{func_name} failed on {saved.name}: {one_line(e, 300)}") from None
        return _finite_number(value, f"--metric {path}:{func_name}")

    identity = f"user:{path.resolve()}:{func_name}:{hashlib.sha256(content).hexdigest()}"
    return Metric(f"{path.name}:{func_name}", True, "the metric's own units", identity, evaluate, "user")


def _finite_number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetricError(f"{where} returned {type(value).__name__} {one_line(value, 60)!r}, not a number") from None
    if not math.isfinite(number):
        raise MetricError(f"{where} returned {number}: a metric must be a finite number")
    return number


def is_classifier_like(shape: Sequence) -> bool:
    """A rank-2 ([batch, classes]) or rank-3 ([batch, positions, classes]) output with ≥ 2 classes."""
    return len(shape) in (2, 3) and isinstance(shape[-1], (int, np.integer)) and int(shape[-1]) >= 2


def proxy_metric(reference: Model, samples: Sequence[Mapping[str, np.ndarray]], *, kind: str = "auto") -> Metric:
    """The fidelity proxy for ``reference`` (the input model) on ``samples`` (held-out calibration
    samples): ``kind`` agreement | error | auto (agreement for a classifier-like first output)."""
    from sculpt.runtime import make_session, output_error, run

    if not samples:
        raise OptionError("the proxy metric needs held-out samples: give --calibration with at least 2 samples")
    session = make_session(reference)
    expected = [run(reference, feeds, session=session) for feeds in samples]
    first = reference.graph.output[0].name
    if kind == "auto":
        kind = "agreement" if is_classifier_like(np.asarray(expected[0][first]).shape) else "error"
    if kind not in ("agreement", "error"):
        raise OptionError(f"proxy metric '{kind}': agreement, error or auto")
    digest = hashlib.sha256()
    for feeds in samples:
        for name in sorted(feeds):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(feeds[name]).tobytes())
    identity = f"proxy:{kind}:{len(samples)}:{digest.hexdigest()[:16]}"

    def outputs_of(model: Model) -> list[dict[str, np.ndarray]]:
        sess = make_session(model)
        return [run(model, feeds, session=sess) for feeds in samples]

    if kind == "agreement":
        labels = [np.asarray(out[first]).argmax(axis=-1) for out in expected]

        def agreement(model: Model, saved: Path) -> float:
            got = outputs_of(model)
            same = total = 0
            for want, out in zip(labels, got):
                values = np.asarray(out.get(first))
                if values.shape[:-1] != want.shape:
                    return 0.0
                same += int(np.sum(values.argmax(axis=-1) == want))
                total += want.size
            return 100.0 * same / total if total else 0.0

        positions = sum(int(label.size) for label in labels)
        return Metric("top-1 agreement", True, "percent", identity, agreement, "agreement",
                      resolution=100.0 / max(positions, 1))

    def relative_error(model: Model, saved: Path) -> float:
        worst = 0.0
        for want, out in zip(expected, outputs_of(model)):
            for name, ref in want.items():
                if name not in out:
                    return math.inf
                worst = max(worst, output_error(name, np.asarray(out[name]), np.asarray(ref)).max_rel)
        return worst

    return Metric("relative output error", False, "max |a-b| / max |b|", identity, relative_error, "error")


def default_max_drop(metric: Metric) -> float:
    """The budget when none is given: one point of top-1 agreement, or a relative output error of 0.05;
    a user metric has no default (its units are the user's)."""
    if metric.kind == "agreement":
        return 1.0
    if metric.kind == "error":
        return 0.05
    raise OptionError("--max-drop is needed with --metric: the drop allowed, in the metric's own units "
                      "(with a metric in percent, --max-drop 1 allows one point)")
