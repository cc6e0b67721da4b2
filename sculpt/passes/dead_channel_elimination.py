"""dead-channel-elimination: remove channels that are provably zero (or constant) from whole groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sculpt.errors import PassError
from sculpt.ir.channel_handlers import attr
from sculpt.ir.channel_values import ChannelValues
from sculpt.ir.channels import ChannelGraph, Dim
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, allow_plain_initializers, check_range, option, register


@register
@dataclass
class DeadChannelElimination(Pass):
    """Remove channels that are provably zero wherever they are read — producing weights and bias
    zero, BatchNorm gamma and beta zero, zero after Relu — from every member of their channel group.
    A channel that is constant but not zero is folded into the bias of the Conv/Gemm that reads it
    where that is exact (no zero padding in that Conv), then removed. Exact by construction.

    With ``data_driven=true`` channels whose activations are never above ``threshold`` in absolute
    value on the calibration set are treated as zero too; the pass is then lossy."""

    name = "dead-channel-elimination"
    exact = True
    needs_static_shapes = True

    data_driven: bool = option(False, help="also remove channels never active on the calibration data (lossy)")
    threshold: float = option(0.0, help="with data_driven: largest |activation| still counted as inactive")
    samples: int = option(16, help="with data_driven: calibration samples to look at")

    def __post_init__(self):
        if self.data_driven:
            self.exact = False  # instance-level: the pipeline measures, rather than checks, its error
        check_range("threshold", self.threshold, 0)
        if self.samples < 1:
            raise ValueError("samples must be ≥ 1")

    def requires(self, model, ctx):
        super().requires(model, ctx)
        if self.data_driven and ctx.calibration is None:
            raise PassError(self.name, "data_driven=true needs calibration data (--calibration)")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        allow_plain_initializers(model)
        cg = ChannelGraph.build(model)
        values = ChannelValues(cg).analyse()
        inactive: dict[Dim, np.ndarray] = {}
        if self.data_driven:
            inactive = self._inactive(model, cg, ctx)
        # where the channels of a unit leave its group: the inputs of the nodes that reduce over them.
        # A unit can go when it is provably zero at every one of those places, or constant where the
        # reader can take the constant into its bias exactly.
        readers = [(c, True) for c in cg.consumers] + [(c, False) for c in cg.partial_consumers]
        folds_by_unit: dict[int, list[tuple[str, int, float]]] = {}  # unit → (reader, input channel, constant)
        blocked: set[int] = set()
        consumed: set[int] = set()
        nodes = {n.name: n for n in model.graph.node}
        for c, dense in readers:
            labels = cg.unit_labels(c.dim)
            vals = values.get(c.dim).copy()
            if c.dim in inactive:
                vals = np.where(inactive[c.dim], 0.0, vals)
            consumed.update(labels.tolist())
            absorbable = dense and _can_absorb(model, nodes[c.node])
            for idx, (u, v) in enumerate(zip(labels.tolist(), vals.tolist())):
                if np.isnan(v):
                    blocked.add(u)
                elif v != 0.0:
                    if absorbable:
                        folds_by_unit.setdefault(u, []).append((c.node, idx, v))
                    else:
                        blocked.add(u)
        removable = [u for g in cg.prunable_groups() for u in g.prunable_units
                     if u not in blocked and u in consumed]  # a unit nothing reads is left alone
        # keep at least one channel in every dimension
        removable = cg.feasible(removable, min_keep=1)
        gone = set(removable)
        folds = [f for u in removable for f in folds_by_unit.get(u, [])]
        for node_name, channel, value in folds:
            _absorb(model, nodes[node_name], channel, value)
        kept = cg.remove_units(removable) if removable else {}
        removed_per_group = {}
        for g in cg.groups:
            n = len(set(g.prunable_units) & gone)
            if n:
                removed_per_group[g.describe()] = n
        return PassResult(model, bool(removable), {"removed_channels": len(removable),
                                                   "folded_constants": len(folds),
                                                   "groups": removed_per_group,
                                                   "changed_tensors": len(kept)})

    def _inactive(self, model: Model, cg: ChannelGraph, ctx: PassContext) -> dict[Dim, np.ndarray]:
        from sculpt.runtime import iter_activations

        dims = {c.dim for c in cg.consumers + cg.partial_consumers}
        tensors = sorted({d.tensor for d in dims})
        peak = {d: np.zeros(cg.sizes[d]) for d in dims}
        for acts in iter_activations(model, tensors, ctx.calibration, limit=self.samples):
            for d in dims:
                a = np.abs(acts[d.tensor])
                axes = tuple(i for i in range(a.ndim) if i != d.axis)
                peak[d] = np.maximum(peak[d], a.max(axis=axes) if axes else a)
        return {d: p <= self.threshold for d, p in peak.items()}


def _can_absorb(model: Model, node) -> bool:
    """A consumer can take a constant input channel into its bias exactly: Gemm always; Conv only
    without zero padding (a padded border would see 0 instead of the constant) and with group 1."""
    if node.op_type == "Gemm":
        return True
    if node.op_type == "Conv":
        pads = attr(node, "pads") or []
        auto_pad = attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return int(attr(node, "group", 1)) == 1 and not any(pads) and auto_pad in ("NOTSET", "VALID")
    return False


def _absorb(model: Model, node, channel: int, value: float) -> None:
    w = model.get_constant(node.input[1]).astype(np.float64)
    if node.op_type == "Conv":
        delta = value * w[:, channel].reshape(w.shape[0], -1).sum(axis=1)
    else:
        trans_b = attr(node, "transB", 0)
        row = w[:, channel] if trans_b else w[channel]
        delta = value * row * attr(node, "alpha", 1.0)
    dtype = model.get_constant(node.input[1]).dtype
    if len(node.input) > 2 and node.input[2]:
        b = model.get_constant(node.input[2]).astype(np.float64)
        if node.op_type == "Gemm":
            b = b * attr(node, "beta", 1.0)
            from sculpt.ir.channel_handlers import set_attr

            set_attr(node, "beta", 1.0)
        model.replace_constant_input(node, 2, (b + delta).astype(dtype), suffix="absorbed")
    else:
        name = model.add_initializer(f"{node.name}_bias", delta.astype(dtype))
        model.set_input(node, 2, name)
