"""The sequential refit the data-aware passes share (channel pruning, sparsify, the layer
substitutions): each refit layer's new weights are solved by ridge least squares (the algebra is
``sculpt.ir.refit``) on what it receives in the compressed model after the layers before it were
refit, against what the original model's layer outputs (both captured through onnxruntime)."""

from __future__ import annotations

import numpy as np

from sculpt.ir.refit import (RefitJob, flat_outputs, guarded_refit, pick_positions, refittable, sample_rows, weight_from_matrix,
                              weight_matrix)
from sculpt.runtime import LayerInputStream, iter_activations


def sequential_refit(original, compressed, jobs: list[RefitJob], samples: list[dict], *, positions: int = 4096,
                     ridge: float = 1e-3, seed: int = 1, holdout: float = 0.0) -> dict:
    """Refit every job's node by ridge least squares, in the compressed model's topological order,
    editing ``compressed`` in place. The targets are the original model's outputs at sampled
    positions (one run of it); the features are what each node receives in the compressed model
    *after* the nodes before it were refit, so errors do not compound along the network.
    A job with a ``keep`` mask keeps its zero pattern exactly.

    ``holdout`` > 0: that fraction of the samples (the last ones, at least one) is first held out; a
    layer whose refit on the others does not lower its error on them is left as it is (listed in
    "overfit": too few rows for its unknowns, e.g. a Conv on a 1×1 map), else it is refit on all.

    Returns {"layers": refit count, "skipped": [node names]} and, for the layers refit, "errors":
    {node: {"before", "after"}} (relative output error on the calibration rows)."""
    order = {n.name: i for i, n in enumerate(compressed.graph.node)}
    report: dict = {"layers": 0, "skipped": []}
    todo, seen = [], set()
    for job in jobs:
        if job.node in seen:
            continue
        seen.add(job.node)
        node = compressed.node_by_name(job.node)
        if node is None or not refittable(compressed, node):
            report["skipped"].append(job.node)
        else:
            todo.append((order[node.name], job, node))
    todo.sort(key=lambda t: t[0])
    if not todo or not samples:
        return report
    rng = np.random.default_rng(seed)
    per = max(16, positions // len(samples))
    picked: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list[np.ndarray]] = {}
    out_shapes: dict[str, tuple] = {}
    wanted = sorted({job.target for _, job, _ in todo})
    for acts in iter_activations(original, wanted, samples):
        for _, job, node in todo:
            y = acts[job.target]
            out_shapes[job.node] = y.shape
            flat = flat_outputs(node.op_type, y)
            pos = pick_positions(flat.shape[0], per, rng)
            t = flat[pos] if job.channels is None else flat[pos][:, list(job.channels)]
            picked.setdefault(job.node, []).append(pos)
            targets.setdefault(job.node, []).append(t)
    stream = LayerInputStream(compressed, list(samples))
    for position, job, node in todo:
        w = compressed.get_constant(node.input[1])
        rows = [sample_rows(node, x, out_shapes[job.node], picked[job.node][k], w.shape)
                for k, x in enumerate(stream.inputs(position, node.input[0]))]
        w_mat = weight_matrix(node, w)
        keep = None if job.keep is None else weight_matrix(node, np.asarray(job.keep, dtype=bool))
        has_bias = len(node.input) > 2 and bool(node.input[2])
        b = compressed.get_constant(node.input[2]) if has_bias else None
        t = np.concatenate(targets[job.node])
        if (any(r is None for r in rows) or (has_bias and (b is None or b.size != w_mat.shape[1]))
                or t.shape[1] != w_mat.shape[1] or (job.keep is not None and np.shape(job.keep) != w.shape)):
            report["skipped"].append(job.node)
            continue
        fitted = guarded_refit(rows, t, w_mat, b, keep, ridge, holdout, report, job.node)
        if fitted is None:
            continue
        new_w, new_b, before, after = fitted
        compressed.replace_constant_input(node, 1, weight_from_matrix(node, new_w, w.shape).astype(w.dtype),
                                          suffix="refit")
        if new_b is not None:
            compressed.replace_constant_input(node, 2, new_b.reshape(b.shape).astype(w.dtype), suffix="refit")
        report["layers"] += 1
        # relative output error ||Y - Ŷ|| / ||Y|| on the calibration rows, before and after the refit
        report.setdefault("errors", {})[job.node] = {"before": float(np.sqrt(before)), "after": float(np.sqrt(after))}
    return report
