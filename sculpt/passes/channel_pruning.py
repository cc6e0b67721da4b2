"""channel-pruning: structured, dependency-aware removal of channels, with least-squares recovery."""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sculpt.errors import PassError
from sculpt.ir.channels import ChannelGraph, Dim, Group
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.passes.base import (MAX_POSITIONS, MAX_RIDGE, Pass, PassContext, PassResult, allow_plain_initializers,
                                check_range, option, register)

Criterion = Literal["l1", "l2", "bn-scale", "activation", "reconstruction"]

# The channels each pruned activation kept, as indices into the tensor of the model before the first
# channel pruning (so of the pipeline's input, the distill teacher): metadata_props[KEPT_CHANNELS_KEY] holds
# JSON {tensor: {"axis": a, "size": channels before, "kept": "0-5,7,9-12"}}. In the model itself it
# survives saving, clones and later passes; a later channel pruning composes with it. Read it with
# kept_channels(); a record whose sizes no longer fit the tensor is the reader's to refuse.
KEPT_CHANNELS_KEY = "sculpt.kept_channels"


@dataclass(frozen=True)
class KeptChannels:
    axis: int
    size: int  # channels of the tensor before any recorded pruning
    kept: np.ndarray  # sorted indices into those channels


def _ranges(indices: np.ndarray) -> str:
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def _indices(text: str) -> np.ndarray:
    out = []
    for part in text.split(",") if text else []:
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return np.asarray(out, dtype=np.int64)


def kept_channels(model: Model) -> dict[str, KeptChannels]:
    """The kept-channel record of a pruned model ({} when it has none)."""
    text = next((p.value for p in model.proto.metadata_props if p.key == KEPT_CHANNELS_KEY), None)
    if not text:
        return {}
    return {name: KeptChannels(int(r["axis"]), int(r["size"]), _indices(r["kept"]))
            for name, r in json.loads(text).items()}


def record_kept_channels(model: Model, kept: dict[Dim, np.ndarray], sizes: dict[Dim, int]) -> None:
    """Add this pruning's kept indices (``kept``: per dimension that lost channels, ``sizes``: its
    channel count before) to the model's record, composed with an earlier pruning's. Only
    activations are recorded (weights are the student's own)."""
    record = kept_channels(model)
    weights = {t.name for t in model.graph.initializer}
    for d, keep in kept.items():
        if d.tensor in weights:
            continue
        before = record.get(d.tensor)
        if before is not None and before.axis == d.axis and len(before.kept) == sizes[d]:
            record[d.tensor] = KeptChannels(d.axis, before.size, before.kept[keep])  # into the first model's
        else:
            record[d.tensor] = KeptChannels(d.axis, sizes[d], np.asarray(keep, dtype=np.int64))
    produced = {o for n in model.graph.node for o in n.output}
    text = json.dumps({name: {"axis": r.axis, "size": r.size, "kept": _ranges(r.kept)}
                       for name, r in sorted(record.items()) if name in produced}, separators=(",", ":"))
    props = [p for p in model.proto.metadata_props if p.key != KEPT_CHANNELS_KEY]
    del model.proto.metadata_props[:]
    model.proto.metadata_props.extend(props)
    entry = model.proto.metadata_props.add()
    entry.key, entry.value = KEPT_CHANNELS_KEY, text


@register
@dataclass
class ChannelPruning(Pass):
    """Remove whole channels from every dependency group that can lose them (Conv/Gemm/MatMul
    outputs and everything tied to them: BatchNorm, activations, residual Adds, Concat slices,
    depthwise Convs, SE blocks). Channels are ranked by ``criterion`` within each group; how many go
    is set by ``ratio`` of the model's MACs (``target=macs``, found by bisection on the real cost
    model) or of each group's channels (``target=channels``), uniformly per group or by a global
    ranking (``scope``). The readers of the pruned tensors are then refit by ridge least squares
    on calibration activations (``reconstruct``), so no training is needed. Lossy."""

    name = "channel-pruning"
    exact = False
    needs_static_shapes = True

    ratio: float = option(0.3, help="fraction to remove: of the MACs (target=macs) or of each group's channels")
    target: Literal["macs", "channels"] = option("macs", help="what ratio measures")
    scope: Literal["uniform", "global"] = option("uniform", help="same fraction in every group, or one global ranking")
    criterion: Criterion = option("reconstruction",
                                  help="l1 | l2 | bn-scale | activation | reconstruction (ThiNet-style greedy on calibration data)")
    min_channels: int = option(4, help="never keep fewer channels in a group")
    max_group_ratio: float = option(0.8, help="never remove more than this fraction of a group")
    round_to: int = option(8, help="kept channel counts rounded up to a multiple: 8 keeps onnxruntime's blocked (NCHWc) conv kernels and NEON vectors full; 1 for the finest granularity")
    ignore: list[str] = option(default_factory=list, help="node-name patterns (fnmatch) of layers whose output channels stay")
    layer_ratios: dict[str, float] = option(default_factory=dict,
                                            help="channel fraction for the group of a node (name: ratio)")
    reconstruct: bool = option(True, help="refit the readers' weights on calibration data")
    samples: int = option(16, help="calibration samples used for activation statistics and refitting")
    positions: int = option(4096, help="sampled output positions per layer for refitting")
    ridge: float = option(1e-3, help="refit regularization, relative to the mean feature energy")

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if not 0 < self.max_group_ratio < 1:
            raise ValueError(f"max_group_ratio must be in (0, 1), got {self.max_group_ratio}")
        if self.min_channels < 1 or self.round_to < 1 or self.samples < 1:
            raise ValueError("min_channels, round_to and samples must be ≥ 1")
        for k, v in self.layer_ratios.items():
            if not 0 <= float(v) < 1:
                raise ValueError(f"layer_ratios['{k}'] must be in [0, 1)")
        check_range("positions", self.positions, 1, MAX_POSITIONS)
        check_range("ridge", self.ridge, 0, MAX_RIDGE, low_open=True)

    @property
    def uses_calibration(self) -> bool:
        return self.reconstruct or self.criterion in ("activation", "reconstruction")

    def requires(self, model, ctx):
        super().requires(model, ctx)
        if self.uses_calibration and ctx.calibration is None:
            what = "reconstruct=true" if self.reconstruct else f"criterion={self.criterion}"
            raise PassError(self.name, f"{what} needs calibration data: give --calibration (an .npz, an image "
                                       "folder or random:N), or set reconstruct=false with a weight criterion")

    # ------------------------------------------------------------------ run
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        allow_plain_initializers(model)
        original = model.clone()
        cg = ChannelGraph.build(model)
        groups = [g for g in cg.prunable_groups() if not self._ignored(g)]
        stats: dict = {"groups_total": len([g for g in cg.groups if g.sources]),
                       "groups_prunable": len(groups)}
        if not groups or self.ratio == 0 and not self.layer_ratios:
            stats["note"] = "nothing to prune" if not groups else "ratio=0"
            return PassResult(model, False, stats)
        acts = self._activations(original, cg, groups, ctx) if self.uses_calibration else {}
        order = {g.id: self._rank(cg, g, acts) for g in groups}
        base_macs = cost_of(original).macs

        def plan(level: float) -> list[int]:
            return self._plan(cg, groups, order, level)

        def macs_after(units: list[int]) -> int:
            trial = original.clone()
            ChannelGraph.build(trial).remove_units(units)
            return cost_of(trial).macs

        if self.target == "macs":
            want = base_macs * (1 - self.ratio)
            lo, hi = 0.0, self.max_group_ratio
            best = plan(0.0)
            best_macs = base_macs
            top = plan(self.max_group_ratio)
            top_macs = macs_after(top)
            if top_macs > want:  # even the maximum allowed is not enough: take it and say so
                best, best_macs = top, top_macs
            else:
                below, below_macs = top, top_macs  # closest plan that reaches the target
                above, above_macs = best, best_macs  # closest plan that removes too little
                for _ in range(14):
                    mid = (lo + hi) / 2
                    units = plan(mid)
                    m = macs_after(units)
                    if m > want:
                        lo = mid
                        if m < above_macs:
                            above, above_macs = units, m
                    else:
                        hi = mid
                        if m > below_macs:
                            below, below_macs = units, m
                    if abs(m - want) / base_macs < 0.005:
                        break
                # channel rounding makes MACs a step function: take the nearer side, unless it is a no-op
                nearer_above = (above_macs - want) < (want - below_macs) and above_macs < base_macs
                best, best_macs = (above, above_macs) if nearer_above else (below, below_macs)
            removed = best
        else:
            removed = plan(self.ratio)
        if not removed:
            stats["note"] = "no channel could be removed within min_channels / max_group_ratio"
            return PassResult(model, False, stats)
        sizes = dict(cg.sizes)
        kept = cg.remove_units(removed)
        record_kept_channels(model, kept, sizes)
        if self.reconstruct:
            stats["refit"] = self._refit(original, model, cg, kept, ctx)
        after_report = cost_of(model)
        after = after_report.macs
        stats.update({
            "removed_channels": len(removed),
            "macs_before": base_macs, "macs_after": after,
            "macs_reduction": 1 - after / base_macs if base_macs else 0.0,
            "requested": self.ratio if self.target == "macs" else None,
            "groups": self._report(cg, groups, set(removed), cost_of(original), after_report),
        })
        return PassResult(model, True, stats)

    # ------------------------------------------------------------------ policy pieces
    def _ignored(self, g: Group) -> bool:
        names = {s.node for s in g.sources}  # a layer's output channels: its group
        return any(fnmatch.fnmatch(n, pat) for n in names for pat in self.ignore)

    def _group_fraction(self, g: Group, level: float) -> float:
        for s in g.sources:
            for pat, r in self.layer_ratios.items():
                if fnmatch.fnmatch(s.node, pat):
                    return float(r)
        return level

    def _plan(self, cg: ChannelGraph, groups: list[Group], order: dict[int, list[tuple[float, int]]],
              level: float) -> list[int]:
        """Units to remove when a fraction ``level`` of the channels goes (per group, or overall for
        the global scope); per-group caps (min_channels, max_group_ratio) always hold."""
        removed: list[int] = []
        if self.scope == "global" and not self.layer_ratios:
            # one threshold over group-normalised scores
            cands = []
            for g in groups:
                ranked = order[g.id]
                mean = np.mean([s for s, _ in ranked]) or 1.0
                cands.extend((s / mean, g.id, u) for s, u in ranked)
            cands.sort()
            quota = {g.id: self._max_remove(g) for g in groups}
            n_total = sum(len(order[g.id]) for g in groups)
            budget = int(round(level * n_total))
            taken: dict[int, list[int]] = {g.id: [] for g in groups}
            for _, gid, u in cands:
                if budget <= 0:
                    break
                if len(taken[gid]) < quota[gid]:
                    taken[gid].append(u)
                    budget -= 1
            for g in groups:
                removed.extend(self._rounded(g, order[g.id], len(taken[g.id])))
            return cg.feasible(removed, min_keep=self.min_channels)
        for g in groups:
            frac = self._group_fraction(g, level)
            n = int(math.floor(frac * g.size + 1e-9))
            removed.extend(self._rounded(g, order[g.id], min(n, self._max_remove(g))))
        # a Concat ties its inputs into one group: never empty one input (or go below min_channels)
        return cg.feasible(removed, min_keep=self.min_channels)

    def _max_remove(self, g: Group) -> int:
        keep_min = max(self.min_channels, int(math.ceil(g.size * (1 - self.max_group_ratio))))
        return max(0, min(len(g.prunable_units), g.size - keep_min))

    def _rounded(self, g: Group, ranked: list[tuple[float, int]], n_remove: int) -> list[int]:
        if n_remove <= 0:
            return []
        keep = g.size - n_remove
        if self.round_to > 1:
            keep = int(math.ceil(keep / self.round_to) * self.round_to)
            keep = min(g.size, keep)
        n_remove = max(0, min(g.size - keep, self._max_remove(g)))
        return [u for _, u in ranked[:n_remove]]

    # ------------------------------------------------------------------ importance
    def _rank(self, cg: ChannelGraph, g: Group, acts: dict) -> list[tuple[float, int]]:
        """(score, unit) for the prunable units of a group, least important first."""
        units = g.prunable_units
        index = {u: i for i, u in enumerate(units)}
        if self.criterion == "reconstruction":
            return self._greedy_order(cg, g, acts, units)
        score = np.zeros(len(units))
        model = cg.model
        if self.criterion in ("l1", "l2") or (self.criterion == "bn-scale" and not _bn_nodes(model, g)):
            for s in g.sources:
                node = model.node_by_name(s.node)
                w = model.get_constant(node.input[1]).astype(np.float64)
                if node.op_type == "Conv":
                    rows = w.reshape(w.shape[0], -1)
                elif node.op_type == "ConvTranspose":
                    rows = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
                elif node.op_type == "Gemm":
                    from sculpt.ir.channel_handlers import attr

                    rows = w if attr(node, "transB", 0) else w.T
                else:
                    rows = w.T
                norm = np.abs(rows).sum(1) if self.criterion == "l1" else np.sqrt((rows ** 2).sum(1))
                for ch, u in enumerate(cg.unit_labels(s.dim).tolist()):
                    if u in index:
                        score[index[u]] += norm[ch]
        elif self.criterion == "bn-scale":
            for node, dim in _bn_nodes(model, g):
                gamma = np.abs(model.get_constant(node.input[1]).astype(np.float64))
                for ch, u in enumerate(cg.unit_labels(dim).tolist()):
                    if u in index:
                        score[index[u]] += gamma[ch]
        else:  # activation: mean |a| at the source outputs
            for s in g.sources:
                a = acts.get(s.dim)
                if a is None:
                    continue
                for ch, u in enumerate(cg.unit_labels(s.dim).tolist()):
                    if u in index:
                        score[index[u]] += a["mean_abs"][ch]
        return sorted(zip(score.tolist(), units))

    def _greedy_order(self, cg, g, acts, units) -> list[tuple[float, int]]:
        """ThiNet-style: repeatedly remove the unit whose contribution, added to what is already
        removed, changes the readers' outputs least (on sampled calibration positions). Works on
        the Gram matrices of the per-channel contributions, accumulated sample by sample."""
        index = {u: i for i, u in enumerate(units)}
        gram = np.zeros((len(units), len(units)))
        found = False
        for c in g.consumers:
            gc = acts.get(("gram", c.node))
            if gc is None:
                continue
            found = True
            rows = np.array([index.get(int(u), -1) for u in cg.unit_labels(c.dim)])
            ok = rows >= 0
            # channels of this reader that belong to the same unit add up: P G Pᵀ
            proj = np.zeros((len(units), len(rows)))
            proj[rows[ok], np.nonzero(ok)[0]] = 1.0
            gram += proj @ gc @ proj.T
        if not found:
            return [(0.0, u) for u in units]
        order = []
        cross = np.zeros(len(units))
        diag = np.diag(gram).copy()
        remaining = np.ones(len(units), dtype=bool)
        for _ in range(len(units)):
            cost = np.where(remaining, 2 * cross + diag, np.inf)
            best = int(np.argmin(cost))
            order.append((float(cost[best]), units[best]))
            remaining[best] = False
            cross += gram[best]
        return order

    # ------------------------------------------------------------------ calibration statistics
    def _activations(self, model: Model, cg: ChannelGraph, groups: list[Group], ctx: PassContext) -> dict:
        from sculpt.runtime import iter_activations

        out: dict = {}
        want_mean = self.criterion == "activation"
        want_contrib = self.criterion == "reconstruction"
        if not (want_mean or want_contrib):
            return out
        tensors: set[str] = set()
        consumers = {}
        if want_mean:
            tensors.update(s.dim.tensor for g in groups for s in g.sources)
        if want_contrib:
            for g in groups:
                for c in g.consumers:
                    node = model.node_by_name(c.node)
                    consumers[c.node] = (node, c.dim)
                    tensors.add(node.input[0])
                    tensors.add(node.output[0])
        sums: dict = {}
        grams: dict = {}
        rng = np.random.default_rng(0)
        n = 0
        for acts in iter_activations(model, sorted(tensors), ctx.calibration, limit=self.samples):
            n += 1
            if want_mean:
                for g in groups:
                    for s in g.sources:
                        a = np.abs(acts[s.dim.tensor])
                        axes = tuple(i for i in range(a.ndim) if i != s.dim.axis)
                        sums[s.dim] = sums.get(s.dim, 0) + a.mean(axis=axes)
            if want_contrib:
                per = max(8, self.positions // (4 * self.samples))
                for name, (node, dim) in consumers.items():
                    m = _contributions(model, node, acts[node.input[0]], acts[node.output[0]].shape, per, rng)
                    if m is not None:
                        m = m.astype(np.float64)  # float32 Gram sums overflow on large activations
                        grams[name] = grams.get(name, 0) + m @ m.T
        for d, s in sums.items():
            out[d] = {"mean_abs": s / max(n, 1)}
        for name, gram in grams.items():
            out[("gram", name)] = gram
        return out

    # ------------------------------------------------------------------ recovery
    def _refit(self, original: Model, pruned: Model, cg: ChannelGraph, kept: dict, ctx: PassContext) -> dict:
        """Refit every reader whose input lost channels, in topological order: the target is the
        original model's output of that reader, the features are the inputs it receives in the
        pruned model *after* the readers before it were refit (so errors do not compound)."""
        from sculpt.ir.refit import RefitJob
        from sculpt.passes.refit import sequential_refit

        jobs = []
        for c in cg.consumers:
            if c.dim not in kept:
                continue
            node = pruned.node_by_name(c.node)
            if node is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            if node.op_type == "Conv" and len(cg.shapes[node.input[0]]) != 4:
                continue
            out_axis = 1 if node.op_type in ("Conv", "Gemm") else len(cg.shapes[node.output[0]]) - 1
            kout = kept.get(Dim(node.output[0], out_axis))
            jobs.append(RefitJob(node.name, node.output[0], None if kout is None else tuple(int(i) for i in kout)))
        if not jobs:
            return {"layers": 0}
        samples = [s for _, s in zip(range(self.samples), ctx.calibration)]
        return sequential_refit(original, pruned, jobs, samples, positions=self.positions, ridge=self.ridge)

    def _report(self, cg: ChannelGraph, groups: list[Group], removed: set[int], before, after) -> list[dict]:
        """Per pruned group: channels, and MACs/params of the layers that produce or read it."""
        b = {layer.name: layer for layer in before.layers}
        a = {layer.name: layer for layer in after.layers}
        producers = {o: n.name for n in cg.model.graph.node for o in n.output}
        rows = []
        for g in groups:
            n = len(set(g.prunable_units) & removed)
            if not n:
                continue
            nodes = {s.node for s in g.sources} | {c.node for c in g.consumers} | \
                {producers[d.tensor] for d in g.dims if d.tensor in producers}
            rows.append({"group": g.id, "sources": sorted({s.node for s in g.sources}),
                         "channels_before": g.size, "channels_after": g.size - n,
                         "macs_before": sum(b[x].macs or 0 for x in nodes if x in b),
                         "macs_after": sum(a[x].macs or 0 for x in nodes if x in a),
                         "params_before": sum(b[x].params for x in nodes if x in b),
                         "params_after": sum(a[x].params for x in nodes if x in a)})
        return rows


def _bn_nodes(model: Model, g: Group):
    from sculpt.ir.channels import Dim

    dims = set(g.dims)
    out = []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and Dim(node.output[0], 1) in dims:
            out.append((node, Dim(node.output[0], 1)))
    return out


def _contributions(model: Model, node, x: np.ndarray, y_shape, count: int, rng) -> np.ndarray | None:
    """Per input channel c, its contribution to ``node``'s output at sampled positions: [C, S*O]."""
    from sculpt.ir.refit import sample_rows

    w = model.get_constant(node.input[1])
    if node.op_type == "Conv":
        if x.ndim != 4:
            return None
        total = y_shape[0] * y_shape[2] * y_shape[3]
        pos = rng.choice(total, size=min(count, total), replace=False)
        p = sample_rows(node, x, y_shape, pos, w.shape)  # [S, C*k]
        kk = int(np.prod(w.shape[2:]))
        p = p.reshape(len(pos), x.shape[1], kk).transpose(1, 0, 2)  # [C, S, k]
        wr = w.reshape(w.shape[0], x.shape[1], kk).transpose(1, 2, 0)  # [C, k, O]
        contrib = np.matmul(p, wr)  # [C, S, O]
    elif node.op_type == "Gemm":
        from sculpt.ir.channel_handlers import attr

        wm = w.T if attr(node, "transB", 0) else w  # [K, N]
        contrib = x.T[:, :, None] * wm[:, None, :]  # [K, S, N]
    elif node.op_type == "MatMul":
        flat = x.reshape(-1, x.shape[-1])
        pos = rng.choice(flat.shape[0], size=min(count, flat.shape[0]), replace=False)
        contrib = flat[pos].T[:, :, None] * w[:, None, :]
    else:
        return None
    return contrib.reshape(contrib.shape[0], -1)
