"""Factorization math for the low-rank passes: truncated SVD of a weight matrix, spatial SVD
(kh×kw → kh×1 then 1×kw) and Tucker-2 (1×1 → kh×kw core → 1×1) of a 2-D convolution kernel.

Every factorization can be *whitened* by the Cholesky factor L of the input's second-moment matrix
Σ = E[x xᵀ] = L Lᵀ (over features for a matrix, over channels for a convolution). The weight is
then factored as W' = Lᵀ W (in the coordinates where the input is white), so truncation drops
the directions that carry the least *output* energy on real data instead of the least weight
energy, and the first factor maps back with L⁻¹. At full rank every factorization is exact, whitened
or not.

Conventions: a matrix weight is ``wmat`` [F, O] with y = x @ wmat; a convolution weight is ONNX's
[O, C, kh, kw].
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular


def whitening(sigma: np.ndarray, ridge: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(L, L⁻¹) with L Lᵀ = Σ + λI, λ = ridge · mean diagonal (so that Σ may be singular)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    lam = ridge * max(float(np.mean(np.diag(sigma))), 1e-12)
    chol = np.linalg.cholesky(sigma + lam * np.eye(sigma.shape[0]))
    inv = solve_triangular(chol, np.eye(sigma.shape[0]), lower=True)
    return chol, inv


def energy_rank(s: np.ndarray, energy: float, total: float | None = None) -> int:
    """The smallest rank whose dropped singular values hold at most (1 − ``energy``) of ``total``
    (default: Σ s², the usual energy fraction; energy ≥ 1: all)."""
    if energy >= 1.0 or len(s) == 0:
        return len(s)
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    total = e[-1] if total is None or total <= 0 else total
    if e[-1] <= 0:
        return 1
    tail = e[-1] - e  # energy dropped at rank 1..n
    ok = np.nonzero(tail <= (1 - energy) * total + 1e-12 * e[-1])[0]
    return int(min(len(s), ok[0] + 1))


def kept_energy(s: np.ndarray, r: int, total: float | None = None) -> float:
    e = np.asarray(s, dtype=np.float64) ** 2
    total = e.sum() if total is None or total <= 0 else total
    return float(1 - e[r:].sum() / total) if total > 0 else 1.0


class MatrixSVD:
    """wmat [F, O] ≈ A [F, r] @ B [r, O] (the singular values split evenly between the factors)."""

    def __init__(self, wmat: np.ndarray, inv_chol: np.ndarray | None = None, chol: np.ndarray | None = None):
        self.wmat = np.asarray(wmat, dtype=np.float64)
        self.inv = inv_chol
        m = self.wmat if chol is None else chol.T @ self.wmat
        self.u, self.s, self.vt = np.linalg.svd(m, full_matrices=False)
        self.full = len(self.s)

    def factors(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        r = max(1, min(r, self.full))
        sq = np.sqrt(self.s[:r])
        a = self.u[:, :r] * sq
        if self.inv is not None:
            a = self.inv.T @ a
        return a, sq[:, None] * self.vt[:r]

    def approx(self, r: int) -> np.ndarray:
        a, b = self.factors(r)
        return a @ b


def _whiten_conv(w: np.ndarray, chol: np.ndarray | None) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w if chol is None else np.einsum("ocij,cd->odij", w, chol)


class SpatialSVD:
    """w [O, C, kh, kw] ≈ Σ_r V[r, c, i] H[o, r, j]: a kh×1 conv to r channels, then a 1×kw conv."""

    def __init__(self, w: np.ndarray, inv_chol: np.ndarray | None = None, chol: np.ndarray | None = None):
        wp = _whiten_conv(w, chol)
        self.shape = wp.shape
        o, c, kh, kw = wp.shape
        m = wp.transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
        self.u, self.s, self.vt = np.linalg.svd(m, full_matrices=False)
        self.inv = inv_chol
        self.full = len(self.s)

    def factors(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(vertical weight [r, C, kh, 1], horizontal weight [O, r, 1, kw])."""
        o, c, kh, kw = self.shape
        r = max(1, min(r, self.full))
        sq = np.sqrt(self.s[:r])
        v = (self.u[:, :r] * sq).reshape(c, kh, r)
        if self.inv is not None:
            v = np.einsum("dir,dc->cir", v, self.inv)
        h = (sq[:, None] * self.vt[:r]).reshape(r, o, kw)
        return v.transpose(2, 0, 1)[..., None], h.transpose(1, 0, 2)[:, :, None, :]

    def approx(self, r: int) -> np.ndarray:
        v, h = self.factors(r)
        return np.einsum("rci,orj->ocij", v[..., 0], h[:, :, 0, :])


class Tucker2:
    """w [O, C, kh, kw] ≈ core [r2, r1, kh, kw] ×₁ U_out [O, r2] ×₂ P_in [r1, C] (HOSVD: the factor
    matrices are the leading left singular vectors of the mode-1 and mode-2 unfoldings)."""

    def __init__(self, w: np.ndarray, inv_chol: np.ndarray | None = None, chol: np.ndarray | None = None):
        self.wp = _whiten_conv(w, chol)
        o, c = self.wp.shape[:2]
        self.u_out, self.s_out, _ = np.linalg.svd(self.wp.reshape(o, -1), full_matrices=False)
        self.u_in, self.s_in, _ = np.linalg.svd(self.wp.transpose(1, 0, 2, 3).reshape(c, -1), full_matrices=False)
        self.inv = inv_chol
        self.full = (len(self.s_in), len(self.s_out))

    def factors(self, r1: int, r2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first 1×1 weight [r1, C, 1, 1], core [r2, r1, kh, kw], last 1×1 weight [O, r2, 1, 1])."""
        r1 = max(1, min(r1, self.full[0]))
        r2 = max(1, min(r2, self.full[1]))
        uo, ui = self.u_out[:, :r2], self.u_in[:, :r1]
        core = np.einsum("odij,or,ds->rsij", self.wp, uo, ui, optimize=True)
        p_in = ui.T if self.inv is None else ui.T @ self.inv
        return p_in[:, :, None, None], core, uo[:, :, None, None]

    def approx(self, r1: int, r2: int) -> np.ndarray:
        p_in, core, uo = self.factors(r1, r2)
        return np.einsum("rsij,or,sc->ocij", core, uo[:, :, 0, 0], p_in[:, :, 0, 0], optimize=True)
