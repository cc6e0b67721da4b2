"""low-rank: factor Gemm/MatMul/Conv weights into cheaper products (truncated SVD, spatial SVD, Tucker-2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper

from sculpt.ir.channel_handlers import attr
from sculpt.ir.factorize import MatrixSVD, SpatialSVD, Tucker2, energy_rank, kept_energy, whitening
from sculpt.ir.model import Model
from sculpt.ir.refit import layer_rows
from sculpt.ir.substitution import CandidateLayer, NameAllocator, conv_unsupported, name_selected
from sculpt.passes.base import PassContext, check_range, option, register
from sculpt.passes.layer_substitution import FittedReplacement, LayerSubstitutionPass
from sculpt.runtime import sampled_activations

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

    Ranks: by ``criterion`` — ``energy`` (the smallest rank keeping that fraction of the squared
    singular values; with ``data_aware`` those are the layer's output energy on calibration data),
    ``compression`` (the largest rank whose factored layer has at most 1/``compression`` of the
    MACs), or ``error`` (the smallest rank whose relative output error on calibration data is at most
    ``max_error``). Ranks are rounded up to a multiple of ``round_to``. ``data_aware`` weights the
    factorization by the input activations' second-moment matrix Σ = E[x xᵀ] (features of a Gemm,
    channels of a Conv): the weight is factored in the coordinates where the input is white, which
    minimises the output error E‖x(W − Ŵ)‖² exactly for Gemm/MatMul/1×1 Conv (and per position,
    ignoring spatial correlation, for k×k). A layer is left alone when factoring would not save at
    least ``min_saving`` of its MACs (unless ``force``). At full rank every factorization is exact.
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
    method: Literal["auto", "spatial", "tucker"] = option(
        "auto", help="k×k Conv: spatial SVD, Tucker-2, or auto (the one with fewer MACs)")
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
        if layer.kind in ("matrix", "conv1x1"):
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
        return best

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


def _conv_mat(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1).T
