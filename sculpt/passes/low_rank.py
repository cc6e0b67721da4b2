"""low-rank: factor Gemm/MatMul/Conv weights into cheaper products (truncated SVD, spatial SVD, Tucker-2,
CP, tensor train)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper

from sculpt.ir.channel_handlers import attr
from sculpt.ir.factorize import (ConvCP, MatrixSVD, MatrixTT, SpatialSVD, Tucker2, energy_rank, kept_energy,
                                  mode_splits, whitening)
from sculpt.ir.model import Model
from sculpt.ir.refit import guarded_refit, layer_rows, pick_positions
from sculpt.ir.substitution import CandidateLayer, NameAllocator, conv_unsupported, name_selected
from sculpt.passes.base import PassContext, PassResult, check_range, option, register
from sculpt.passes.layer_substitution import FittedReplacement, LayerSubstitutionPass
from sculpt.runtime import LayerInputStream, iter_activations, sampled_activations

# above this many input features the data-aware weighting (an F×F covariance) is not used
MAX_COVARIANCE_FEATURES = 8192


@dataclass(kw_only=True)
class FactorableLayer(CandidateLayer):
    """A Gemm, MatMul or Conv low-rank may factor, with its weight in matrix form and the input's
    second moment gathered on calibration data (``data_aware``)."""

    kind: str  # matrix (Gemm/MatMul), conv1x1, conv (2-D k×k)
    wmat: np.ndarray  # [F, O], y = x @ wmat (+ bias); for convs the im2col form
    # calibration statistics
    sigma: Any = 0.0
    total: Any = 0.0  # Σ x over the samples (for the mean)
    count: int = 0

    @property
    def sigma_dim(self) -> int:
        return self.wmat.shape[0] if self.kind == "matrix" else self.w.shape[1]


@register
@dataclass
class LowRank(LayerSubstitutionPass):
    """Factor layers into two or three cheaper ones, with no training.

    - Gemm / MatMul with a constant 2-D weight, and 1×1 Conv: truncated SVD, W ≈ A·B — two
      MatMul/Gemm (or two 1×1 Conv) through ``r`` channels.
    - k×k Conv (2-D, group 1): spatial SVD (a k×1 Conv to ``r`` channels, then a 1×k Conv; Jaderberg
      et al. 2014) or Tucker-2 (1×1 to ``r1`` channels → k×k core to ``r2`` → 1×1; Kim et al. 2016,
      by HOSVD), whichever costs fewer MACs (``method=auto``) at the chosen ranks.
    - Asked for by name only (``method=auto`` never picks them): ``method=cp`` factors a k×k Conv
      (2-D, group 1) by a rank-``R`` CP decomposition of its kernel — a 1×1 Conv to ``R`` channels,
      a k×1 depthwise Conv, a 1×k depthwise Conv and a 1×1 Conv back (with the bias); Lebedev et al.
      2015, fitted by ALS from an HOSVD start (a k×1 or 1×k kernel gets one depthwise Conv). Gemm /
      MatMul / 1×1 Conv still get the truncated SVD. ``method=tt`` factors a Gemm / MatMul weight
      [F, O] as a tensor train (TT-SVD, Novikov et al. 2015): F and O are split into ``tt_cores``
      modes each (the most balanced splits are tried, the cheapest at the chosen ranks kept) and the
      layer becomes a chain of Reshape and MatMul nodes, one MatMul per core, cores applied from the
      last; Convs are left alone.

    Ranks: by ``criterion`` — ``energy`` (the smallest rank keeping that fraction of the squared
    singular values; with ``data_aware`` those are the layer's output energy on calibration data),
    ``compression`` (the largest rank whose factored layer has at most 1/``compression`` of the
    MACs), or ``error`` (the smallest rank whose relative output error on calibration data is at most
    ``max_error``). For ``cp`` the energy is that of the (whitened) kernel the fit keeps,
    1 − ‖W − Ŵ‖²/‖W‖² (searched over ranks, one ALS fit each); for ``tt`` each of the tt_cores − 1
    SVDs of the TT-SVD may drop (1 − energy)/(tt_cores − 1) of the weight's energy. Ranks are rounded
    up to a multiple of ``round_to``. ``data_aware`` weights the factorization by the input
    activations' second-moment matrix Σ = E[x xᵀ] (features of a Gemm, channels of a Conv): the
    weight is factored in the coordinates where the input is white, which minimises the output error
    E‖x(W − Ŵ)‖² exactly for Gemm/MatMul/1×1 Conv (and per position, ignoring spatial correlation,
    for k×k and CP, whose C-mode factor absorbs the whitening). A tensor train is not whitened (a
    dense F×F map would undo its savings); with calibration data its last-applied core is refit like
    the others' last factor. A layer is left alone when factoring would not save at least
    ``min_saving`` of its MACs (unless ``force``). At full rank every factorization is exact.
    Each factored layer's output keeps its name. With calibration data (``refit``), each factored
    layer's last factor is then refit by ridge least squares, in network order, on the inputs the
    compressed model really gives it, towards the original layer's output: the error of one
    factored layer is compensated by the next instead of compounding. Lossy."""

    name = "low-rank"
    exact = False
    needs_static_shapes = True
    count_key = "factored"
    report_cost_without_candidates = False

    criterion: Literal["energy", "compression", "error"] = option(
        "energy", help="how ranks are chosen: energy | compression | error (needs calibration)")
    energy: float = option(0.9, help="criterion=energy: fraction of the squared singular values kept (1: full rank)")
    compression: float = option(2.0, help="criterion=compression: each factored layer gets ≤ 1/compression of its MACs")
    max_error: float = option(0.05, help="criterion=error: relative output error budget per layer on calibration data")
    method: Literal["auto", "spatial", "tucker", "cp", "tt"] = option(
        "auto", help="k×k Conv: spatial SVD, Tucker-2, auto (the one of those two with fewer MACs) or cp (CP: "
                     "1×1 → k×1 depthwise → 1×k depthwise → 1×1); tt: Gemm/MatMul as a tensor train (Convs left "
                     "alone). With cp and tt, energy is the fraction of the weight's energy the CP fit / each "
                     "TT-SVD step keeps")
    tt_cores: int = option(2, help="method=tt: cores of the tensor train (the weight's input and output sizes are "
                                   "each split into this many factors ≥ 2)")
    als_iterations: int = option(100, help="method=cp: at most this many ALS sweeps per fitted rank")
    data_aware: bool = option(False, help="weight the factorization by the input covariance (needs calibration)")
    round_to: int = option(8, help="ranks rounded up to a multiple (capped at full rank)")
    samples: int = option(8, help="calibration samples for covariance and error measurement")
    ridge: float = option(1e-4, help="data_aware: Σ + ridge·mean(diag Σ)·I, so unseen directions stay invertible")
    refit: bool = option(True, help="with calibration data: after factoring, refit each factored layer's last "
                                    "factor in order on the compressed model's own inputs (errors do not compound)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        check_range("compression", self.compression, 1)
        if self.round_to < 1:
            raise ValueError(f"round_to must be ≥ 1, got {self.round_to}")
        check_range("tt_cores", self.tt_cores, 2, 6)
        check_range("als_iterations", self.als_iterations, 1, 100000)

    def requires(self, model, ctx):
        super().requires(model, ctx)
        if self.data_aware or self.criterion == "error":
            self.require_calibration(ctx, "data_aware=true" if self.data_aware else "criterion=error")

    def refit_wanted(self, ctx: PassContext) -> bool:
        return self.refit and ctx.calibration is not None

    def fit_replacement(self, layer: FactorableLayer) -> FittedReplacement | str:
        try:
            plan = self._plan(layer)
        except np.linalg.LinAlgError as e:
            return f"factorization failed ({e})"
        if isinstance(plan, str):
            return plan
        return FittedReplacement(plan, plan["report"])

    # ------------------------------------------------------------------ which layers
    def _chosen(self, name: str, macs: int) -> str | None:
        if not name_selected(name, self.layers, []):
            return "not in layers"
        if not name_selected(name, [], self.ignore):
            return "ignored"
        if macs < self.min_macs:
            return f"{macs} MACs < min_macs"
        return None

    def select_layers(self, model: Model) -> tuple[list[FactorableLayer], list[dict]]:
        layers, skipped = [], []
        graph_inputs = {i.name for i in model.graph.input}
        for node in model.graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "MatMul", "Conv"):
                continue
            reason = None
            layer = None
            w = model.get_constant(node.input[1]) if len(node.input) > 1 else None
            x_shape = model.static_shape(node.input[0])
            y_shape = model.static_shape(node.output[0])
            if w is None or node.input[1] in graph_inputs:
                reason = "weight is not a constant"
            elif w.dtype not in (np.float32, np.float64):
                reason = f"weight dtype {w.dtype}"
            elif x_shape is None or y_shape is None:
                reason = "no static shapes"
            elif model.get_constant(node.input[0]) is not None:
                reason = "input is a constant"
            elif node.op_type == "Gemm":
                if attr(node, "transA", 0) or len(x_shape) != 2:
                    reason = "Gemm with transA"
                else:
                    wm = (w.T if attr(node, "transB", 0) else w) * float(attr(node, "alpha", 1.0))
                    bias = model.get_constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                    if len(node.input) > 2 and node.input[2] and bias is None:
                        reason = "Gemm bias is not a constant"
                    else:
                        if bias is not None:
                            bias = bias * float(attr(node, "beta", 1.0))
                        layer = FactorableLayer(node=node, kind="matrix", w=w, wmat=wm, bias=bias, x_shape=x_shape,
                                                y_shape=y_shape, macs=x_shape[0] * wm.size)
            elif node.op_type == "MatMul":
                if w.ndim != 2 or len(x_shape) < 2:
                    reason = "weight is not 2-D"
                else:
                    rows = int(np.prod(x_shape[:-1]))
                    layer = FactorableLayer(node=node, kind="matrix", w=w, wmat=w, bias=None, x_shape=x_shape,
                                            y_shape=y_shape, macs=rows * w.size)
            else:  # Conv
                bias = model.get_constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                reason = conv_unsupported(node, bias)
                if reason is None:
                    macs = int(np.prod(y_shape)) * int(np.prod(w.shape[1:]))
                    wm = w.reshape(w.shape[0], -1).T
                    kind = "conv1x1" if all(k == 1 for k in w.shape[2:]) else "conv" if w.ndim == 4 else None
                    if kind is not None:
                        layer = FactorableLayer(node=node, kind=kind, w=w, wmat=wm, bias=bias, x_shape=x_shape,
                                                y_shape=y_shape, macs=macs)
                    else:
                        reason = f"{w.ndim - 2}-D kernel"
            if layer is not None:
                reason = self._chosen(node.name, layer.macs)
            if reason is None:
                layers.append(layer)
            elif reason not in ("not in layers",):
                skipped.append({"layer": node.name, "reason": reason})
        return layers, skipped

    # ------------------------------------------------------------------ calibration
    def capture_inputs(self, model: Model, layers: list[FactorableLayer], ctx: PassContext) -> None:
        """Each layer's im2col rows (Gemm/MatMul: its input rows) at sampled output positions and, with
        ``data_aware``, the second moment and sum of its input features."""
        inputs = [layer.node.input[0] for layer in layers]
        for acts, per, rng in sampled_activations(model, inputs, ctx.calibration, self.samples, self.positions,
                                                  ctx.seed):
            for layer in layers:
                x = acts[layer.node.input[0]]
                if layer.kind == "matrix":
                    flat = x.reshape(-1, x.shape[-1])
                else:
                    flat = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
                if self.data_aware and layer.sigma_dim <= MAX_COVARIANCE_FEATURES:
                    f64 = flat.astype(np.float64)
                    layer.sigma = layer.sigma + f64.T @ f64
                    layer.total = layer.total + f64.sum(0)
                    layer.count += flat.shape[0]
                rows = layer_rows(layer.node, x, layer.y_shape, layer.w.shape, per, rng)
                if rows is not None:
                    layer.rows.append(rows)

    # ------------------------------------------------------------------ ranks and method
    def _round(self, r: float, full: int) -> int:
        return int(min(full, max(1, math.ceil(r / self.round_to) * self.round_to)))

    def _grid(self, full: int) -> list[int]:
        return sorted({min(full, k) for k in range(self.round_to, full + self.round_to, self.round_to)})

    def _plan(self, layer: FactorableLayer) -> dict | str:
        chol = inv = None
        data_aware = False
        var = None  # data-aware: the output's variance (the energy the ranks are measured against)
        if self.data_aware and layer.count and isinstance(layer.sigma, np.ndarray):
            chol, inv = whitening(layer.sigma / layer.count, self.ridge)
            data_aware = True
            mu = layer.total / layer.count
            if layer.kind == "conv":
                w64 = layer.w.astype(np.float64)
                mean_part = float((np.einsum("ocij,c->oij", w64, mu) ** 2).sum())
                var = float((np.einsum("ocij,cd->odij", w64, chol) ** 2).sum())
            else:
                wm64 = layer.wmat.astype(np.float64)
                mean_part = float(((wm64.T @ mu) ** 2).sum())
                var = float(((chol.T @ wm64) ** 2).sum())
            var = var - mean_part
        p = np.concatenate(layer.rows).astype(np.float64) if layer.rows else None
        y_ref = None
        if p is not None:
            y_ref = p @ layer.wmat.astype(np.float64)
            if layer.bias is not None and layer.bias.size == y_ref.shape[1]:
                y_ref = y_ref + layer.bias.reshape(-1)
        # errors are relative to the output's variation about its mean (a large mean would hide them)
        ref_norm = float(np.linalg.norm(y_ref - y_ref.mean(0))) if y_ref is not None else 0.0

        def error(w_hat_mat: np.ndarray) -> float | None:
            if p is None:
                return None
            return float(np.linalg.norm(p @ (layer.wmat - w_hat_mat)) / max(ref_norm, 1e-30))

        if self.criterion == "error" and p is None:
            return "no calibration rows for this layer"
        x, y = layer.x_shape, layer.y_shape
        options = []
        if self.method == "tt":
            if layer.kind != "matrix":
                return "method=tt applies to Gemm/MatMul only"
            options = self._tt_options(layer, error)
            if isinstance(options, str):
                return options
        elif layer.kind in ("matrix", "conv1x1"):
            svd = MatrixSVD(layer.wmat, inv, chol)
            f, o = layer.wmat.shape
            npos = layer.macs // (f * o)  # output rows (positions)

            def macs_svd(r):
                return npos * r * (f + o)

            r = self._choose([(k,) for k in self._grid(svd.full)], lambda k: macs_svd(k[0]),
                             lambda k: error(svd.approx(k[0])), (self._round(energy_rank(svd.s, self.energy, var), svd.full),),
                             layer.macs)
            options.append({"method": "svd", "ranks": r, "macs": macs_svd(r[0]),
                            "energy": kept_energy(svd.s, r[0], var), "fac": svd,
                            "w_hat": lambda r=r: svd.approx(r[0])})
        else:
            o, c, kh, kw = layer.w.shape
            n, _, h, wi = x
            ho, wo = y[2], y[3]
            if self.method in ("auto", "spatial") and kh > 1 and kw > 1:
                sp = SpatialSVD(layer.w, inv, chol)

                def macs_sp(r):
                    return n * r * c * kh * ho * wi + n * o * r * kw * ho * wo

                r = self._choose([(k,) for k in self._grid(sp.full)], lambda k: macs_sp(k[0]),
                                 lambda k: error(_conv_mat(sp.approx(k[0]))),
                                 (self._round(energy_rank(sp.s, self.energy, var), sp.full),), layer.macs)
                options.append({"method": "spatial", "ranks": r, "macs": macs_sp(r[0]),
                                "energy": kept_energy(sp.s, r[0], var), "fac": sp,
                                "w_hat": lambda r=r: _conv_mat(sp.approx(r[0]))})
            if self.method == "cp":
                options.append(self._cp_option(layer, inv, chol, var, error))
            if self.method in ("auto", "tucker"):
                tk = Tucker2(layer.w, inv, chol)
                f1, f2 = tk.full

                def macs_tk(r1, r2):
                    return n * r1 * c * h * wi + n * r2 * r1 * kh * kw * ho * wo + n * o * r2 * ho * wo

                grid = sorted({(self._round(t * f1, f1), self._round(t * f2, f2))
                               for t in np.linspace(1 / 32, 1, 32)})
                by_energy = (self._round(energy_rank(tk.s_in, self.energy, var), f1),
                             self._round(energy_rank(tk.s_out, self.energy, var), f2))
                r = self._choose(grid, lambda k: macs_tk(*k), lambda k: error(_conv_mat(tk.approx(*k))),
                                 by_energy, layer.macs)
                options.append({"method": "tucker", "ranks": r, "macs": macs_tk(*r),
                                "energy": min(kept_energy(tk.s_in, r[0], var), kept_energy(tk.s_out, r[1], var)),
                                "fac": tk, "w_hat": lambda r=r: _conv_mat(tk.approx(*r))})
            if not options:
                return f"method={self.method} does not apply to a {kh}×{kw} kernel"
        if self.criterion == "compression" and len(options) > 1:
            # both meet the MAC target: keep the more accurate one (measured, else in weight space)
            def err_of(opt):
                e = error(opt["w_hat"]())
                if e is None:
                    e = float(np.linalg.norm(layer.wmat - opt["w_hat"]()) / max(np.linalg.norm(layer.wmat), 1e-30))
                return e
            best = min(options, key=err_of)
        else:
            best = min(options, key=lambda opt: opt["macs"])
        if best["macs"] > layer.macs * (1 - self.min_saving) and not self.force:
            return (f"factoring would not cut MACs enough ({best['method']} ranks {list(best['ranks'])}: "
                    f"{layer.macs} → {best['macs']})")
        measured = error(best["w_hat"]())
        best["report"] = {
            "layer": layer.node.name, "op": layer.node.op_type, "method": best["method"],
            "rank": list(best["ranks"]) if len(best["ranks"]) > 1 else best["ranks"][0],
            "weight_shape": list(layer.w.shape), "energy_kept": round(best["energy"], 6),
            "data_aware": data_aware, "macs_before": int(layer.macs), "macs_after": int(best["macs"]),
            "error": None if measured is None else round(measured, 6),
        }
        if best["method"] == "tt":
            best["report"]["modes"] = [list(best["fac"].in_modes), list(best["fac"].out_modes)]
            best["report"]["data_aware"] = False  # a tensor train is fitted on the weight (its last core refit)
        return best

    # ------------------------------------------------------------------ CP and tensor train
    def _cp_option(self, layer: FactorableLayer, inv, chol, var: float | None, error) -> dict:
        """method=cp: the rank by the criterion (ALS fits only at the ranks the search visits)."""
        o, c, kh, kw = layer.w.shape
        n, _, h, wi = layer.x_shape
        ho, wo = layer.y_shape[2], layer.y_shape[3]
        cp = ConvCP(layer.w, inv, chol, iterations=self.als_iterations)

        def macs_cp(r):
            vertical = n * r * kh * ho * (wi if kw > 1 else wo) if kh > 1 else 0
            horizontal = n * r * kw * ho * wo if kw > 1 else 0
            return n * r * c * h * wi + vertical + horizontal + n * o * r * ho * wo

        grid = self._grid(cp.full)
        if not self.force:  # ranks that cannot cut MACs enough are never fitted (ALS at a high rank is slow)
            cheap = [g for g in grid if macs_cp(g) <= layer.macs * (1 - self.min_saving)]
            grid = cheap + [cp.full] if cheap and cheap[-1] != cp.full else cheap or [cp.full]
        total = var if var is not None and var > 0 else cp.norm2

        def kept(r):
            return 1.0 - cp.residual(r) / max(total, 1e-300)

        if self.criterion == "energy":
            if self.energy >= 1:
                by_energy = (cp.full,)
            else:  # the smallest grid rank keeping the energy (the fit improves with the rank)
                lo, hi = 0, len(grid) - 1
                while lo < hi:
                    mid = (lo + hi) // 2
                    if kept(grid[mid]) >= self.energy:
                        hi = mid
                    else:
                        lo = mid + 1
                by_energy = (grid[lo],)
        else:
            by_energy = (cp.full,)
        r = self._choose([(k,) for k in grid], lambda k: macs_cp(k[0]), lambda k: error(_conv_mat(cp.approx(k[0]))),
                         by_energy, layer.macs)
        return {"method": "cp", "ranks": r, "macs": macs_cp(r[0]), "energy": kept(r[0]), "fac": cp,
                "w_hat": lambda r=r: _conv_mat(cp.approx(r[0]))}

    def _tt_options(self, layer: FactorableLayer, error) -> list[dict] | str:
        """method=tt: for each of the most balanced mode splits of the weight, the ranks by the
        criterion (the caller keeps the cheapest, or the most accurate with criterion=compression)."""
        f, o = layer.wmat.shape
        rows = layer.macs // (f * o)
        bias_macs = rows * o if layer.bias is not None else 0  # the bias becomes an Add after the chain
        splits_in, splits_out = _balanced(mode_splits(f, self.tt_cores)), _balanced(mode_splits(o, self.tt_cores))
        if not splits_in or not splits_out:
            return (f"method=tt: a {f}×{o} weight cannot be split into tt_cores={self.tt_cores} modes of at least 2 "
                    f"on each side")
        norm2 = float((layer.wmat.astype(np.float64) ** 2).sum())
        options = []
        for modes_in in splits_in:
            for modes_out in splits_out:
                tt = MatrixTT(layer.wmat, modes_in, modes_out)

                def macs_tt(ranks, tt=tt):
                    return rows * tt.macs_per_row(ranks) + bias_macs

                # every rank a multiple of round_to with the others in proportion (two cores: every rank)
                grid = sorted({tuple(self._round(k * full / max(tt.full), full) for full in tt.full)
                               for k in self._grid(max(tt.full))})
                by_energy = tuple(self._round(r, full) for r, full in zip(tt.energy_ranks(self.energy), tt.full))
                r = self._choose(grid, macs_tt, lambda k, tt=tt: error(tt.approx(k)), by_energy, layer.macs)
                w_hat = tt.approx(r)
                options.append({"method": "tt", "ranks": r, "macs": macs_tt(r), "fac": tt,
                                "energy": 1.0 - float(((layer.wmat - w_hat) ** 2).sum()) / max(norm2, 1e-300),
                                "w_hat": lambda tt=tt, r=r: tt.approx(r)})
        if self.criterion == "compression":  # the splits that meet the MAC target, when any does
            options = [opt for opt in options if opt["macs"] <= layer.macs / self.compression] or options
        return options

    def _choose(self, grid: list[tuple], macs_fn, err_fn, by_energy: tuple, layer_macs: int) -> tuple:
        """Ranks by the criterion: by_energy as given; compression: the largest grid point within the
        MAC target; error: the smallest grid point within max_error (bisection; error falls with rank)."""
        if self.criterion == "energy":
            return by_energy
        if self.criterion == "compression":
            target = layer_macs / self.compression
            ok = [g for g in grid if macs_fn(g) <= target]
            return ok[-1] if ok else grid[0]
        lo, hi = 0, len(grid) - 1
        if err_fn(grid[hi]) > self.max_error:
            return grid[hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if err_fn(grid[mid]) <= self.max_error:
                hi = mid
            else:
                lo = mid + 1
        return grid[lo]

    # ------------------------------------------------------------------ graph edit
    def build_replacement(self, model: Model, layer: FactorableLayer, params: dict,
                          names: NameAllocator) -> list[onnx.NodeProto]:
        plan = params
        node, fac, ranks = layer.node, plan["fac"], plan["ranks"]
        dtype = layer.w.dtype
        x, out = node.input[0], node.output[0]
        base = node.name

        fresh = names.fresh

        def init(suffix, value):
            return names.initializer(f"{base}_{suffix}", value, dtype)

        def tensor(suffix):
            return fresh(f"{out}_{suffix}")

        def nname(suffix):
            return fresh(f"{base}_{suffix}")

        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        if plan["method"] == "tt":
            return self._build_tt(layer, fac, ranks, init, tensor, nname, bias, names)
        if layer.kind == "matrix":
            a, b = fac.factors(ranks[0])
            t = tensor("lr")
            first = helper.make_node("MatMul", [x, init("lr_a", a)], [t], name=nname("lr_a"))
            if node.op_type == "Gemm" and bias:
                second = helper.make_node("Gemm", [t, init("lr_b", b)] + bias, [out], name=nname("lr_b"),
                                          beta=float(attr(node, "beta", 1.0)))
            else:
                second = helper.make_node("MatMul", [t, init("lr_b", b)], [out], name=nname("lr_b"))
            return [first, second]
        strides = list(attr(node, "strides") or [1] * (layer.w.ndim - 2))
        dil = list(attr(node, "dilations") or [1] * (layer.w.ndim - 2))
        pads = list(attr(node, "pads") or [0] * (2 * (layer.w.ndim - 2)))
        if layer.kind == "conv1x1":
            a, b = fac.factors(ranks[0])
            nd = layer.w.ndim - 2
            one = [1] * nd
            t = tensor("lr")
            w1 = a.T.reshape((a.shape[1], a.shape[0]) + (1,) * nd)
            w2 = b.T.reshape((b.shape[1], b.shape[0]) + (1,) * nd)
            first = helper.make_node("Conv", [x, init("lr_a", w1)], [t], name=nname("lr_a"), kernel_shape=one,
                                     strides=strides, pads=pads, dilations=dil)
            second = helper.make_node("Conv", [t, init("lr_b", w2)] + bias, [out], name=nname("lr_b"),
                                      kernel_shape=one)
            return [first, second]
        o, c, kh, kw = layer.w.shape
        if plan["method"] == "cp":
            p, v, h, u = fac.factors(ranks[0])
            r = p.shape[0]
            if kh == 1:  # a 1×k kernel: the k×1 factor is one scale per channel, folded into the first 1×1
                p = p * v.reshape(r, 1, 1, 1)
            if kw == 1:
                p = p * h.reshape(r, 1, 1, 1)
            t = tensor("cp_in")
            chain = [helper.make_node("Conv", [x, init("cp_in", p)], [t], name=nname("cp_in"), kernel_shape=[1, 1])]
            if kh > 1:
                # with a k×1 kernel this is the only spatial Conv: it takes the whole geometry
                geometry = (dict(strides=[strides[0], 1], pads=[pads[0], 0, pads[2], 0], dilations=[dil[0], 1])
                            if kw > 1 else dict(strides=strides, pads=pads, dilations=dil))
                t_next = tensor("cp_v")
                chain.append(helper.make_node("Conv", [t, init("cp_v", v)], [t_next], name=nname("cp_v"),
                                              kernel_shape=[kh, 1], group=r, **geometry))
                t = t_next
            if kw > 1:
                geometry = (dict(strides=[1, strides[1]], pads=[0, pads[1], 0, pads[3]], dilations=[1, dil[1]])
                            if kh > 1 else dict(strides=strides, pads=pads, dilations=dil))
                t_next = tensor("cp_h")
                chain.append(helper.make_node("Conv", [t, init("cp_h", h)], [t_next], name=nname("cp_h"),
                                              kernel_shape=[1, kw], group=r, **geometry))
                t = t_next
            chain.append(helper.make_node("Conv", [t, init("cp_out", u)] + bias, [out], name=nname("cp_out"),
                                          kernel_shape=[1, 1]))
            return chain
        if plan["method"] == "spatial":
            v, h = fac.factors(ranks[0])
            t = tensor("lr_v")
            first = helper.make_node("Conv", [x, init("lr_v", v)], [t], name=nname("lr_v"), kernel_shape=[kh, 1],
                                     strides=[strides[0], 1], pads=[pads[0], 0, pads[2], 0], dilations=[dil[0], 1])
            second = helper.make_node("Conv", [t, init("lr_h", h)] + bias, [out], name=nname("lr_h"),
                                      kernel_shape=[1, kw], strides=[1, strides[1]], pads=[0, pads[1], 0, pads[3]],
                                      dilations=[1, dil[1]])
            return [first, second]
        p_in, core, u_out = fac.factors(*ranks)
        t1, t2 = tensor("lr_in"), tensor("lr_core")
        first = helper.make_node("Conv", [x, init("lr_in", p_in)], [t1], name=nname("lr_in"), kernel_shape=[1, 1])
        mid = helper.make_node("Conv", [t1, init("lr_core", core)], [t2], name=nname("lr_core"),
                               kernel_shape=[kh, kw], strides=strides, pads=pads, dilations=dil)
        last = helper.make_node("Conv", [t2, init("lr_out", u_out)] + bias, [out], name=nname("lr_out"),
                                kernel_shape=[1, 1])
        return [first, mid, last]

    def _build_tt(self, layer: FactorableLayer, tt: MatrixTT, ranks: tuple, init, tensor, nname, bias: list[str],
                  names: NameAllocator) -> list[onnx.NodeProto]:
        """The chain of a tensor-train layer, cores applied from the last (no Transpose):
        x → Reshape [−1, i_d] → MatMul G_d [i_d, r_{d-1}·o_d], then for k = d−1 … 1:
        Reshape [−1, i_k·r_k, o_{k+1}⋯o_d] → MatMul(G_k [r_{k-1}·o_k, i_k·r_k], ·) (the core on the left),
        and a Reshape to the layer's output shape (then the Gemm's bias, an Add)."""
        node, out = layer.node, layer.node.output[0]
        cores = tt.cores(ranks)
        d = len(cores)
        modes_in, modes_out = tt.in_modes, tt.out_modes

        def shape(suffix, dims):
            return names.initializer(f"{node.name}_{suffix}", np.asarray(dims, dtype=np.int64), np.int64)

        chain = []
        t = tensor("tt_in")
        chain.append(helper.make_node("Reshape", [node.input[0], shape("tt_shape", [-1, modes_in[-1]])], [t],
                                      name=nname("tt_reshape")))
        g = cores[-1]  # [r, i, o, 1]
        last_mat = g[..., 0].transpose(1, 0, 2).reshape(g.shape[1], -1)
        t_next = tensor(f"tt_core{d}")
        chain.append(helper.make_node("MatMul", [t, init(f"tt_core{d}", last_mat)], [t_next],
                                      name=nname(f"tt_core{d}")))
        t = t_next
        for k in range(d - 2, -1, -1):
            g = cores[k]  # [r_k, i_k, o_k, r_{k+1}]
            after = int(np.prod(modes_out[k + 1:]))
            t_shaped = tensor(f"tt_core{k + 1}_in")
            dims = [-1, g.shape[1] * g.shape[3], after]
            chain.append(helper.make_node("Reshape", [t, shape(f"tt_shape{k + 1}", dims)], [t_shaped],
                                          name=nname(f"tt_reshape{k + 1}")))
            mat = g.transpose(0, 2, 1, 3).reshape(g.shape[0] * g.shape[2], g.shape[1] * g.shape[3])
            t_next = tensor(f"tt_core{k + 1}")
            chain.append(helper.make_node("MatMul", [init(f"tt_core{k + 1}", mat), t_shaped], [t_next],
                                          name=nname(f"tt_core{k + 1}")))
            t = t_next
        refit_node = chain[-1].name
        final = tensor("tt_out") if layer.bias is not None else out
        chain.append(helper.make_node("Reshape", [t, shape("tt_out_shape", list(layer.y_shape))], [final],
                                      name=nname("tt_out")))
        if layer.bias is not None:
            beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
            b = bias[0] if beta == 1.0 else init("tt_bias", layer.bias)
            chain.append(helper.make_node("Add", [final, b], [out], name=nname("tt_bias")))
        self._tt_chains.append({"node": refit_node, "output": out, "bias": layer.bias})
        return chain

    def refit_jobs(self, layer, params, nodes):
        if params["method"] == "tt":  # the last core is refit by _refit_tt_cores (its rows are not the output's)
            return []
        return super().refit_jobs(layer, params, nodes)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        self._tt_chains = []
        original = model.clone() if self.method == "tt" and self.refit_wanted(ctx) else None
        result = super().run(model, ctx)
        if original is not None and self._tt_chains:
            data = [s for _, s in zip(range(self.refit_samples), ctx.calibration)]
            result.stats["refit"] = _refit_tt_cores(original, result.model, self._tt_chains, data,
                                                    positions=self.positions)
        self._tt_chains = []
        return result


def _refit_tt_cores(original: Model, model: Model, chains: list[dict], samples: list[dict], *, positions: int,
                    ridge: float = 1e-3, holdout: float = 0.25) -> dict:
    """Ridge refit of each tensor train's last-applied core (the MatMul G_1 [o_1, i_1·r_1] @ T with T
    [N, i_1·r_1, o_2⋯o_d]), in network order, on what it receives in the compressed model (after the
    trains before it were refit) towards the original layer's output less its bias: one row per
    (n, o_2⋯o_d) position, o_1 targets. The same rules as the other methods' refit: a quarter of the
    samples held out first (a refit that does not lower the error there is refused), never worse on
    the calibration rows, and the report in the same form."""
    report: dict = {"layers": 0, "skipped": []}
    if not samples:
        return report
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    chains = sorted(chains, key=lambda c: order[c["node"]])
    targets = {c["output"]: [] for c in chains}
    for acts in iter_activations(original, list(targets), samples):
        for name in targets:
            targets[name].append(acts[name])
    rng = np.random.default_rng(1)
    stream = LayerInputStream(model, samples)
    for chain in chains:
        node = model.node_by_name(chain["node"])
        g = model.get_constant(node.input[0])  # [o_1, i_1·r_1]
        o1, feats = g.shape
        rows, outs = [], []
        for k, t in enumerate(stream.inputs(order[node.name], node.input[1])):
            p = np.swapaxes(t, 1, 2).reshape(-1, feats)  # [(n, o_2⋯o_d), i_1·r_1]
            y = targets[chain["output"]][k]
            if chain["bias"] is not None:
                y = y - chain["bias"]
            y = np.swapaxes(y.reshape(t.shape[0], o1, -1), 1, 2).reshape(-1, o1)
            pos = pick_positions(p.shape[0], max(16, positions // len(samples)), rng)
            rows.append(p[pos])
            outs.append(y[pos])
        fitted = guarded_refit(rows, np.concatenate(outs), g.T.astype(np.float64), None, None, ridge, holdout,
                               report, node.name)
        if fitted is None:
            continue
        new_w, _, before, after = fitted
        model.replace_constant_input(node, 0, new_w.T.astype(g.dtype), suffix="refit")
        report["layers"] += 1
        report.setdefault("errors", {})[node.name] = {"before": float(np.sqrt(before)), "after": float(np.sqrt(after))}
    return report


def _balanced(splits: list[tuple[int, ...]], keep: int = 4) -> list[tuple[int, ...]]:
    """The ``keep`` most balanced mode splits (smallest largest/smallest factor ratio)."""
    return sorted(splits, key=lambda m: (max(m) / min(m), m))[:keep]


def _conv_mat(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1).T
