"""group-shuffle: a standard k×k Conv → grouped k×k Conv (+ channel shuffle) + pointwise 1×1 Conv, fitted on calibration data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper
from scipy.linalg import solve_triangular

from sculpt.errors import PassError
from sculpt.ir.channel_handlers import attr
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.ir.refit import RefitJob
from sculpt.ir.substitution import CandidateLayer, NameAllocator, patch_moments, rel_error, ridge_solve
from sculpt.passes.base import PassContext, PassResult, option, register
from sculpt.passes.layer_substitution import ConvSubstitutionPass, FittedReplacement


@dataclass
class GroupShuffleShape:
    """The replacement's sizes for one layer: ``groups`` input groups of ``c // groups`` channels,
    ``mid`` channels between the grouped and the pointwise Conv, ``pointwise_groups`` output
    groups; each (input group, output group) pair is a rank-``rank`` block of the weight."""

    groups: int
    pointwise_groups: int
    mid: int

    @property
    def rank(self) -> int:
        return self.mid // (self.groups * self.pointwise_groups)

    def mid_channel(self, group: int, out_group: int, s: int) -> int:
        """Output channel of the grouped Conv for rank component ``s`` of block (group, out_group)."""
        return group * (self.mid // self.groups) + out_group * self.rank + s

    def pointwise_input(self, group: int, s: int) -> int:
        """Input channel, inside its pointwise group, that the shuffle brings the grouped Conv's
        ``mid_channel(group, q, s)`` to (ShuffleNet: channel (group, t) goes to t·groups + group)."""
        return s * self.groups + group


@register
@dataclass
class GroupShuffle(ConvSubstitutionPass):
    """Replace a standard k×k Conv (2-D, group 1) by a grouped k×k Conv (``groups`` groups, each
    seeing C/groups input channels), a channel shuffle and a pointwise 1×1 Conv (ShuffleNet's
    building blocks), fitted on calibration data with no training. Lossy.

    The replacement:

        x → Conv k×k, group=groups (M channels) → [Reshape → Transpose → Reshape] → Conv 1×1, group=pointwise_groups

    M = ``width``·min(C, O), rounded up to a multiple of groups·pointwise_groups (and no larger than
    what represents the layer exactly): the narrower side, so that neither a wide input (C ≫ O)
    nor a wide output (O ≫ C, where the pointwise Conv is the costly part) makes the replacement
    cost more than the layer. MACs per output position: M·(C/groups)·kh·kw + O·M/pointwise_groups
    instead of O·C·kh·kw.

    What it can represent: input group j and output group q meet only through the M/(groups·
    pointwise_groups) grouped-Conv channels of j that the shuffle sends to q, so the weight's block
    W[q outputs, j inputs] becomes a rank-r product with r = M/(groups·pointwise_groups). With a
    plain pointwise Conv (``pointwise_groups=1``, the default: at equal MACs it keeps twice the rank
    per block, and the pointwise Conv is the cheap part) the shuffle is a permutation of the
    pointwise Conv's input channels, so it is folded into its weights and no shuffle node is
    emitted; with ``pointwise_groups`` > 1 the Reshape → Transpose → Reshape shuffle is what lets
    every pointwise group see every grouped Conv's outputs.

    Fitting method: minimise the layer's output error on calibration data, E‖(W − Ŵ) p‖² over the
    im2col patches p its input really produces (Σp = E[p pᵀ]), by **block coordinate descent**. It
    starts from the truncated SVD of each block (the optimum when the input is white, and exact when
    the layer is representable); then each block in turn is set to the exact minimiser given the
    others: a reduced-rank regression in the metric of its input group's patch covariance,
    Ŵ_jq = L⁻ᵀ trunc_r(L⁻¹ Σp[j, :] R_q) with L Lᵀ = Σp[j, j] (ridge-regularised Cholesky) and R_q the
    target with the other blocks' part removed, one SVD, so the calibration error never increases. Last, each output group's pointwise weights are solved
    jointly given the grouped Conv (ridge least squares). The fit is kept only if it beats the SVD
    start. ``fit=weights`` uses the SVD only (no calibration needed). The bias stays on the
    pointwise Conv; the output keeps its name. ``refit`` (fit=data): once every layer is replaced,
    each pointwise Conv is refit, in network order, on the inputs the compressed model really
    gives it (a grouped one keeps its groups). Lossy.

    A layer whose input channels are not divisible by ``groups`` (or output channels by
    ``pointwise_groups``) is skipped with that reason; when ``layers`` names it, the pass refuses."""

    name = "group-shuffle"
    exact = False
    needs_static_shapes = True

    groups: int = option(2, help="groups of the k×k Conv (its input channels must be divisible by it)")
    width: float = option(1.0, help="channels between the grouped and the pointwise Conv, as a fraction of "
                                    "min(input, output channels), rounded up to a multiple of groups·pointwise_groups")
    pointwise_groups: int = option(1, help="groups of the pointwise Conv; > 1 puts a channel shuffle (Reshape → "
                                           "Transpose → Reshape) before it; 1: plain, the shuffle is folded into it")
    fit: Literal["data", "weights"] = option("data", help="data: block coordinate descent on calibration patches; "
                                                          "weights: per-block SVD only")
    iterations: int = option(3, help="block coordinate descent sweeps over the blocks (fit=data)")
    refit: bool = option(True, help="fit=data: after all replacements, refit each pointwise Conv in order on the "
                                    "compressed model's own inputs (errors do not compound)")
    # two shared options with other defaults here: a group's features ((C/g)·kh·kw) outnumber the rows a
    # small map gives (PP-OCRv4 rec's neck: 1×40 positions, 1440 features per group), so the fit samples
    # more inputs (rows stay capped by ``positions``) and leans more on the weights' own metric
    samples: int = option(32, help="calibration samples for the fit of each layer (rows stay capped by positions)")
    ridge: float = option(1e-3, help="least-squares regularization, relative to the mean diagonal: pulls the "
                                     "data metric towards white inputs (the per-block SVD)")

    def __post_init__(self):
        super().__post_init__()
        if self.groups < 2:
            raise ValueError(f"groups must be ≥ 2, got {self.groups}")
        if self.pointwise_groups < 1:
            raise ValueError(f"pointwise_groups must be ≥ 1, got {self.pointwise_groups}")
        if not (0 < self.width <= 16) or not math.isfinite(self.width):
            raise ValueError(f"width must be in (0, 16], got {self.width}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be ≥ 0, got {self.iterations}")

    # ------------------------------------------------------------------ selection
    def _divisibility(self, layer: CandidateLayer) -> str | None:
        o, c = layer.w.shape[:2]
        if c % self.groups:
            return f"input channels {c} not divisible by groups={self.groups}"
        if o % self.pointwise_groups:
            return f"output channels {o} not divisible by pointwise_groups={self.pointwise_groups}"
        return None

    def select_layers(self, model: Model) -> tuple[list[CandidateLayer], list[dict]]:
        layers, skipped = super().select_layers(model)
        ok = []
        for layer in layers:
            reason = self._divisibility(layer)
            if reason and self.layers:
                raise PassError(self.name, f"cannot group layer '{layer.node.name}': {reason}", layer.node.name)
            if reason:
                skipped.append({"layer": layer.node.name, "reason": reason})
            else:
                ok.append(layer)
        return ok, skipped

    def shape_for(self, layer: CandidateLayer) -> GroupShuffleShape:
        o, c, kh, kw = layer.w.shape
        g, gp = self.groups, self.pointwise_groups
        # a block is [O/gp, (C/g)·kh·kw]: a larger rank than its smaller side adds MACs and nothing else
        full = min(o // gp, (c // g) * kh * kw)
        rank = min(full, max(1, math.ceil(self.width * min(c, o) / (g * gp))))
        return GroupShuffleShape(g, gp, rank * g * gp)

    def fit_replacement(self, layer: CandidateLayer) -> FittedReplacement | str:
        o, c, kh, kw = layer.w.shape
        shape = self.shape_for(layer)
        n, _, ho, wo = layer.y_shape
        macs_after = n * ho * wo * shape.mid * ((c // shape.groups) * kh * kw + o // shape.pointwise_groups)
        reason = self.macs_not_cut_enough(layer, macs_after)
        if reason:
            return reason
        grouped, pointwise, info = self._fit_blocks(layer, shape)
        reason = self.error_too_large(info["error"])
        if reason:
            return reason
        return FittedReplacement((shape, grouped, pointwise), {
            "layer": layer.node.name, "weight_shape": [o, c, kh, kw], "groups": shape.groups,
            "pointwise_groups": shape.pointwise_groups, "mid_channels": shape.mid, "rank": shape.rank,
            "grouped_shape": [shape.mid, c // shape.groups, kh, kw],
            "pointwise_shape": [o, shape.mid // shape.pointwise_groups, 1, 1], "shuffle": shape.pointwise_groups > 1,
            "macs_before": int(layer.macs), "macs_after": int(macs_after), **info})

    # ------------------------------------------------------------------ fitting
    def _fit_blocks(self, layer: CandidateLayer, shape: GroupShuffleShape) -> tuple[np.ndarray, np.ndarray, dict]:
        """The grouped Conv's factors G [g, gp, r, F] and the pointwise factors P [g, gp, O/gp, r]
        (F = (C/g)·kh·kw): block (j, q) of the im2col weight is approximated by Gᵀ[j, q] Pᵀ[j, q]."""
        w = layer.w.astype(np.float64)
        o, c, kh, kw = w.shape
        g, gp, r = shape.groups, shape.pointwise_groups, shape.rank
        f, og = (c // g) * kh * kw, o // gp
        wmat = w.reshape(o, -1).T  # [C·K, O]; input group j is rows j·F … (j+1)·F (channel-major)

        def rows(j):
            return slice(j * f, (j + 1) * f)

        def cols(q):
            return slice(q * og, (q + 1) * og)

        gfac = np.zeros((g, gp, r, f))
        pfac = np.zeros((g, gp, og, r))
        for j in range(g):
            for q in range(gp):
                u, s, vt = np.linalg.svd(wmat[rows(j), cols(q)], full_matrices=False)
                sq = np.sqrt(s[:r])
                gfac[j, q, :len(sq)] = (u[:, :r] * sq).T
                pfac[j, q, :, :len(sq)] = vt[:r].T * sq

        def approx(gfac, pfac):
            a = np.zeros_like(wmat)
            for j in range(g):
                for q in range(gp):
                    a[rows(j), cols(q)] = gfac[j, q].T @ pfac[j, q].T
            return a

        info: dict[str, Any] = {"fit": "weights", "error_svd": None, "error": None}
        if not layer.rows:
            return gfac, pfac, info
        sigma, y2 = patch_moments(layer)
        svd_error = rel_error(sigma, y2, wmat - approx(gfac, pfac))
        info["error_svd"] = round(svd_error, 6)
        if self.fit == "data":
            info["fit"] = "bcd"
            start = gfac.copy(), pfac.copy()
            gfac, pfac = self._block_descent(sigma, wmat, gfac, pfac, shape, f, og)
            if rel_error(sigma, y2, wmat - approx(gfac, pfac)) > svd_error:
                gfac, pfac = start  # the ridge damping can end a hair above an exact start
                info["fit"] = "svd (bcd did not improve it)"
            info["iterations"] = self.iterations
        info["error"] = round(rel_error(sigma, y2, wmat - approx(gfac, pfac)), 6)
        return gfac, pfac, info

    def _block_descent(self, sigma, wmat, gfac, pfac, shape: GroupShuffleShape, f: int, og: int):
        g, gp, r = shape.groups, shape.pointwise_groups, shape.rank
        # per input group: L⁻¹ with S = L Lᵀ its patch covariance (ridge-regularised; a Cholesky
        # factor is a square root as good as S¹ᐟ² for the block step, and far cheaper than eigh)
        inv_root = []
        for j in range(g):
            s = sigma[j * f:(j + 1) * f, j * f:(j + 1) * f]
            lam = self.ridge * max(float(np.mean(np.diag(s))), 1e-12)
            low = np.linalg.cholesky(s + lam * np.eye(f))
            inv_root.append(solve_triangular(low, np.eye(f), lower=True))
        # Σp (W − Ŵ), kept up to date block by block
        blocks = {(j, q): gfac[j, q].T @ pfac[j, q].T for j in range(g) for q in range(gp)}
        approx = np.zeros_like(wmat)
        for (j, q), b in blocks.items():
            approx[j * f:(j + 1) * f, q * og:(q + 1) * og] = b
        resid = sigma @ (wmat - approx)
        for _ in range(self.iterations):
            for q in range(gp):
                cs = slice(q * og, (q + 1) * og)
                for j in range(g):
                    rs = slice(j * f, (j + 1) * f)
                    old = blocks[(j, q)]
                    # normal-equation right side of the block with its own contribution added back
                    rhs = resid[rs, cs] + sigma[rs, rs] @ old
                    u, s, vt = np.linalg.svd(inv_root[j] @ rhs, full_matrices=False)
                    sq = np.sqrt(s[:r])
                    gnew = (inv_root[j].T @ (u[:, :r] * sq)).T  # [r, F]
                    pnew = vt[:r].T * sq  # [og, r]
                    new = gnew.T @ pnew.T
                    resid[:, cs] -= sigma[:, rs] @ (new - old)
                    blocks[(j, q)] = new
                    gfac[j, q] = 0
                    pfac[j, q] = 0
                    gfac[j, q, :len(sq)] = gnew
                    pfac[j, q, :, :len(sq)] = pnew
        # last: each output group's pointwise weights jointly, given the grouped Conv
        for q in range(gp):
            feats = np.zeros((wmat.shape[0], g * r))  # features of output group q: its rank components
            for j in range(g):
                feats[j * f:(j + 1) * f, j * r:(j + 1) * r] = gfac[j, q].T
            sol = ridge_solve(feats.T @ sigma @ feats, feats.T @ sigma @ wmat[:, q * og:(q + 1) * og], self.ridge)
            for j in range(g):
                pfac[j, q] = sol[j * r:(j + 1) * r].T
        return gfac, pfac

    # ------------------------------------------------------------------ graph edit
    def build_replacement(self, model: Model, layer: CandidateLayer, params, names: NameAllocator) -> list[onnx.NodeProto]:
        shape, gfac, pfac = params
        node = layer.node
        o, c, kh, kw = layer.w.shape
        g, gp, r, m = shape.groups, shape.pointwise_groups, shape.rank, shape.mid
        og = o // gp
        dtype = layer.w.dtype
        grouped = np.zeros((m, c // g, kh, kw))
        # the pointwise Conv is built dense (group 1, zero outside its groups) so that the refit can
        # solve it; ``run`` makes it grouped at the end
        pointwise = np.zeros((o, m))
        for j in range(g):
            for q in range(gp):
                for s in range(r):
                    grouped[shape.mid_channel(j, q, s)] = gfac[j, q, s].reshape(c // g, kh, kw)
                    if gp == 1:
                        column = shape.mid_channel(j, q, s)
                    else:
                        column = q * (m // gp) + shape.pointwise_input(j, s)
                    pointwise[q * og:(q + 1) * og, column] = pfac[j, q, :, s]
        w_g = names.initializer(f"{node.name}_grouped_weight", grouped, dtype)
        w_p = names.initializer(f"{node.name}_pointwise_weight", pointwise.reshape(o, m, 1, 1), dtype)
        out = node.output[0]
        mid = names.fresh(f"{out}_mid")
        nodes = [helper.make_node("Conv", [node.input[0], w_g], [mid], name=names.fresh(f"{node.name}_grouped"),
                                  group=g, kernel_shape=[kh, kw], strides=list(attr(node, "strides") or [1, 1]),
                                  pads=list(attr(node, "pads") or [0, 0, 0, 0]),
                                  dilations=list(attr(node, "dilations") or [1, 1]))]
        if gp > 1:
            nodes += self._shuffle(model, names, node.name, mid, g, m, layer.y_shape[2])
            mid = nodes[-1].output[0]
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        pw = helper.make_node("Conv", [mid, w_p] + bias, [out], name=names.fresh(f"{node.name}_pointwise"),
                              kernel_shape=[1, 1])
        if gp > 1:  # made grouped once the refit has run (``run``)
            self.__dict__.setdefault("_dense_pointwise", {})[pw.name] = gp
        return nodes + [pw]

    @staticmethod
    def _shuffle(model: Model, names: NameAllocator, base: str, x: str, g: int, m: int, height: int):
        """ShuffleNet's channel shuffle: [N, M, H, W] → [N, g, M/g, H, W] → swap the two channel
        axes → [N, M, H, W]. The batch is copied (0) and the width inferred (−1), so both may vary."""
        split = names.fresh(f"{base}_shuffle_split")
        merge = names.fresh(f"{base}_shuffle_merge")
        model.set_initializer(split, np.array([0, g, m // g, height, -1], dtype=np.int64))
        model.set_initializer(merge, np.array([0, m, height, -1], dtype=np.int64))
        a, b = names.fresh(f"{x}_split"), names.fresh(f"{x}_swapped")
        out = names.fresh(f"{x}_shuffled")
        return [helper.make_node("Reshape", [x, split], [a], name=names.fresh(f"{base}_shuffle_reshape")),
                helper.make_node("Transpose", [a], [b], name=names.fresh(f"{base}_shuffle_transpose"),
                                 perm=[0, 2, 1, 3, 4]),
                helper.make_node("Reshape", [b, merge], [out], name=names.fresh(f"{base}_shuffle_merge"))]

    def refit_jobs(self, layer: CandidateLayer, params, nodes: list[onnx.NodeProto]) -> list[RefitJob]:
        """The pointwise Conv towards the layer's output; a grouped one keeps its zeros (its groups)."""
        shape = params[0]
        last = nodes[-1]
        if shape.pointwise_groups == 1:
            return [RefitJob(last.name, layer.node.output[0])]
        o = layer.w.shape[0]
        og, mg = o // shape.pointwise_groups, shape.mid // shape.pointwise_groups
        keep = (np.arange(o)[:, None] // og) == (np.arange(shape.mid)[None, :] // mg)
        return [RefitJob(last.name, layer.node.output[0], keep=keep[:, :, None, None])]

    # ------------------------------------------------------------------ the skeleton, then the groups
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        self.__dict__["_dense_pointwise"] = {}
        result = super().run(model, ctx)
        if not self._dense_pointwise:
            return result
        out = result.model
        for name, gp in self._dense_pointwise.items():
            node = out.node_by_name(name)
            dense = out.get_constant(node.input[1])  # [O, M, 1, 1], zero outside the diagonal blocks
            o, m = dense.shape[:2]
            og, mg = o // gp, m // gp
            grouped = np.concatenate([dense[q * og:(q + 1) * og, q * mg:(q + 1) * mg] for q in range(gp)])
            inside = (np.arange(o)[:, None] // og) == (np.arange(m)[None, :] // mg)
            if np.any(dense[~inside]):  # the refit keeps its zero pattern; a nonzero here would be dropped
                raise PassError(self.name, f"the pointwise weights left their {gp} groups", name)
            out.replace_constant_input(node, 1, np.ascontiguousarray(grouped), suffix="grouped")
            node.attribute.append(helper.make_attribute("group", gp))
        out.graph_edited()
        out.remove_unused()
        self.__dict__["_dense_pointwise"] = {}
        after = cost_of(out)
        before = result.stats["macs_before"]
        result.stats.update({"macs_after": after.macs, "params_after": after.params,
                             "macs_reduction": 1 - after.macs / before if before else 0.0})
        return result
