"""Layer (block) pruning: whole residual blocks removed, the least useful first, measured on data.

A *residual block* is a branch joined to an identity path by an ``Add`` (or a two-input ``Sum``):
``y = x + f(x)``, where ``x`` reaches the join unchanged and every tensor of the branch ``f`` is read
only inside the branch. Removing the block replaces ``y`` by ``x`` (the join goes, the branch
becomes dead and is dropped). With ``plain_layers`` a Conv/Gemm/MatMul whose input and output have
the same shape is a candidate too (``y = layer(x)`` becomes ``y = x``).

Policy: every candidate is removed alone and the output error of the model without it measured on
samples the refit does not use (the last ``holdout`` fraction of the calibration samples); the
cheapest goes first; then (``greedy``) every remaining candidate is measured again on the model as
pruned so far and the cheapest goes next, ``count`` removals in all (or ``ratio`` of the
candidates), stopping early when the error would exceed ``max_error``. Then, after each removed block, the weighted layer that feeds the next join (the
last layer of the next block's branch, or a projection shortcut) is refit by ridge least squares
(``sculpt.ir.refit``) on what it now receives, so that the join outputs what it does in the
original model: the error the removal left on the identity path is compensated where the paths meet.
Where there is no such join, or its refit does not lower the error on a quarter of the fitting
samples held back from it, the first weighted layers after the removal are refit towards their own
original outputs instead (``sculpt.passes.refit.sequential_refit``). The whole refit is kept only if
it lowers the error on the ranking samples, which it did not see. The report lists each removal, what it cost alone and the error after it, and the error
measured on the pipeline's held-out samples when there are any.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import helper

from sculpt.errors import PassError
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.ir.refit import (RefitJob, flat_outputs, generalizes, pick_positions, refittable, residual, ridge_refit,
                              sample_rows, weight_from_matrix, weight_matrix)
from sculpt.passes.base import (MAX_POSITIONS, MAX_RIDGE, Pass, PassContext, PassResult, check_range, option,
                                register)
from sculpt.passes.refit import sequential_refit
from sculpt.runtime import iter_activations, make_session

JOIN_OPS = ("Add", "Sum")
PLAIN_LAYER_OPS = ("Conv", "Gemm", "MatMul")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
REFIT_SEARCH_DEPTH = 12  # nodes walked past a removed block to find the weighted layers reading it


@dataclass(frozen=True)
class Candidate:
    """What can be removed: the node whose output is replaced by its input ``identity_index``
    (a residual join, or a plain layer), the nodes that go with it and their MACs."""

    node: str
    kind: str  # "residual" | "layer"
    identity_index: int
    nodes: tuple[str, ...]
    macs: int


def residual_blocks(model: Model) -> list[Candidate]:
    """Every residual block: a two-input Add/Sum of equal static shapes, one input of which (the
    identity) is an ancestor of the other, where every tensor produced on the paths between them is
    read only on those paths (and none is a graph output)."""
    producers = model.producers()
    consumers = model.consumers()
    outputs = set(model.output_names)
    consts = model.constant_names()
    macs = _node_macs(model)
    order = {n.name: k for k, n in enumerate(model.graph.node)}
    blocks = []
    for join in model.graph.node:
        if join.op_type not in JOIN_OPS or join.domain not in ("", "ai.onnx") or len(join.input) != 2:
            continue
        a, b = join.input
        if a in consts or b in consts or a == b:
            continue
        sa, sb, so = model.static_shape(a), model.static_shape(b), model.static_shape(join.output[0])
        if sa is None or sa != sb or sa != so:
            continue
        for identity_index in (0, 1):
            x, r = join.input[identity_index], join.input[1 - identity_index]
            branch = _branch(x, r, producers, order)
            if branch is None:
                continue
            names = {n.name for n in branch}
            if all(_read_only_inside(n, names | {join.name}, consumers, outputs) for n in branch):
                blocks.append(Candidate(join.name, "residual", identity_index,
                                        tuple(n.name for n in branch), sum(macs.get(n.name, 0) for n in branch)))
                break
    return blocks


def plain_layers(model: Model) -> list[Candidate]:
    """Conv/Gemm/MatMul nodes with a constant weight whose activation input has the output's static shape."""
    macs = _node_macs(model)
    found = []
    for node in model.graph.node:
        if node.op_type not in PLAIN_LAYER_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if model.get_constant(node.input[1]) is None or model.get_constant(node.input[0]) is not None:
            continue
        shape = model.static_shape(node.input[0])
        if shape is not None and shape == model.static_shape(node.output[0]):
            found.append(Candidate(node.name, "layer", 0, (node.name,), macs.get(node.name, 0)))
    return found


def remove_candidate(model: Model, candidate: Candidate) -> bool:
    """Replace the candidate's output by its identity input and drop what is no longer used. False when
    its node is gone already (inside a block removed before)."""
    node = model.node_by_name(candidate.node)
    if node is None:
        return False
    x, out = node.input[candidate.identity_index], node.output[0]
    if out in set(model.output_names):  # the graph output keeps its name
        model.remove_node(node)
        model.append_node(helper.make_node("Identity", [x], [out], name=model.unique_name(f"{candidate.node}_removed")))
        model.topological_sort()
    else:
        model.remove_node(node)
        model.replace_uses(out, x)
    model.remove_value_info(out)
    model.remove_unused()
    return True


def _branch(x: str, r: str, producers, order: dict[str, int]) -> list[onnx.NodeProto] | None:
    """The nodes on the paths from tensor ``x`` to tensor ``r`` (in graph order), or None when ``x``
    is not an ancestor of ``r``."""
    ancestors: dict[str, onnx.NodeProto] = {}
    stack = [r]
    while stack:
        t = stack.pop()
        node = producers.get(t)
        if node is None or node.name in ancestors or t == x:
            continue
        ancestors[node.name] = node
        stack.extend(i for i in node.input if i)
    # forward from x through the ancestors, in topological order (the graph's node order)
    on_path: list[onnx.NodeProto] = []
    reached = {x}
    for node in sorted(ancestors.values(), key=lambda n: order[n.name]):
        if any(i in reached for i in node.input):
            on_path.append(node)
            reached.update(o for o in node.output if o)
    return on_path if r in reached and r != x else None


def _read_only_inside(node, names: set[str], consumers, outputs: set[str]) -> bool:
    for o in node.output:
        if not o:
            continue
        if o in outputs or any(c.name not in names for c in consumers.get(o, [])):
            return False
    return True


def _node_macs(model: Model) -> dict[str, int]:
    return {c.name: c.macs or 0 for c in cost_of(model).layers}


def _walk_forward(model: Model, tensor: str, stop) -> Iterator[onnx.NodeProto]:
    """The nodes reached forward from ``tensor``, breadth first, at most ``REFIT_SEARCH_DEPTH`` levels
    deep; the walk does not go on past a node for which ``stop(node)`` is true."""
    consumers = model.consumers()
    seen, frontier = set(), [tensor]
    for _ in range(REFIT_SEARCH_DEPTH):
        nxt = []
        for t in frontier:
            for node in consumers.get(t, []):
                if node.name in seen:
                    continue
                seen.add(node.name)
                yield node
                if not stop(node):
                    nxt.extend(o for o in node.output if o)
        frontier = nxt
        if not frontier:
            return


def _layers_after(model: Model, tensor: str) -> list[str]:
    """The weighted layers (refittable ones) first reached from ``tensor``, walking at most
    ``REFIT_SEARCH_DEPTH`` nodes forward (through activations, normalizations, reshapes; not past a join)."""
    return [node.name for node in _walk_forward(model, tensor, lambda n: n.op_type in WEIGHTED_OPS + JOIN_OPS)
            if node.op_type in WEIGHTED_OPS and refittable(model, node)]


@dataclass(frozen=True)
class JoinRefit:
    """Refit weighted layer ``layer`` so that the join ``join`` it feeds (directly, or through an Add of
    the constant ``offset``) outputs what it outputs in the original model, given the join's other
    input ``other`` as the pruned model computes it."""

    layer: str
    join: str
    other: str
    offset: str | None


def next_join_refit(model: Model, tensor: str) -> JoinRefit | None:
    """The first residual (or two-branch) join reached forward from ``tensor`` within
    ``REFIT_SEARCH_DEPTH`` nodes, and the weighted layer on one of its inputs to refit: the error a
    removed block leaves on the path is then compensated where the paths meet again."""
    producers, consts = model.producers(), model.constant_names()
    for node in _walk_forward(model, tensor, lambda n: False):
        if node.op_type in JOIN_OPS and len(node.input) == 2 and not set(node.input) & consts:
            found = _refittable_side(model, node, producers, consts)
            if found is not None:
                return found
    return None


def _refittable_side(model: Model, join, producers, consts) -> JoinRefit | None:
    shape = model.static_shape(join.output[0])
    if shape is None or any(model.static_shape(i) != shape for i in join.input):
        return None
    for side in (1, 0):  # the branch is more often the second input
        node, offset = producers.get(join.input[side]), None
        if node is not None and node.op_type == "Add" and len(node.input) == 2:
            const = [i for i in node.input if i in consts]
            if len(const) == 1:
                offset = const[0]
                node = producers.get(next(i for i in node.input if i not in consts))
        if node is not None and node.op_type in ("Conv", "Gemm", "MatMul") and refittable(model, node) \
                and model.static_shape(node.output[0]) == shape:
            return JoinRefit(node.name, join.name, join.input[1 - side], offset)
    return None


def refit_join(original: Model, model: Model, job: JoinRefit, samples: list[dict], *, positions: int,
               ridge: float, seed: int = 0) -> dict | None:
    """Solve ``job.layer``'s weights (and bias) by ridge least squares so that the join outputs what the
    original's does: target = original join output - the other input - the constant offset, on the
    pruned model's own inputs. A quarter of the samples is held out first: a refit that does not lower
    the error on them is not made. Returns {"before", "after"} relative errors, or None (not made)."""
    node = model.node_by_name(job.layer)
    join = model.node_by_name(job.join)
    if node is None or join is None or original.node_by_name(job.join) is None:
        return None
    w = model.get_constant(node.input[1])
    has_bias = len(node.input) > 2 and bool(node.input[2])
    b = model.get_constant(node.input[2]) if has_bias else None
    offset = model.get_constant(job.offset) if job.offset else None
    rng = np.random.default_rng(seed)
    per = max(16, positions // max(len(samples), 1))
    targets = [flat_outputs(node.op_type, acts[join.output[0]])
               for acts in iter_activations(original, [join.output[0]], samples)]
    rows, wanted = [], []
    for k, acts in enumerate(iter_activations(model, [node.input[0], job.other, node.output[0]], samples)):
        y_shape = acts[node.output[0]].shape
        other = flat_outputs(node.op_type, acts[job.other])
        pos = pick_positions(other.shape[0], per, rng)
        row = sample_rows(node, acts[node.input[0]], y_shape, pos, w.shape)
        if row is None or targets[k].shape != other.shape:
            return None
        target = targets[k][pos] - other[pos]
        if offset is not None:
            if offset.size not in (1, target.shape[1]):
                return None
            target = target - offset.astype(np.float32).reshape(-1)
        rows.append(row)
        wanted.append(target)
    w_mat = weight_matrix(node, w)
    t = np.concatenate(wanted)
    if t.shape[1] != w_mat.shape[1] or (b is not None and b.size != w_mat.shape[1]):
        return None
    bias = None if b is None else b.reshape(-1)
    if len(rows) > 1 and not generalizes(rows, t, w_mat, bias, None, ridge, 0.25):
        return None
    p = np.concatenate(rows)
    before = residual(p, t, w_mat, bias)
    new_w, new_b = ridge_refit(p, t, w_mat, bias, strength=ridge)
    after = residual(p, t, new_w, new_b)
    if not after < before:
        return None
    model.replace_constant_input(node, 1, weight_from_matrix(node, new_w, w.shape).astype(w.dtype), suffix="refit")
    if new_b is not None:
        model.replace_constant_input(node, 2, new_b.reshape(b.shape).astype(w.dtype), suffix="refit")
    return {"before": float(np.sqrt(before)), "after": float(np.sqrt(after))}


class OutputReference:
    """The original model's outputs on some samples, and the relative output error of another model
    on the same samples: per output ``||y - y_ref|| / ||y_ref||`` over all samples, the largest."""

    def __init__(self, model: Model, samples: list[dict]):
        self.samples = samples
        self.outputs = self._run(model)

    def _run(self, model: Model) -> list[list[np.ndarray]]:
        sess = make_session(model)
        names = [i.name for i in sess.get_inputs()]
        return [sess.run(None, {k: s[k] for k in names}) for s in self.samples]

    def error(self, model: Model) -> float:
        got = self._run(model)
        worst = 0.0
        for k in range(len(self.outputs[0])):
            num = sum(float(((g[k].astype(np.float64) - r[k]) ** 2).sum()) for g, r in zip(got, self.outputs))
            den = sum(float((r[k].astype(np.float64) ** 2).sum()) for r in self.outputs)
            err = (num / den) ** 0.5 if den > 0 else num ** 0.5
            worst = max(worst, err if np.isfinite(err) else float("inf"))
        return worst


@register
@dataclass
class LayerPruning(Pass):
    """Remove whole residual blocks (and optionally shape-preserving layers), the ones whose removal
    costs least on calibration data first, then refit the layers after them (lossy; needs calibration)."""

    name = "layer-pruning"
    exact = False
    needs_calibration = True

    ratio: float = option(0.25, help="fraction of the candidate blocks to remove (when count is 0)")
    count: int = option(0, help="number of blocks to remove (overrides ratio)")
    max_error: float = option(0.0, help="if > 0: stop before a removal that takes the relative output error "
                                        "on the ranking samples above this")
    greedy: bool = option(True, help="measure the remaining candidates again after each removal (else: rank "
                                     "once, on the original model)")
    plain_layers: bool = option(False, help="also Conv/Gemm/MatMul layers whose input and output shapes match")
    layers: list[str] = option(default_factory=list, help="fnmatch patterns of the join (or layer) nodes that "
                                                          "may go; empty: all")
    ignore: list[str] = option(default_factory=list, help="fnmatch patterns of join (or layer) nodes kept")
    refit: bool = option(True, help="refit the weighted layers after each removed block by least squares")
    samples: int = option(32, help="calibration samples used (a refit solves for whole layers: a transformer's "
                                   "few tokens per sample need many samples)")
    holdout: float = option(0.25, help="fraction of the samples kept from the refit, on which removals are ranked")
    positions: int = option(4096, help="sampled output positions per refit layer")
    ridge: float = option(1e-3, help="least-squares regularization, relative to the mean diagonal")

    def __post_init__(self):
        check_range("ratio", self.ratio, 0, 1)
        check_range("count", self.count, 0)
        check_range("max_error", self.max_error, 0)
        check_range("samples", self.samples, 2)
        check_range("holdout", self.holdout, 0, 1, low_open=True, high_open=True)
        check_range("positions", self.positions, 1, MAX_POSITIONS)
        check_range("ridge", self.ridge, 0, MAX_RIDGE, low_open=True)
        if self.count == 0 and self.ratio == 0:
            raise ValueError("nothing to remove: give count ≥ 1 or ratio > 0")

    def requires(self, model: Model, ctx: PassContext) -> None:
        super().requires(model, ctx)
        try:
            model.require_static_inputs(f"pass '{self.name}'")
        except Exception as e:
            raise PassError(self.name, str(e)) from None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.infer_shapes(refresh=True)
        candidates = [c for c in residual_blocks(model) + (plain_layers(model) if self.plain_layers else [])
                      if self._selected(c.node)]
        stats: dict[str, Any] = {"candidates": len(candidates)}
        wanted = self.count or int(round(self.ratio * len(candidates)))
        if not candidates or wanted == 0:
            stats.update({"removed": [], "reason": "no residual block found" if not candidates else
                          f"ratio {self.ratio} of {len(candidates)} candidates rounds to 0"})
            return PassResult(model, False, stats)
        data = list(ctx.calibration.take(self.samples))
        if len(data) < 2:
            raise PassError(self.name, "needs at least 2 calibration samples (some are held out from the refit)")
        held = min(len(data) - 1, max(1, int(round(self.holdout * len(data)))))
        fitting, ranking = data[:-held], data[-held:]
        original = model.clone()
        reference = OutputReference(original, ranking)

        alone = {c.node: self._error_without(model, c, reference) for c in candidates}
        removed: list[dict] = []
        identities: list[str] = []  # the tensor standing in for each removed output
        remaining = sorted(candidates, key=lambda c: (alone[c.node], -c.macs))
        while remaining and len(removed) < wanted:
            # greedy: after the first removal, every remaining candidate is measured again on the model
            # as pruned so far (two blocks that each cost little alone may cost much together)
            costs = alone if not removed or not self.greedy else \
                {c.node: self._error_without(model, c, reference) for c in remaining}
            remaining = [c for c in remaining if costs[c.node] is not None]
            if not remaining:
                break
            best = min(remaining, key=lambda c: (costs[c.node], -c.macs))
            remaining.remove(best)
            trial = model.clone()
            joined = trial.node_by_name(best.node)
            remove_candidate(trial, best)
            error = costs[best.node] if self.greedy or not removed else reference.error(trial)
            if not np.isfinite(error):  # the cheapest removal left non-finite outputs: so would any other
                stats["stopped"] = f"removing {best.node} would make the outputs non-finite"
                break
            if self.max_error and error > self.max_error:
                stats["stopped"] = f"removing {best.node} would take the error to {error:.4g} > max_error"
                break
            model = trial
            identities.append(joined.input[best.identity_index])
            removed.append({"node": best.node, "kind": best.kind, "nodes": len(best.nodes), "macs": best.macs,
                            "error_alone": alone[best.node], "error_after": error})
        stats["removed"] = removed
        stats["kept"] = [c.node for c in candidates if c.node not in {r["node"] for r in removed}]
        if not removed:
            return PassResult(original, False, stats)
        error = removed[-1]["error_after"]
        if self.refit:
            stats["refit"], error = self._refit(original, model, identities, fitting, reference, error)
        stats["ranking_error"] = error
        stats["ranking_samples"] = len(ranking)
        held_out = getattr(ctx, "held_out", None)
        if held_out is not None and len(held_out):
            stats["held_out_error"] = OutputReference(original, list(held_out)).error(model)
        before, now = cost_of(original), cost_of(model)
        stats.update({"macs_before": before.macs, "macs_after": now.macs, "params_before": before.params,
                      "params_after": now.params})
        model.infer_shapes(refresh=True)
        return PassResult(model, True, stats)

    def _error_without(self, model: Model, candidate: Candidate, reference: "OutputReference") -> float | None:
        """The output error of ``model`` without ``candidate`` (None: it is gone already)."""
        trial = model.clone()
        if not remove_candidate(trial, candidate):
            return None
        return reference.error(trial)

    def _refit(self, original: Model, model: Model, identities: list[str], fitting: list[dict],
               reference: OutputReference, error: float) -> tuple[dict, float]:
        """After each removal, the weighted layer feeding the next join is refit so that the join's
        output matches the original's (``refit_join``); where no join follows, the first weighted layers
        after the removal are refit towards their own original outputs (``sequential_refit``). The
        refit is kept only if it lowers the error on the ranking samples (which it did not see)."""
        known = set(model.producers()) | set(model.input_names)
        joins, fallback, after = {}, [], {}
        for tensor in identities:
            if tensor not in known:  # renamed by a removal upstream of it: that one's refit covers it
                continue
            job = next_join_refit(model, tensor)
            if job is not None:
                joins.setdefault(job.layer, job)
                after.setdefault(job.layer, _layers_after(model, tensor))
            else:
                fallback += _layers_after(model, tensor)
        before = model.clone()
        order = {n.name: k for k, n in enumerate(model.graph.node)}
        errors: dict[str, dict] = {}
        skipped: list[str] = []
        for job in sorted(joins.values(), key=lambda j: order[j.layer]):
            result = refit_join(original, model, job, fitting, positions=self.positions, ridge=self.ridge)
            if result is None:  # the join cannot be matched: the layers right after are refit instead
                skipped.append(job.layer)
                fallback += after[job.layer]
            else:
                errors[job.layer] = {**result, "towards": job.join}
        layers = len(errors)
        fallback = [name for name in dict.fromkeys(fallback) if name not in errors]
        if fallback:
            jobs = [RefitJob(name, model.node_by_name(name).output[0]) for name in fallback]
            report = sequential_refit(original, model, jobs, fitting, positions=self.positions, ridge=self.ridge,
                                      holdout=0.25 if len(fitting) > 1 else 0.0)
            layers += report["layers"]
            skipped += report["skipped"]
            errors.update(report.get("errors", {}))
        refit_error = reference.error(model) if layers else error
        summary = {"layers": layers, "skipped": skipped, "errors": errors, "error_before": error,
                   "error_after": refit_error}
        if layers and not refit_error < error:
            _restore(model, before)
            summary["kept"] = False
            return summary, error
        summary["kept"] = bool(layers)
        return summary, refit_error

    def _selected(self, name: str) -> bool:
        if self.layers and not any(fnmatch.fnmatchcase(name, p) for p in self.layers):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.ignore)


def _restore(model: Model, saved: Model) -> None:
    model.proto.CopyFrom(saved.proto)
    model.graph_edited()
