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


# ---------------------------------------------------------------------------- CP (Lebedev et al. 2015)
def cp_full_rank(shape: tuple[int, ...]) -> int:
    """The smallest CP rank at which any kernel [O, C, kh, kw] has an exact decomposition by
    construction: one rank-1 term per entry of three of the four modes (the fourth mode's column is
    the kernel's fibre), the cheapest three."""
    o, c, kh, kw = shape
    return int(min(c * kh * kw, o * kh * kw, o * c * kw, o * c * kh))


class ConvCP:
    """w [O, C, kh, kw] ≈ Σ_r U[o, r] P[c, r] V[i, r] H[j, r]: a 1×1 conv to ``r`` channels (P),
    a kh×1 depthwise conv (V), a 1×kw depthwise conv (H) and a 1×1 conv back to O (U).

    Fitted by alternating least squares on the (whitened over C) kernel, initialised from the
    leading singular vectors of each mode's unfolding (HOSVD; the columns a short mode lacks are
    drawn at random from a fixed seed). Every update is a proximal ridge solve (a small pull
    towards the previous factor keeps the normal equations invertible and damps the swamps of
    plain ALS), the columns are rebalanced to equal norms across modes after each sweep, and the
    sweeps stop when a sweep lowers the squared residual by less than ``tol`` of itself. At
    ``cp_full_rank`` and above the exact construction is used instead of ALS."""

    def __init__(self, w: np.ndarray, inv_chol: np.ndarray | None = None, chol: np.ndarray | None = None,
                 iterations: int = 100, tol: float = 1e-5, seed: int = 0):
        self.wp = _whiten_conv(w, chol)
        self.inv = inv_chol
        self.shape = self.wp.shape
        self.full = cp_full_rank(self.shape)
        self.norm2 = float((self.wp ** 2).sum())
        self.iterations = iterations
        self.tol = tol
        self.seed = seed
        self._fits: dict[int, tuple[list[np.ndarray], float]] = {}
        self._svd = [np.linalg.svd(np.moveaxis(self.wp, m, 0).reshape(self.shape[m], -1), full_matrices=False)[0]
                     for m in range(4)]

    # the factors in whitened coordinates, [O, R], [C, R], [kh, R], [kw, R], and the squared residual
    def _fit(self, r: int) -> tuple[list[np.ndarray], float]:
        r = max(1, min(r, self.full))
        if r not in self._fits:
            self._fits[r] = self._exact() if r == self.full else self._als(r)
        return self._fits[r]

    def _exact(self) -> tuple[list[np.ndarray], float]:
        dims = self.shape
        # the mode left out is the one whose fibres become the columns: the cheapest three others
        costs = [int(np.prod(dims)) // dims[m] for m in range(4)]
        keep = int(np.argmin(costs))
        others = [m for m in range(4) if m != keep]
        moved = np.moveaxis(self.wp, keep, -1).reshape(-1, dims[keep])  # rows: the others' entries, row-major
        r = moved.shape[0]
        idx = np.unravel_index(np.arange(r), [dims[m] for m in others])
        factors: list[np.ndarray] = [np.zeros((dims[m], r)) for m in range(4)]
        for k, m in enumerate(others):
            factors[m][idx[k], np.arange(r)] = 1.0
        factors[keep] = moved.T.copy()
        return factors, 0.0

    def _als(self, r: int) -> tuple[list[np.ndarray], float]:
        # ALS runs on the HOSVD core: each mode projected on its unfolding's singular vectors, all of
        # them (lossless: a C of 960 with O·kh·kw = 180 becomes 180). The least-squares factors lie in
        # those column spaces, so the fit is the same and each sweep costs the core's size.
        bases = self._svd
        core = np.einsum("abcd,ai,bj,ck,dl->ijkl", self.wp, *bases, optimize=True)
        dims = core.shape
        unfolded = [np.moveaxis(core, m, 0).reshape(dims[m], -1) for m in range(4)]
        rng = np.random.default_rng(self.seed)
        factors = []
        for m in range(4):  # the leading singular vectors (unit vectors in the core), then random columns
            k = min(r, dims[m])
            f = np.concatenate([np.eye(dims[m], k), rng.standard_normal((dims[m], r - k)) / np.sqrt(dims[m])], axis=1)
            factors.append(f)
        prev = np.inf
        for _ in range(self.iterations):
            for m in range(4):
                gram = np.ones((r, r))
                for n in range(4):
                    if n != m:
                        gram *= factors[n].T @ factors[n]
                mtt = _mttkrp(unfolded[m], factors, m)
                lam = 1e-7 * max(float(np.trace(gram)) / r, 1e-30)
                factors[m] = np.linalg.solve(gram + lam * np.eye(r), (mtt + lam * factors[m]).T).T
            # ‖T − T̂‖² = ‖T‖² − 2⟨T, T̂⟩ + ‖T̂‖², from the last update's MTTKRP and the Gram matrices
            full_gram = gram * (factors[3].T @ factors[3])
            inner = float((mtt * factors[3]).sum())
            resid = max(self.norm2 - 2 * inner + float(full_gram.sum()), 0.0)
            _rebalance(factors)
            if prev - resid < self.tol * prev or resid <= 1e-14 * self.norm2:
                break
            prev = resid
        factors = [b @ f for b, f in zip(bases, factors)]
        resid = float(((self.wp - _cp_tensor(factors)) ** 2).sum())
        return factors, resid

    def relative_error(self, r: int) -> float:
        """‖W' − Ŵ'‖ / ‖W'‖ in the (whitened) coordinates the fit works in."""
        return float(np.sqrt(self._fit(r)[1] / max(self.norm2, 1e-300)))

    def residual(self, r: int) -> float:
        """The squared residual ‖W' − Ŵ'‖² of the rank-``r`` fit (whitened coordinates)."""
        return self._fit(r)[1]

    def factors(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(first 1×1 weight [R, C, 1, 1], vertical depthwise [R, 1, kh, 1], horizontal depthwise
        [R, 1, 1, kw], last 1×1 weight [O, R, 1, 1]); the spatial factors have unit-norm columns."""
        u, p, v, h = (f.copy() for f in self._fit(r)[0])
        for f in (v, h):
            n = np.linalg.norm(f, axis=0)
            n[n == 0] = 1.0
            f /= n
            u *= n
        if self.inv is not None:
            p = self.inv.T @ p
        rr = u.shape[1]
        return (p.T[:, :, None, None], v.T.reshape(rr, 1, -1, 1), h.T.reshape(rr, 1, 1, -1), u[:, :, None, None])

    def approx(self, r: int) -> np.ndarray:
        p, v, h, u = self.factors(r)
        return np.einsum("or,rc,ri,rj->ocij", u[:, :, 0, 0], p[:, :, 0, 0], v[:, 0, :, 0], h[:, 0, 0, :],
                         optimize=True)


def _mttkrp(unfolded: np.ndarray, factors: list[np.ndarray], mode: int) -> np.ndarray:
    """The mode-``mode`` unfolding [dim_mode, ∏ other dims] (row-major over the other modes in
    order) times the Khatri–Rao product of every other factor: [dim_mode, R], one matrix product."""
    others = [factors[n] for n in range(4) if n != mode]
    kr = others[0]
    for f in others[1:]:
        kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return unfolded @ kr


def _cp_tensor(factors: list[np.ndarray]) -> np.ndarray:
    return np.einsum("ar,br,cr,dr->abcd", *factors, optimize="greedy")


def _rebalance(factors: list[np.ndarray]) -> None:
    """Give each rank-1 term's four columns the same norm (their product unchanged)."""
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])  # [4, R]
    norms = np.where(norms > 0, norms, 1.0)
    target = np.exp(np.log(norms).mean(0))
    for m, f in enumerate(factors):
        f *= target / norms[m]


# ---------------------------------------------------------------------------- tensor train (Novikov et al. 2015)
def mode_splits(n: int, d: int) -> list[tuple[int, ...]]:
    """The ordered ways of writing ``n`` as a product of ``d`` factors, each at least 2."""
    if d == 1:
        return [(n,)] if n >= 2 else []
    out = []
    for f in range(2, n + 1):
        if n % f == 0:
            out += [(f,) + rest for rest in mode_splits(n // f, d - 1)]
    return out


class MatrixTT:
    """wmat [F, O] with F = ∏ i_k and O = ∏ o_k (row-major) ≈ a tensor train of cores
    G_k [r_{k-1}, i_k, o_k, r_k] (r_0 = r_d = 1): W[(i_1..i_d), (o_1..o_d)] = G_1[i_1, o_1] ⋯ G_d[i_d, o_d],
    by TT-SVD (Oseledets 2011): the sequential truncated SVDs of the tensor with the modes
    interleaved as (i_1 o_1)(i_2 o_2)⋯. At the full ranks (``full``) it is exact."""

    def __init__(self, wmat: np.ndarray, in_modes: tuple[int, ...], out_modes: tuple[int, ...]):
        self.wmat = np.asarray(wmat, dtype=np.float64)
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        d = self.d = len(in_modes)
        f, o = self.wmat.shape
        if int(np.prod(in_modes)) != f or int(np.prod(out_modes)) != o or len(out_modes) != d:
            raise ValueError(f"modes {in_modes}×{out_modes} do not factor a {f}×{o} weight")
        order = [a for k in range(d) for a in (k, d + k)]
        self.tensor = self.wmat.reshape(self.in_modes + self.out_modes).transpose(order)
        sizes = [i * o for i, o in zip(self.in_modes, self.out_modes)]
        self.full = tuple(int(min(np.prod(sizes[:k + 1]), np.prod(sizes[k + 1:]))) for k in range(d - 1))
        self.norm2 = float((self.wmat ** 2).sum())
        self._cache: dict[tuple, tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def _sweep(self, ranks: tuple[int, ...] | None, energy: float = 1.0,
               total: float | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """TT-SVD: with ``ranks``, truncate each SVD to them; else to the smallest rank whose
        dropped squared singular values stay within (1 − energy)/(d − 1) of ``total``."""
        sizes = [i * o for i, o in zip(self.in_modes, self.out_modes)]
        budget = (1 - energy) * (total if total and total > 0 else self.norm2) / max(self.d - 1, 1)
        cores, svals = [], []
        rest = self.tensor.reshape(sizes[0], -1)
        r_prev = 1
        for k in range(self.d - 1):
            u, s, vt = np.linalg.svd(rest.reshape(r_prev * sizes[k], -1), full_matrices=False)
            if ranks is not None:
                r = max(1, min(int(ranks[k]), len(s)))
            else:
                tail = np.cumsum((s ** 2)[::-1])[::-1]  # tail[j]: energy dropped when keeping j values
                ok = [j for j in range(1, len(s) + 1) if (tail[j] if j < len(s) else 0.0) <= budget + 1e-12 * tail[0]]
                r = ok[0] if ok else len(s)
            svals.append(s)
            cores.append(u[:, :r].reshape(r_prev, self.in_modes[k], self.out_modes[k], r))
            rest = s[:r, None] * vt[:r]
            r_prev = r
        cores.append(rest.reshape(r_prev, self.in_modes[-1], self.out_modes[-1], 1))
        return cores, svals

    def energy_ranks(self, energy: float, total: float | None = None) -> tuple[int, ...]:
        cores, _ = self._sweep(None, energy, total)
        return tuple(c.shape[3] for c in cores[:-1])

    def cores(self, ranks: tuple[int, ...]) -> list[np.ndarray]:
        ranks = tuple(max(1, min(int(r), f)) for r, f in zip(ranks, self.full))
        if ranks not in self._cache:
            self._cache[ranks] = self._sweep(ranks)
        return self._cache[ranks][0]

    def approx(self, ranks: tuple[int, ...]) -> np.ndarray:
        cores = self.cores(ranks)
        t = cores[0].reshape(-1, cores[0].shape[3])  # [(i1 o1), r1]
        for g in cores[1:]:
            t = t @ g.reshape(g.shape[0], -1)  # [(i1 o1 … i_k o_k), r_k]
            t = t.reshape(-1, g.shape[3])
        d = self.d
        t = t.reshape([x for k in range(d) for x in (self.in_modes[k], self.out_modes[k])])
        order = list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2))
        return t.transpose(order).reshape(self.wmat.shape)

    def macs_per_row(self, ranks: tuple[int, ...]) -> int:
        """Multiply-accumulates per input row of the chain ``tt_chain_shapes`` describes."""
        r = (1,) + tuple(ranks) + (1,)
        total = 0
        for k in range(self.d):
            before = int(np.prod(self.in_modes[:k]))
            after = int(np.prod(self.out_modes[k + 1:]))
            total += before * self.in_modes[k] * r[k] * self.out_modes[k] * r[k + 1] * after
        return int(total)
