"""Data capture: the values of a model's tensors on calibration samples, and the shapes ONNX shape
inference leaves unknown, measured with one onnxruntime run."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from sculpt.errors import CalibrationError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.model import Model
from sculpt.ir.random_inputs import random_inputs
from sculpt.runtime.session import make_session, run


def iter_activations(model: Model, tensors: Sequence[str], calibration: CalibrationSet,
                     *, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Run the model on each calibration sample; yield ``{tensor: value}`` for the tensors asked
    for only (graph outputs are not kept unless asked), one sample at a time."""
    names = list(dict.fromkeys(tensors))
    known = set(model.producers()) | {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    missing = [n for n in names if n not in known]
    if missing:
        raise CalibrationError(f"activation capture: the model has no tensor '{missing[0]}'")
    if not names:
        for k, _ in enumerate(calibration):
            if limit is not None and k >= limit:
                break
            yield {}
        return
    sess = make_session(model, extra_outputs=names)
    inputs = {i.name for i in sess.get_inputs()}
    for k, sample in enumerate(calibration):
        if limit is not None and k >= limit:
            break
        yield run(model, {n: v for n, v in sample.items() if n in inputs}, session=sess, outputs=names)


def sampled_activations(model, tensors, calibration, samples: int, positions: int, seed: int):
    """For each of the first ``samples`` calibration samples: (the values of ``tensors``, how many
    output positions to sample per layer in it, the random generator to sample them with). The
    ``positions`` budget per layer is spread over the samples. One model run per sample."""
    rng = np.random.default_rng(seed)
    n = min(samples, len(calibration))
    per = max(1, positions // max(n, 1))
    for acts in iter_activations(model, sorted(set(tensors)), calibration, limit=n):
        yield acts, per, rng


def measured_shapes(work: Model, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` measured by running the model once in onnxruntime ({} if it cannot run)."""
    if not names or work.dynamic_inputs():
        return {}
    try:
        sess = make_session(work, optimize=False, extra_outputs=names)
        values = sess.run(list(names), random_inputs(work, seed=0))
    except Exception:  # noqa: BLE001 - RuntimeFailure, ShapeError, onnxruntime errors: shapes stay unknown
        return {}
    # sequences and optionals are not tensors and have no shape
    return {n: tuple(int(d) for d in v.shape) for n, v in zip(names, values) if isinstance(v, np.ndarray)}
