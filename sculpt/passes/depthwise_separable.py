"""depthwise-separable: a standard k×k Conv → depthwise k×k Conv + pointwise 1×1 Conv, fitted on calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper

from sculpt.ir.channel_handlers import attr
from sculpt.ir.model import Model
from sculpt.ir.substitution import CandidateLayer, NameAllocator, patch_moments, rel_error, ridge_solve
from sculpt.passes.base import option, register
from sculpt.passes.layer_substitution import ConvSubstitutionPass, FittedReplacement

# above this many depthwise weights (C·m·kh·kw) the depthwise step of the alternation is not solved
# jointly (its normal equations are that square); the pointwise step still is
MAX_JOINT = 6000


@register
@dataclass
class DepthwiseSeparable(ConvSubstitutionPass):
    """Replace a standard k×k Conv (2-D, group 1) by a depthwise k×k Conv (``multiplier`` filters
    per input channel, MobileNet-style) followed by a pointwise 1×1 Conv, with no training.

    The replacement computes Ŵ[o, c] = Σₜ P[o, c·m+t] · D[c·m+t] (a rank-``multiplier`` product per
    input channel). Fitting method: minimise the layer's output error on calibration data,
    E‖(W − Ŵ) p‖² over the im2col patches p its input really produces, by **alternating least
    squares**. It starts from the per-channel truncated SVD of W (the optimum when the input is
    white, and exact when ``multiplier`` ≥ min(O, kh·kw)); then, in turn, the pointwise weights
    P given D and the depthwise filters D given P each solve a linear least-squares problem in
    closed form (ridge-regularised normal equations built from the patch second moment
    Σp = E[p pᵀ] alone), so the calibration error never increases and each step is exact rather
    than a gradient step. Why not gradient descent: the problem is bilinear and small per layer, so
    closed-form alternation converges in a few steps with no learning rate and no training loop;
    why not the SVD alone: it treats every input direction as equally likely, while real
    activations are strongly correlated across channels and space. ``fit=weights`` uses the SVD
    only (Σp = I, no calibration needed). The last step is always a pointwise fit. The bias stays
    on the pointwise Conv; the output keeps its name. ``refit`` (fit=data): once every layer is
    replaced, each pointwise Conv is refit, in network order, on the inputs the compressed model
    really gives it (errors of earlier replacements do not compound). Lossy."""

    name = "depthwise-separable"
    exact = False
    needs_static_shapes = True

    multiplier: int = option(1, help="depthwise filters per input channel (channel multiplier)")
    fit: Literal["data", "weights"] = option("data", help="data: alternating least squares on calibration "
                                                          "patches; weights: per-channel SVD only")
    iterations: int = option(4, help="alternating least-squares rounds (fit=data)")
    refit: bool = option(True, help="fit=data: after all replacements, refit each pointwise Conv in order on the "
                                    "compressed model's own inputs (errors do not compound)")

    def __post_init__(self):
        super().__post_init__()
        if self.multiplier < 1 or self.iterations < 0:
            raise ValueError("multiplier must be ≥ 1, iterations ≥ 0")

    def fit_replacement(self, layer: CandidateLayer) -> FittedReplacement | str:
        o, c, kh, kw = layer.w.shape
        m = self.multiplier
        n, _, ho, wo = layer.y_shape
        macs_after = n * ho * wo * c * m * (kh * kw + o)
        reason = self.macs_not_cut_enough(layer, macs_after)
        if reason:
            return reason
        d, p, info = self._fit_factors(layer)
        reason = self.error_too_large(info["error"])
        if reason:
            return reason
        return FittedReplacement((d, p), {"layer": layer.node.name, "weight_shape": [o, c, kh, kw], "multiplier": m,
                                          "depthwise_shape": [c * m, 1, kh, kw], "pointwise_shape": [o, c * m, 1, 1],
                                          "macs_before": int(layer.macs), "macs_after": int(macs_after), **info})

    # ------------------------------------------------------------------ fitting
    def _fit_factors(self, layer: CandidateLayer) -> tuple[np.ndarray, np.ndarray, dict]:
        """Depthwise filters D [C, m, K] and pointwise weights P [C·m, O] (K = kh·kw)."""
        w = layer.w.astype(np.float64)
        o, c, kh, kw = w.shape
        k, m = kh * kw, self.multiplier
        wmat = w.reshape(o, -1).T  # [C·K, O]
        d = np.zeros((c, m, k))
        p = np.zeros((c, m, o))
        for ch in range(c):
            u, s, vt = np.linalg.svd(w[:, ch].reshape(o, k), full_matrices=False)
            r = min(m, len(s))
            sq = np.sqrt(s[:r])
            d[ch, :r] = sq[:, None] * vt[:r]
            p[ch, :r] = (u[:, :r] * sq).T
            if r < m:  # more filters than the kernel has directions: spare ones start as other taps
                d[ch, r:] = np.eye(k)[np.arange(r, m) % k]
        info: dict[str, Any] = {"fit": "weights", "error_svd": None, "error": None}
        if not layer.rows:
            return d, p.reshape(c * m, o), info

        sigma, y2 = patch_moments(layer)

        def approx(d, p):
            return np.einsum("ctk,cto->cko", d, p.reshape(c, m, o)).reshape(c * k, o)

        svd_error = rel_error(sigma, y2, wmat - approx(d, p))
        info["error_svd"] = round(svd_error, 6)
        svd_start = d.copy(), p.copy()
        if self.fit == "data":
            info["fit"] = "als"
            s4 = sigma.reshape(c, k, c, k)
            cross = (sigma @ wmat).reshape(c, k, o)  # E[p yᵀ] without the bias
            for it in range(self.iterations + 1):
                # pointwise step: features z = Dᵀ p (block diagonal D), target W p
                dmat = np.zeros((c, k, c, m))
                dmat[np.arange(c), :, np.arange(c), :] = d.transpose(0, 2, 1)
                dmat = dmat.reshape(c * k, c * m)
                p = ridge_solve(dmat.T @ sigma @ dmat, dmat.T @ sigma @ wmat, self.ridge)  # [C·m, O]
                if it == self.iterations or c * m * k > MAX_JOINT:
                    break
                # depthwise step: G[(c,t,k),(c',t',k')] = (P Pᵀ)[(c,t),(c',t')] Σp[(c,k),(c',k')]
                pp = (p @ p.T).reshape(c, m, c, m)
                g = np.einsum("atbu,akbl->atkbul", pp, s4).reshape(c * m * k, c * m * k)
                rhs = np.einsum("cko,cto->ctk", cross, p.reshape(c, m, o)).reshape(-1)
                d = ridge_solve(g, rhs, self.ridge * 1e-2).reshape(c, m, k)
                d /= np.maximum(np.linalg.norm(d, axis=2, keepdims=True), 1e-12)
            info["iterations"] = self.iterations
            if rel_error(sigma, y2, wmat - approx(d, p.reshape(c, m, o))) > svd_error:
                # the ridge-damped alternation can end a hair above an already near-exact start (a
                # channel-separable kernel): keep the start, the fit is never worse than the SVD
                d, p = svd_start
                info["fit"] = "svd (als did not improve it)"
        info["error"] = round(rel_error(sigma, y2, wmat - approx(d, p.reshape(c, m, o))), 6)
        return d, p.reshape(c * m, o) if p.ndim == 3 else p, info

    # ------------------------------------------------------------------ graph edit
    def build_replacement(self, model: Model, layer: CandidateLayer, params: tuple[np.ndarray, np.ndarray],
                          names: NameAllocator) -> list[onnx.NodeProto]:
        d, p = params
        node = layer.node
        o, c, kh, kw = layer.w.shape
        m = self.multiplier
        dtype = layer.w.dtype
        w_dw = names.initializer(f"{node.name}_dw_weight", d.reshape(c * m, 1, kh, kw), dtype)
        w_pw = names.initializer(f"{node.name}_pw_weight", p.reshape(c * m, o).T.reshape(o, c * m, 1, 1), dtype)
        mid = names.fresh(f"{node.output[0]}_dw")
        kwargs = {"strides": list(attr(node, "strides") or [1, 1]), "pads": list(attr(node, "pads") or [0, 0, 0, 0]),
                  "dilations": list(attr(node, "dilations") or [1, 1])}
        dw = helper.make_node("Conv", [node.input[0], w_dw], [mid], name=names.fresh(f"{node.name}_dw"), group=c,
                              kernel_shape=[kh, kw], **kwargs)
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        pw = helper.make_node("Conv", [mid, w_pw] + bias, [node.output[0]], name=names.fresh(f"{node.name}_pw"),
                              kernel_shape=[1, 1])
        return [dw, pw]
