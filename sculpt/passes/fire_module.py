"""fire-module: a k×k Conv → squeeze 1×1, then expand 1×1 ‖ expand k×k, concatenated (SqueezeNet's fire module)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper

from sculpt.ir.channel_handlers import attr
from sculpt.ir.factorize import Tucker2, whitening
from sculpt.ir.model import Model
from sculpt.ir.refit import RefitJob
from sculpt.ir.substitution import CandidateLayer, NameAllocator, patch_moments, rel_error, ridge_solve
from sculpt.passes.base import option, register
from sculpt.passes.layer_substitution import ConvSubstitutionPass, FittedReplacement


@register
@dataclass
class FireModule(ConvSubstitutionPass):
    """Replace a k×k Conv (2-D, group 1, odd kernel, "same" symmetric padding so that a 1×1 branch
    lines up with the kernel's centre) by SqueezeNet's fire module, with no activation in between
    (the replacement stays linear, so it can be fitted to the linear layer it replaces):

        x → squeeze 1×1 (S channels) → [expand 1×1 (E1 channels) ‖ expand k×k (E3 channels)] → Concat

    S = ``squeeze_ratio``·O and E1 = ``expand_split``·O (rounded to ``round_to``), E3 = O − E1. The
    E1 output channels whose kernels are best represented by their centre tap alone go to the 1×1
    branch; when that is not the first E1 channels, a Gather on the channel axis restores the original
    order (``assign=first`` takes the first E1 channels and needs no Gather).

    Fitting (same method as depthwise-separable, on the im2col patches of calibration data): the
    squeeze is the data-aware Tucker-2 input factor (the leading S directions of the weight in the
    coordinates where the input channels are white), then both expand layers are solved by ridge
    least squares for the smallest output error E‖(W − Ŵ) p‖², in closed form from the patch
    second moment. ``fit=weights`` uses Σp = I (no calibration). The bias is split between the
    branches; the output keeps its name. ``refit`` (fit=data): once every layer is replaced, both
    expand Convs are refit, in network order, on the inputs the compressed model really gives them
    (errors of earlier replacements do not compound). Lossy."""

    name = "fire-module"
    exact = False
    needs_static_shapes = True

    squeeze_ratio: float = option(0.25, help="squeeze channels as a fraction of the output channels")
    expand_split: float = option(0.5, help="fraction of the output channels computed by the 1×1 expand")
    assign: Literal["center", "first"] = option("center", help="which output channels the 1×1 expand computes")
    round_to: int = option(8, help="squeeze and expand-1×1 channel counts rounded to a multiple")
    fit: Literal["data", "weights"] = option("data", help="data: least squares on calibration patches; weights: Σp = I")
    refit: bool = option(True, help="fit=data: after all replacements, refit both expand Convs in order on the "
                                    "compressed model's own inputs (errors do not compound)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.squeeze_ratio <= 4:
            raise ValueError(f"squeeze_ratio must be in (0, 4], got {self.squeeze_ratio}")
        if not 0 < self.expand_split < 1:
            raise ValueError(f"expand_split must be in (0, 1), got {self.expand_split}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be ≥ 1, got {self.round_to}")

    def _shape_reason(self, node, w) -> str | None:
        o, c, kh, kw = w.shape
        if kh % 2 == 0 or kw % 2 == 0:
            return "even kernel: no centre tap"
        if o < 2:
            return "fewer than 2 output channels"
        d = list(attr(node, "dilations") or [1, 1])
        pads = list(attr(node, "pads") or [0, 0, 0, 0])
        same = [d[0] * (kh - 1) // 2, d[1] * (kw - 1) // 2]
        if pads != same + same:
            return f"pads {pads} are not 'same' {same + same}: a 1×1 branch would not line up"
        return None

    def select_layers(self, model: Model) -> tuple[list[CandidateLayer], list[dict]]:
        layers, skipped = super().select_layers(model)
        ok = []
        for layer in layers:
            reason = self._shape_reason(layer.node, layer.w)
            if reason:
                skipped.append({"layer": layer.node.name, "reason": reason})
            else:
                ok.append(layer)
        return ok, skipped

    def fit_replacement(self, layer: CandidateLayer) -> FittedReplacement | str:
        o, c, kh, kw = layer.w.shape
        s = self._rounded(self.squeeze_ratio * o, cap=c)
        e1 = min(o - 1, max(1, self._rounded(self.expand_split * o, cap=o - 1)))
        e3 = o - e1
        n, _, h, wi = layer.x_shape
        ho, wo = layer.y_shape[2:]
        macs_after = n * (s * c * h * wi + e1 * s * ho * wo + e3 * s * kh * kw * ho * wo)
        reason = self.macs_not_cut_enough(layer, macs_after)
        if reason:
            return reason
        fitted = self._fit_branches(layer, s, e1)
        reason = self.error_too_large(fitted["error"])
        if reason:
            return reason
        return FittedReplacement(fitted, {
            "layer": layer.node.name, "weight_shape": [o, c, kh, kw], "squeeze": s, "expand1x1": e1,
            "expand_kxk": e3, "reordered": fitted["gather"] is not None,
            "macs_before": int(layer.macs), "macs_after": int(macs_after),
            "fit": "data" if self.fit == "data" and layer.rows else "weights", "error": fitted["error"]})

    def refit_jobs(self, layer: CandidateLayer, params: dict, nodes: list[onnx.NodeProto]) -> list[RefitJob]:
        """Both expand Convs, each towards its own channels of the layer's output."""
        out = layer.node.output[0]
        return [RefitJob(nodes[1].name, out, tuple(int(i) for i in params["idx1"])),
                RefitJob(nodes[2].name, out, tuple(int(i) for i in params["idx3"]))]

    def _rounded(self, x: float, cap: int | None) -> int:
        r = max(self.round_to, int(math.ceil(x / self.round_to) * self.round_to))
        return r if cap is None else min(cap, r)

    # ------------------------------------------------------------------ fitting
    def _fit_branches(self, layer: CandidateLayer, s: int, e1: int) -> dict:
        """The squeeze weights, both expand weights, which output channels each expand computes, the
        Gather order restoring the original one (None if it needs none) and the fitted error."""
        w = layer.w.astype(np.float64)
        o, c, kh, kw = w.shape
        k = kh * kw
        centre = (kh // 2) * kw + kw // 2
        wmat = w.reshape(o, -1).T  # [C·K, O]
        measure, y2 = patch_moments(layer) if layer.rows else (None, None)
        data = self.fit == "data" and measure is not None
        sigma = measure if data else np.eye(c * k)
        cidx = np.arange(c) * k + centre  # rows of the centre taps in im2col order
        # squeeze: data-aware Tucker-2 input factor (channel covariance at the centre tap)
        if data:
            chol, inv = whitening(sigma[np.ix_(cidx, cidx)])
            sq = Tucker2(w, inv, chol).factors(min(s, c), 1)[0][:, :, 0, 0]  # [min(S, C), C]
        else:
            sq = Tucker2(w).factors(min(s, c), 1)[0][:, :, 0, 0]
        s = sq.shape[0]
        # which output channels the 1×1 branch computes: the best fitted by their centre tap alone
        if self.assign == "first":
            idx1 = np.arange(e1)
        else:
            sc = sigma[np.ix_(cidx, cidx)]
            fit_c = ridge_solve(sc, sigma[cidx] @ wmat, 1e-9)  # [C, O] best centre-only weights
            delta = wmat.copy()
            delta[cidx] -= fit_c
            resid = ((sigma @ delta) * delta).sum(axis=0)  # per output: δᵀ Σp δ
            total = ((sigma @ wmat) * wmat).sum(axis=0)
            idx1 = np.sort(np.argsort(resid / np.maximum(total, 1e-30), kind="stable")[:e1])
        idx3 = np.setdiff1d(np.arange(o), idx1)
        # expand 1×1: features Sq·p_centre
        q1 = np.zeros((c * k, s))
        q1[cidx] = sq.T
        ex1 = ridge_solve(q1.T @ sigma @ q1, q1.T @ sigma @ wmat[:, idx1], self.ridge)  # [S, E1]
        # expand k×k: features (Sq ⊗ I_K) p
        q3 = np.einsum("sc,kl->cksl", sq, np.eye(k)).reshape(c * k, s * k)
        ex3 = ridge_solve(q3.T @ sigma @ q3, q3.T @ sigma @ wmat[:, idx3], self.ridge)  # [S·K, E3]
        approx = np.zeros_like(wmat)
        approx[:, idx1] = q1 @ ex1
        approx[:, idx3] = q3 @ ex3
        perm = np.concatenate([idx1, idx3])
        gather = None if np.array_equal(perm, np.arange(o)) else np.argsort(perm)
        err = round(rel_error(measure, y2, wmat - approx), 6) if measure is not None else None
        return {"squeeze": sq, "ex1": ex1.T.reshape(e1, s, 1, 1), "ex3": ex3.T.reshape(o - e1, s, kh, kw),
                "idx1": idx1, "idx3": idx3, "gather": gather, "error": err}

    # ------------------------------------------------------------------ graph edit
    def build_replacement(self, model: Model, layer: CandidateLayer, params: dict,
                          names: NameAllocator) -> list[onnx.NodeProto]:
        f = params
        node = layer.node
        dtype = layer.w.dtype
        out = node.output[0]
        o, c, kh, kw = layer.w.shape

        def init(prefix, value):
            return names.initializer(f"{node.name}_{prefix}", value, dtype)

        fresh = names.fresh
        bias = layer.bias.reshape(-1) if layer.bias is not None else None
        b1 = [init("expand1_bias", bias[f["idx1"]])] if bias is not None else []
        b3 = [init("expand3_bias", bias[f["idx3"]])] if bias is not None else []
        strides = list(attr(node, "strides") or [1, 1])
        sq_out, e1_out, e3_out = fresh(f"{out}_squeeze"), fresh(f"{out}_expand1"), fresh(f"{out}_expand3")
        cat_out = fresh(f"{out}_fire") if f["gather"] is not None else out
        nodes = [
            helper.make_node("Conv", [node.input[0], init("squeeze_weight", f["squeeze"][:, :, None, None])], [sq_out],
                             name=fresh(f"{node.name}_squeeze"), kernel_shape=[1, 1]),
            helper.make_node("Conv", [sq_out, init("expand1_weight", f["ex1"])] + b1, [e1_out],
                             name=fresh(f"{node.name}_expand1"), kernel_shape=[1, 1], strides=strides),
            helper.make_node("Conv", [sq_out, init("expand3_weight", f["ex3"])] + b3, [e3_out],
                             name=fresh(f"{node.name}_expand3"), kernel_shape=[kh, kw], strides=strides,
                             pads=list(attr(node, "pads") or [0, 0, 0, 0]),
                             dilations=list(attr(node, "dilations") or [1, 1])),
            helper.make_node("Concat", [e1_out, e3_out], [cat_out], name=fresh(f"{node.name}_concat"), axis=1),
        ]
        if f["gather"] is not None:
            order = fresh(f"{node.name}_order")
            model.set_initializer(order, f["gather"].astype(np.int64))
            nodes.append(helper.make_node("Gather", [cat_out, order], [out], name=fresh(f"{node.name}_reorder"), axis=1))
        return nodes
