"""dead-channel-elimination: remove channels that are provably zero (or constant) from whole groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sculpt.errors import PassError
from sculpt.ir.channel_handlers import attr
from sculpt.ir.channel_values import ChannelValues
from sculpt.ir.channels import ChannelGraph, Dim
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, allow_plain_initializers, option, register


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
        if self.threshold < 0 or self.samples < 1:
            raise ValueError("threshold must be ≥ 0 and samples ≥ 1")

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
        # consumed elements of each unit: where channels leave the group (a reduction over channels)
        removable: list[int] = []
        folds: list[tuple[str, int, float]] = []  # (consumer node, input channel, constant)
        by_unit: dict[int, list[tuple[str, int, float]]] = {}
        blocked: set[int] = set()
        nodes = {n.name: n for n in model.graph.node}
        for c in cg.consumers:
            labels = cg.unit_labels(c.dim)
            vals = values.get(c.dim).copy()
            if c.dim in inactive:
                vals = np.where(inactive[c.dim], 0.0, vals)
            for idx, (u, v) in enumerate(zip(labels.tolist(), vals.tolist())):
                if np.isnan(v):
                    blocked.add(u)
                elif v != 0.0:
                    if _can_absorb(model, nodes[c.node]):
                        by_unit.setdefault(u, []).append((c.node, idx, v))
                    else:
                        blocked.add(u)
        # units with no consumed element at all are removable only if every element is known
        for g in cg.prunable_groups():
            for u in g.prunable_units:
                if u in blocked:
                    continue
                consumed = any(u in set(cg.unit_labels(c.dim).tolist()) for c in g.consumers)
                if not consumed:
                    continue  # nothing reads it inside the graph: leave it (it reaches an output)
                removable.append(u)
                folds.extend(by_unit.get(u, []))
        # keep at least one channel in every dimension
        removable = _keep_one(cg, removable)
        keep_units = set(removable)
        folds = [f for f in folds if int(cg.unit_labels(_consumer_dim(cg, f[0]))[f[1]]) in keep_units]
        for node_name, channel, value in folds:
            _absorb(model, nodes[node_name], channel, value)
        kept = cg.remove_units(removable) if removable else {}
        removed_per_group = {}
        for g in cg.groups:
            n = len(set(g.prunable_units) & keep_units)
            if n:
                removed_per_group[g.describe()] = n
        return PassResult(model, bool(removable), {"removed_channels": len(removable),
                                                   "folded_constants": len(folds),
                                                   "groups": removed_per_group,
                                                   "changed_tensors": len(kept)})

    def _inactive(self, model: Model, cg: ChannelGraph, ctx: PassContext) -> dict[Dim, np.ndarray]:
        from sculpt.ir.calibration import iter_activations

        dims = {c.dim for c in cg.consumers}
        tensors = sorted({d.tensor for d in dims})
        peak = {d: np.zeros(cg.sizes[d]) for d in dims}
        for acts in iter_activations(model, tensors, ctx.calibration, limit=self.samples):
            for d in dims:
                a = np.abs(acts[d.tensor])
                axes = tuple(i for i in range(a.ndim) if i != d.axis)
                peak[d] = np.maximum(peak[d], a.max(axis=axes) if axes else a)
        return {d: p <= self.threshold for d, p in peak.items()}


def _consumer_dim(cg: ChannelGraph, node_name: str) -> Dim:
    return next(c.dim for c in cg.consumers if c.node == node_name)


def _keep_one(cg: ChannelGraph, units: list[int]) -> list[int]:
    """Drop units from the removal list until no dimension loses all of its channels."""
    chosen = set(units)
    for d in cg.sizes:
        labels = cg.unit_labels(d)
        if chosen and all(int(u) in chosen for u in labels):
            chosen.discard(int(labels[0]))
    return [u for u in units if u in chosen]


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
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
