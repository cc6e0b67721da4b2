"""Least-squares refit of a layer's weights on calibration activations (training-free recovery).

Given what a Conv/Gemm/MatMul *should* output (the original model's output of that node) and what
it now receives (a subset of its input channels), solve for new weights and bias by ridge
regression pulled towards the current weights:

    min ||Y - (P W' + b')||² + λ ||W' - W||²

where P holds im2col patches (Conv) or input rows (Gemm/MatMul) at sampled output positions.
With a ``keep`` mask (a sparsity pattern, e.g. from ``sparsify``) the weights outside it stay
exactly zero: each output is solved over only the input features it keeps.

This is the algebra; the sequential refit that captures the activations through onnxruntime and
applies it layer after layer is ``sculpt.passes.refit.sequential_refit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sculpt.ir.channel_handlers import attr


def _conv_geometry(node, x_shape, w_shape):
    k = w_shape[2:]
    nd = len(k)
    strides = attr(node, "strides") or [1] * nd
    dil = attr(node, "dilations") or [1] * nd
    pads = attr(node, "pads") or [0] * (2 * nd)
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(nd):
            out = -(-x_shape[2 + i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - x_shape[2 + i])
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads.append(lo)
        pads = pads + [0] * nd  # only the leading pads matter for gathering
    return list(k), list(strides), list(dil), list(pads[:nd])


def sample_rows(node, x: np.ndarray, y_shape: tuple, positions: np.ndarray,
                w_shape: tuple) -> np.ndarray | None:
    """Input features seen by ``node`` at flat output ``positions`` (over N and spatial axes).

    Conv (2-D, group 1): im2col patches [S, Cin*kh*kw]. Gemm: rows of A. MatMul: rows of the
    left operand flattened over its leading axes."""
    op = node.op_type
    if op == "Conv":
        n, c = x.shape[:2]
        oh, ow = y_shape[2], y_shape[3]
        nn = positions // (oh * ow)
        rem = positions % (oh * ow)
        ph, pw = rem // ow, rem % ow
        return None if x.ndim != 4 else _patches(node, x, nn, ph, pw, w_shape)
    if op == "Gemm":
        return x[positions]
    return x.reshape(-1, x.shape[-1])[positions]


def pick_positions(total: int, per: int, rng: np.random.Generator) -> np.ndarray:
    """All ``total`` positions when there are at most ``per``, else ``per`` distinct ones at random, sorted."""
    return np.arange(total) if total <= per else np.sort(rng.choice(total, size=per, replace=False))


def layer_rows(node, x: np.ndarray, y_shape: tuple, w_shape: tuple, per: int,
               rng: np.random.Generator) -> np.ndarray | None:
    """What ``node`` sees in one calibration sample ``x``, at up to ``per`` random output positions:
    im2col patches for a 2-D Conv (None for other ranks), input rows for Gemm/MatMul. The calibration
    capture of every pass that fits weights to data (low-rank, the substitutions, sparsify)."""
    if node.op_type == "Conv":
        if x.ndim != 4:
            return None
        y_shape = (x.shape[0],) + tuple(y_shape[1:])
        return sample_rows(node, x, y_shape, pick_positions(y_shape[0] * y_shape[2] * y_shape[3], per, rng), w_shape)
    flat = x.reshape(-1, x.shape[-1])
    return flat[pick_positions(flat.shape[0], per, rng)]


def _patches(node, x, nn, ph, pw, w_shape):
    k, s, d, p = _conv_geometry(node, x.shape, w_shape)
    padded = np.pad(x, ((0, 0), (0, 0), (p[0], p[0] + k[0] * d[0]), (p[1], p[1] + k[1] * d[1])))
    rows = []
    for i in range(k[0]):
        for j in range(k[1]):
            hh = ph * s[0] + i * d[0]
            ww = pw * s[1] + j * d[1]
            rows.append(padded[nn, :, hh, ww])  # [S, C]
    return np.stack(rows, axis=2).reshape(len(nn), -1)  # [S, C*kh*kw], channel-major like W


def ridge_refit(p: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: np.ndarray | None, *,
                strength: float = 1e-3, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Solve for W' [F, O] (and b' [O] if b0 is not None) minimising
    ||Y - P W' - b'||² + λ||W' - W0||², λ = strength · mean diagonal of PᵀP.

    ``keep`` (bool [F, O]): W'[f, o] is held at exactly 0 where it is False; each output is solved
    over its kept features only (outputs with the same kept features in one solve). The bias is
    never masked."""
    p = p.astype(np.float64)
    y = y.astype(np.float64)
    w0 = w0.astype(np.float64)
    if b0 is not None:
        p = np.concatenate([p, np.ones((p.shape[0], 1))], axis=1)
        w0 = np.concatenate([w0, b0.astype(np.float64)[None, :]], axis=0)
        if keep is not None:
            keep = np.concatenate([keep, np.ones((1, keep.shape[1]), dtype=bool)], axis=0)
    gram = p.T @ p
    lam = strength * max(float(np.mean(np.diag(gram))), 1e-12)
    reg = np.full(gram.shape[0], lam)
    if b0 is not None:
        reg[-1] = 1e-12 * lam  # the bias is free
    rhs = p.T @ y + reg[:, None] * w0
    if keep is None:
        sol = _solve(gram + np.diag(reg), rhs)
    else:
        sol = np.zeros_like(w0)
        patterns, owner = np.unique(np.asarray(keep, dtype=bool).T, axis=0, return_inverse=True)
        owner = owner.reshape(-1)
        for k, pattern in enumerate(patterns):
            rows, cols = np.flatnonzero(pattern), np.flatnonzero(owner == k)
            if rows.size:
                sol[np.ix_(rows, cols)] = _solve(gram[np.ix_(rows, rows)] + np.diag(reg[rows]),
                                                 rhs[np.ix_(rows, cols)])
    if b0 is not None:
        return sol[:-1], sol[-1]
    return sol, None


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


@dataclass(frozen=True)
class RefitJob:
    """Refit node ``node`` of the compressed model so that its output matches tensor ``target`` of
    the original model (only channels ``channels`` of it, along axis 1 for Conv/Gemm and the last
    axis for MatMul, when the node produces a subset or a reordering of them).

    ``keep`` (bool, the shape of the node's weight): the weights that may be nonzero; the others are
    held at exactly zero by the refit (a sparsity pattern it must preserve)."""

    node: str
    target: str
    channels: tuple[int, ...] | None = None
    keep: np.ndarray | None = field(default=None, compare=False, repr=False)


def refittable(model, node) -> bool:
    """Conv (2-D input, group 1, constant weight) / Gemm (alpha = beta = 1, constant B) / MatMul with
    a constant right operand: the layers ridge_refit can solve for."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
        return False
    if model.get_constant(node.input[1]) is None:
        return False
    if node.op_type == "Conv":
        shape = model.tensor_shape(node.input[0])
        return int(attr(node, "group", 1)) == 1 and (shape is None or len(shape) == 4)
    if node.op_type == "Gemm":
        return (attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0
                and not attr(node, "transA", 0))
    return True


def flat_outputs(op: str, y: np.ndarray) -> np.ndarray:
    if op == "Conv":
        return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    if op == "Gemm":
        return y
    return y.reshape(-1, y.shape[-1])


def weight_matrix(node, w: np.ndarray) -> np.ndarray:
    """A stored weight (or a mask of its shape) as the [features, outputs] matrix ridge_refit solves for."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return w.T
    return w


def weight_from_matrix(node, matrix: np.ndarray, shape: tuple) -> np.ndarray:
    if node.op_type == "Conv":
        return matrix.T.reshape(shape)
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return matrix.T
    return matrix


# relative squared residual ||Y - P W - b||² / ||Y||² under which a layer already reproduces its
# target (relative error 1e-4): it is left as it is
ALREADY_EXACT = 1e-8


def residual(p: np.ndarray, t: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> float:
    y = p.astype(np.float64) @ w.astype(np.float64)
    if b is not None:
        y = y + b.reshape(-1).astype(np.float64)
    t = t.astype(np.float64)
    return float(((t - y) ** 2).sum() / max(float((t ** 2).sum()), 1e-30))


def generalizes(rows: list[np.ndarray], t: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                 keep: np.ndarray | None, ridge: float, holdout: float) -> bool:
    """Does a refit on the first samples' rows lower the error on the held-out last ones?"""
    held = min(len(rows) - 1, max(1, int(round(holdout * len(rows)))))
    split = sum(len(r) for r in rows[:-held])
    p = np.concatenate(rows)
    bias = None if b is None else b.reshape(-1)
    new_w, new_b = ridge_refit(p[:split], t[:split], w, bias, strength=ridge, keep=keep)
    return residual(p[split:], t[split:], new_w, new_b) < residual(p[split:], t[split:], w, b)


def guarded_refit(rows: list[np.ndarray], t: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                  keep: np.ndarray | None, ridge: float, holdout: float, report: dict, name: str):
    """The ridge refit of one layer from its per-sample input rows and targets, with the guards every
    refit in sculpt applies: nothing to do when the layer is already exact, refused when a refit on the
    first samples does not lower the error on the held-out last ones, kept only if it lowers the error
    on all the rows. A refused layer is recorded in ``report`` ("already_exact", "skipped",
    "overfit"); a kept one returns (new_w, new_b, error before, error after) (squared, relative)."""
    p = np.concatenate(rows)
    before = residual(p, t, w, b)
    if before <= ALREADY_EXACT:  # nothing to recover; a refit would only fit float noise
        report.setdefault("already_exact", []).append(name)
        return None
    if holdout > 0 and len(rows) > 1 and not generalizes(rows, t, w, b, keep, ridge, holdout):
        report["skipped"].append(name)
        report.setdefault("overfit", []).append(name)
        return None
    new_w, new_b = ridge_refit(p, t, w, None if b is None else b.reshape(-1), strength=ridge, keep=keep)
    after = residual(p, t, new_w, new_b)
    if after >= before:  # never worse on the calibration data
        report["skipped"].append(name)
        return None
    return new_w, new_b, before, after
