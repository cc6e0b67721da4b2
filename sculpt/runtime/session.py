"""onnxruntime sessions: build one for a model (intermediate tensors as extra outputs, models past
protobuf's 2 GiB limit through a file), run it, time it."""

from __future__ import annotations

import os
import tempfile
from typing import Mapping, Sequence

import numpy as np
import onnx

from sculpt.common import one_line
from sculpt.errors import RuntimeFailure
from sculpt.ir.model import Model, over_protobuf_limit


def make_session(model: Model | onnx.ModelProto, *, optimize: bool = True, threads: int | None = None,
                 extra_outputs: Sequence[str] = (), profile_prefix: str | None = None):
    """An onnxruntime CPU InferenceSession for a model; ``extra_outputs`` exposes intermediate tensors;
    ``profile_prefix``: onnxruntime's profiler on, its JSON written there (``session.end_profiling()``).
    The model itself is not modified."""
    import onnxruntime as ort

    proto = model.proto if isinstance(model, Model) else model
    big = over_protobuf_limit(proto)
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
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
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


QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def is_qdq_model(model: Model | onnx.ModelProto) -> bool:
    """The main graph holds QuantizeLinear/DequantizeLinear nodes (a quantized model in QDQ form)."""
    proto = model.proto if isinstance(model, Model) else model
    return any(n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx") for n in proto.graph.node)


def reference_session(model: Model | onnx.ModelProto, *, threads: int | None = None):
    """A session computing what the model's graph defines, for checking another runtime against it.
    For a QDQ model that is the graph as written (no graph optimizations): optimized, onnxruntime runs
    DequantizeLinear -> Conv/MatMul -> QuantizeLinear as its int8 kernels, whose u8 x s8 products
    saturate in 16 bits on AVX2 without VNNI (vpmaddubsw): on this machine a PP-LCNet classifier
    quantized by ``qdq`` came out 11% off the graph's own result, its first conv up to 9 steps off in
    10% of its outputs. Other models: the usual optimized session (the same result, faster)."""
    return make_session(model, optimize=not is_qdq_model(model), threads=threads)


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


def interleaved_latency_ms(sessions: Mapping[str, object], feeds: Mapping[str, np.ndarray], *, rounds: int = 3,
                           runs: int = 20) -> dict[str, float]:
    """Median over ``rounds`` of each session's median latency (ms), the sessions taking turns in every
    round so that a busy spell of the machine falls on all of them alike."""
    import statistics

    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            times[label].append(median_latency_ms(session, feeds, runs=runs))
    return {label: statistics.median(values) for label, values in times.items()}
