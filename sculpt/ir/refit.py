"""Least-squares refit of a layer's weights on calibration activations (training-free recovery).

Given what a Conv/Gemm/MatMul *should* output (the original model's output of that node) and what
it now receives (a subset of its input channels), solve for new weights and bias by ridge
regression pulled towards the current weights:

    min ||Y - (P W' + b')||² + λ ||W' - W||²

where P holds im2col patches (Conv) or input rows (Gemm/MatMul) at sampled output positions.
"""

from __future__ import annotations

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
                strength: float = 1e-3) -> tuple[np.ndarray, np.ndarray | None]:
    """Solve for W' [F, O] (and b' [O] if b0 is not None) minimising
    ||Y - P W' - b'||² + λ||W' - W0||², λ = strength · mean diagonal of PᵀP."""
    p = p.astype(np.float64)
    y = y.astype(np.float64)
    w0 = w0.astype(np.float64)
    if b0 is not None:
        p = np.concatenate([p, np.ones((p.shape[0], 1))], axis=1)
        w0 = np.concatenate([w0, b0.astype(np.float64)[None, :]], axis=0)
    gram = p.T @ p
    lam = strength * max(float(np.mean(np.diag(gram))), 1e-12)
    reg = np.eye(gram.shape[0]) * lam
    if b0 is not None:
        reg[-1, -1] = 1e-12 * lam  # the bias is free
    rhs = p.T @ y + reg @ w0
    try:
        sol = np.linalg.solve(gram + reg, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(gram + reg, rhs, rcond=None)[0]
    if b0 is not None:
        return sol[:-1], sol[-1]
    return sol, None
