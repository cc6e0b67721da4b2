"""Shared mechanism of the substitution passes (low-rank, depthwise-separable, fire-module): the
layers they may replace (``CandidateLayer``; which Convs qualify), the output-error algebra of a
replacement weight on the calibration patches, fresh names for the new nodes, splicing the
replacements into the graph, the MAC report. Their skeleton (select → fit → splice → refit) is
``sculpt.passes.layer_substitution``; the passes keep the policy (which layers, which shapes, how
to fit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from sculpt.ir.channel_handlers import attr
from sculpt.ir.cost import CostReport, cost_of
from sculpt.ir.model import Model


def conv_unsupported(node, bias) -> str | None:
    """Why a Conv cannot be substituted whatever its kernel: groups, auto padding, a computed bias."""
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if attr(node, "group", 1) != 1:
        return "grouped Conv"
    if auto not in ("NOTSET", "VALID"):
        return f"auto_pad={auto}"
    if len(node.input) > 2 and node.input[2] and bias is None:
        return "bias is not a constant"
    return None


@dataclass
class CandidateLayer:
    """A layer a substitution pass may replace: its node, constant weight and bias, static input and
    output shapes, MACs, and the rows of its input sampled on calibration data (im2col patches for a
    Conv), filled by the capture and emptied once the layer is fitted."""

    node: onnx.NodeProto
    w: np.ndarray
    bias: np.ndarray | None
    x_shape: tuple
    y_shape: tuple
    macs: int
    rows: list = field(default_factory=list)


def conv_candidates(model: Model, pattern_ok, *, min_macs: int = 0) -> tuple[list[CandidateLayer], list[dict]]:
    """2-D, group-1, k×k (kh·kw > 1) Convs with a constant float weight and static shapes."""
    layers, skipped = [], []
    graph_inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type != "Conv":
            continue
        if not pattern_ok(node.name):
            continue
        w = model.get_constant(node.input[1])
        bias = model.get_constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        x_shape, y_shape = model.static_shape(node.input[0]), model.static_shape(node.output[0])
        reason = None
        if w is None or node.input[1] in graph_inputs:
            reason = "weight is not a constant"
        elif w.dtype not in (np.float32, np.float64):
            reason = f"weight dtype {w.dtype}"
        elif w.ndim != 4:
            reason = f"{w.ndim - 2}-D kernel"
        elif w.shape[2] * w.shape[3] == 1:
            reason = "1×1 kernel"
        elif x_shape is None or y_shape is None:
            reason = "no static shapes"
        elif conv_unsupported(node, bias):
            reason = conv_unsupported(node, bias)
        else:
            macs = int(np.prod(y_shape)) * int(np.prod(w.shape[1:]))
            if macs < min_macs:
                reason = f"{macs} MACs < min_macs"
            else:
                layers.append(CandidateLayer(node, w, bias, x_shape, y_shape, macs))
        if reason:
            skipped.append({"layer": node.name, "reason": reason})
    return layers, skipped


def patch_moments(layer: CandidateLayer) -> tuple[np.ndarray, float]:
    """(Σp = E[p pᵀ] over the sampled patches, E‖W p + b‖²) — the output error of any replacement
    weight Ŵ is tr((W − Ŵ)ᵀ Σp (W − Ŵ)) in im2col form."""
    p = np.concatenate(layer.rows).astype(np.float64)
    wmat = layer.w.reshape(layer.w.shape[0], -1).T.astype(np.float64)
    y = p @ wmat
    if layer.bias is not None:
        y = y + layer.bias.reshape(-1)
    return p.T @ p / len(p), float((y ** 2).sum() / len(p))


def rel_error(sigma: np.ndarray, y2: float, delta: np.ndarray) -> float:
    """sqrt(tr(Δᵀ Σp Δ) / E‖y‖²): one BLAS product, not a three-operand einsum (F²·O scalar loops)."""
    return float(np.sqrt(max(float(((sigma @ delta) * delta).sum()), 0.0) / max(y2, 1e-30)))


def ridge_solve(a: np.ndarray, b: np.ndarray, ridge: float) -> np.ndarray:
    lam = ridge * max(float(np.mean(np.diag(a))), 1e-12)
    a = a + lam * np.eye(a.shape[0])
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


class NameAllocator:
    """Fresh tensor / node / initializer names for replacement nodes built before any is inserted
    (so ``model.unique_name`` alone cannot see the names already handed out)."""

    def __init__(self, model: Model):
        self.model = model
        self.reserved: set[str] = set()

    def fresh(self, prefix: str) -> str:
        name = self.model.unique_name(prefix)
        k = 1
        while name in self.reserved:
            name = self.model.unique_name(f"{prefix}_{k}")
            k += 1
        self.reserved.add(name)
        return name

    def initializer(self, prefix: str, value: np.ndarray, dtype) -> str:
        name = self.fresh(prefix)
        self.model.set_initializer(name, np.ascontiguousarray(value, dtype=dtype))
        return name


def splice(model: Model, replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Put each replaced node's new nodes where it stood; drop what is no longer used."""
    if not replacements:
        return
    nodes = []
    for n in model.graph.node:
        nodes.extend(replacements.get(n.name, [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph_edited()
    model.remove_unused()
    model.infer_shapes(refresh=True)


def substitution_stats(before: CostReport, model: Model, count_key: str, report: list[dict],
                       skipped: list[dict], changed: bool) -> dict[str, Any]:
    after = cost_of(model) if changed else before
    return {count_key: len(report), "macs_before": before.macs, "macs_after": after.macs,
            "macs_reduction": 1 - after.macs / before.macs if before.macs else 0.0,
            "params_before": before.params, "params_after": after.params, "layers": report, "skipped": skipped}


def name_selected(name: str, layers: list[str], ignore: list[str]) -> bool:
    """In ``layers`` (fnmatch patterns; empty means every layer) and not in ``ignore``."""
    import fnmatch

    if layers and not any(fnmatch.fnmatch(name, p) for p in layers):
        return False
    return not any(fnmatch.fnmatch(name, p) for p in ignore)
