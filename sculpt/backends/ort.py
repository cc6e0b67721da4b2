"""onnxruntime as the reference: sessions, runs, random inputs, and the equivalence checker."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from sculpt.errors import ShapeError, SculptError
import sculpt.ir.model as _model_mod
from sculpt.common import one_line
from sculpt.ir.model import Model, _dims

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


class RuntimeFailure(SculptError):
    """onnxruntime refused or failed to run the model."""


def make_session(model: Model | onnx.ModelProto, *, optimize: bool = True, threads: int | None = None,
                 extra_outputs: Sequence[str] = ()):
    """An onnxruntime CPU InferenceSession for a model; ``extra_outputs`` exposes intermediate tensors.
    The model itself is not modified."""
    import onnxruntime as ort

    proto = model.proto if isinstance(model, Model) else model
    big = _model_mod.proto_byte_size(proto) > _model_mod._PROTOBUF_LIMIT
    added: list[str] = []
    if extra_outputs:
        if big:  # too big to copy cheaply: add the outputs for the session's sake, then take them away
            added = _append_outputs(proto, extra_outputs)
        else:
            proto = onnx.ModelProto.FromString(proto.SerializeToString())
            _append_outputs(proto, extra_outputs)
    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: errors reach the caller as exceptions, not as log lines
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        if big:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                Model.wrap(proto).save(path, external_data=True)
                return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise RuntimeFailure(f"onnxruntime cannot load the model: {one_line(e)}") from None
    finally:
        if added:
            keep = [o for o in proto.graph.output if o.name not in set(added)]
            del proto.graph.output[:]
            proto.graph.output.extend(keep)


def _append_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """Add graph outputs (untyped) for ``names`` that are not outputs yet; returns the names added."""
    existing = {o.name for o in proto.graph.output}
    added = []
    for n in names:
        if n not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=n))
            existing.add(n)
            added.append(n)
    return added


def run(model: Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, session=None,
        outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    sess = session or make_session(model)
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    if not names:
        return {}
    try:
        values = sess.run(names, dict(feeds))
    except Exception as e:
        raise RuntimeFailure(f"onnxruntime failed to run the model: {one_line(e)}") from None
    return dict(zip(names, values))


# random data is made for inputs up to this many elements (1 GiB of float32); a larger static input is
# almost always a broken shape (2^40 elements) and would exhaust memory before any error is shown
MAX_RANDOM_INPUT_ELEMENTS = 1 << 28


def check_random_input_size(name: str, dims: Sequence[int]) -> None:
    """ShapeError naming the input when random data of this shape would be absurdly large."""
    count = 1
    for d in dims:
        count *= int(d)
    if count > MAX_RANDOM_INPUT_ELEMENTS:
        raise ShapeError(f"input '{name}' has shape {list(dims)} ({count:.3g} elements, more than the "
                         f"{MAX_RANDOM_INPUT_ELEMENTS:.3g} sculpt makes random data for); give a realistic "
                         f"shape with --input-shape {name}=... or real data")


def random_inputs(model: Model, *, seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None,
                  session=None) -> dict[str, np.ndarray]:
    """Random inputs for every real input: float ~ N(0, 1), integers in [0, 4), bool coin flips.

    Dynamic dimensions must be given in ``shapes`` (or fixed in the model). Without a ``session`` the
    inputs are read from the model itself (no onnxruntime session is built)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    shapes = dict(shapes or {})
    specs = ([(i.name, i.shape, i.type) for i in session.get_inputs()] if session is not None
             else _input_specs(model))
    for name, model_shape, type_name in specs:
        dtype = _ORT_TO_NUMPY.get(type_name)
        if dtype is None:
            raise RuntimeFailure(f"input '{name}': cannot make random data of type {type_name}")
        shape = shapes.get(name, model_shape)
        if shape is None:
            raise ShapeError(f"input '{name}' has no shape in the model; give its shape "
                             f"(--input-shape {name}=...)")
        dims = []
        for i, d in enumerate(shape):
            if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0:
                raise ShapeError(f"input '{name}' has a dynamic dimension {i}; give its shape "
                                 f"(--input-shape {name}=...)")
            dims.append(int(d))
        check_random_input_size(name, dims)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype is np.bool_:
            feeds[name] = rng.integers(0, 2, dims).astype(np.bool_)
        else:
            feeds[name] = rng.integers(0, 4, dims).astype(dtype)
    return feeds


_ONNX_TO_ORT_TYPE = {
    onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.DOUBLE: "tensor(double)",
    onnx.TensorProto.FLOAT16: "tensor(float16)", onnx.TensorProto.INT64: "tensor(int64)",
    onnx.TensorProto.INT32: "tensor(int32)", onnx.TensorProto.INT16: "tensor(int16)",
    onnx.TensorProto.INT8: "tensor(int8)", onnx.TensorProto.UINT8: "tensor(uint8)",
    onnx.TensorProto.UINT16: "tensor(uint16)", onnx.TensorProto.UINT32: "tensor(uint32)",
    onnx.TensorProto.UINT64: "tensor(uint64)", onnx.TensorProto.BOOL: "tensor(bool)",
}


def _input_specs(model: Model | onnx.ModelProto) -> list[tuple[str, list | None, str]]:
    """(name, shape, onnxruntime type string) of the real inputs, read from the model proto the way
    onnxruntime reports them: a dynamic dimension is a str or None; an unknown rank is None."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    specs = []
    for vi in graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            specs.append((vi.name, None, "a non-tensor type"))
            continue
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = [d if not (isinstance(d, int) and d < 0) else None for d in _dims(vi)]
        specs.append((vi.name, shape, _ONNX_TO_ORT_TYPE.get(tt.elem_type, f"tensor type {tt.elem_type}")))
    return specs


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float  # max |a - b| / max(max |b|, tiny): error relative to the output's scale
    shape_match: bool = True

    def as_dict(self) -> dict:
        return {"output": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "shape_match": self.shape_match}


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
    if got.dtype.kind in "fc" or ref.dtype.kind in "fc":
        a = got.astype(np.float64)
        b = ref.astype(np.float64)
        nan_mismatch = np.isnan(a) != np.isnan(b)
        if nan_mismatch.any():
            return OutputError(name, float("inf"), float("inf"))
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
    return OutputError(name, max_abs, rel)


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
                                           prev.shape_match and err.shape_match)
    return Comparison(list(errors.values()), samples)


def median_latency_ms(model_or_session, feeds: Mapping[str, np.ndarray], *, runs: int = 20, warmup: int = 3,
                      threads: int | None = None) -> float:
    """Median wall time (ms) of ``runs`` runs after ``warmup`` runs; a Model gets its own session."""
    import statistics
    import time

    sess = model_or_session if hasattr(model_or_session, "run") and hasattr(model_or_session, "get_inputs") \
        else make_session(model_or_session, threads=threads)
    for _ in range(warmup):
        sess.run(None, dict(feeds))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, dict(feeds))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)

