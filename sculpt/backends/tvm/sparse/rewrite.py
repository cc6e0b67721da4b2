"""The Relax rewrite: conv2d / matmul with constant block-sparse weights → call_tir to a BSR kernel.

``apply_sparse_kernels(mod, target, mode)``:

- ``off``: nothing changes (the decisions still list the candidate layers).
- ``on``: every candidate whose weight has at least ``min_sparsity`` zero blocks goes sparse.
- ``auto``: a candidate goes sparse only where its sparse kernel is faster than the dense kernel of
  the same shape (:func:`~sculpt.backends.tvm.sparse.kernels.dense_panel_kernel`): measured on this
  machine when ``target`` runs here, else predicted by the cost model of
  :mod:`~sculpt.backends.tvm.sparse.timing`.

Candidates: ``R.nn.conv2d`` (NCHW/OIHW, group 1, float32, static shapes) and ``R.matmul`` (float32,
a constant 2-D right operand). The BSR arrays become constants of the module (arguments of the
call_tir); the block shape of each weight is detected from its zeros
(:func:`~sculpt.backends.tvm.sparse.bsr.detect_block_rows`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

from sculpt.backends.tvm.sparse.bsr import BSRMatrix, block_zero_fraction, detect_block_rows, pack_bsr, zero_fraction
from sculpt.backends.tvm.sparse.kernels import (ConvGeometry, PanelShape, bsr_panel_kernel, dense_panel_kernel,
                                                dense_tile, im2col_kernel, sparse_tile_candidates, vector_lanes)
from sculpt.backends.tvm.sparse.timing import as_target, predicted_speedup, runs_on_host, time_functions
from sculpt.errors import OptionError

Mode = Literal["auto", "on", "off"]
MODES = ("auto", "on", "off")


@dataclass
class LayerDecision:
    """What apply_sparse_kernels decided for one conv2d/matmul with a constant weight."""

    layer: str  # the ONNX node name when known (``layer_names``), else "<op>#<index>"
    op: str  # conv2d | matmul
    weight_shape: list[int]
    kernel: str  # pointwise (1×1 conv on its input), im2col (k×k conv), matmul
    block: str  # "R×1"
    sparsity: float  # fraction of R×1 blocks that are zero
    element_sparsity: float
    dense_macs: int
    sparse: bool  # replaced by the sparse kernel
    decided_by: str  # measured | cost-model | mode=on | mode=off | below min_sparsity
    dense_ms: float | None = None
    sparse_ms: float | None = None
    speedup: float | None = None  # dense / sparse: measured, or predicted by the cost model
    tile_cols: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Candidate:
    index: int
    op: str
    weight: np.ndarray  # the sparse matrix S [rows, depth] in panel form
    weight_shape: list[int]
    panel: PanelShape
    x_shape: tuple
    y_shape: tuple
    geometry: ConvGeometry | None = None
    bsr: BSRMatrix | None = None
    rows: np.ndarray | None = None  # im2col rows gathered (k×k conv)
    decision: LayerDecision | None = None
    extras: dict = field(default_factory=dict)

    @property
    def kernel(self) -> str:
        if self.op == "matmul":
            return "matmul"
        return "pointwise" if self.geometry.is_pointwise else "im2col"


def weight_key(array: np.ndarray) -> str:
    """Digest of a weight's shape and bytes: how a Relax constant is matched to its ONNX node."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


def layer_names_from_onnx(model) -> dict[str, str]:
    """``weight_key`` → node name for every Conv/MatMul/Gemm with a constant weight of a sculpt Model
    (Gemm weights keyed as the importer passes them to matmul: transposed when transB)."""
    names: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = model.get_constant(node.input[1])
        if w is None or w.dtype != np.float32:
            continue
        names.setdefault(weight_key(w), node.name)
        if w.ndim == 2:
            names.setdefault(weight_key(w.T), node.name)
    return names


def _static(shape) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _sinfo_shape(expr) -> tuple[int, ...] | None:
    from tvm import relax

    si = getattr(expr, "ty", None)
    if not isinstance(si, relax.TensorType) or str(si.dtype) != "float32" or si.shape is None:
        return None
    shape = getattr(si.shape, "values", None)
    return _static(shape) if shape is not None else None


def _candidate(call, index: int) -> _Candidate | None:
    """A _Candidate for a conv2d/matmul call with a constant float32 weight, else None."""
    from tvm import relax

    import tvm

    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return None
    name = call.op.name
    if name not in ("relax.nn.conv2d", "relax.matmul") or len(call.args) < 2:
        return None
    w_expr = call.args[1]
    if not isinstance(w_expr, tvm.ir.expr.Constant):
        return None
    x_shape = _sinfo_shape(call.args[0])
    y_shape = _sinfo_shape(call)
    if x_shape is None or y_shape is None or str(w_expr.value.dtype) != "float32":
        return None
    if str(getattr(call.attrs, "out_dtype", "") or "") not in ("", "void", "float32"):
        return None
    w = w_expr.value.numpy()
    if name == "relax.nn.conv2d":
        a = call.attrs
        if (a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW" or int(a.groups) != 1
                or w.ndim != 4 or len(x_shape) != 4):
            return None
        pads = [int(p) for p in a.padding]
        if len(pads) == 2:
            pads = pads * 2
        geo = ConvGeometry(x_shape[0], x_shape[1], x_shape[2], x_shape[3], (w.shape[2], w.shape[3]),
                           tuple(int(s) for s in a.strides), tuple(int(d) for d in a.dilation), tuple(pads))
        if (geo.out_height, geo.out_width) != tuple(y_shape[2:]) or y_shape[1] != w.shape[0]:
            return None
        panel = PanelShape(geo.batch, w.shape[0], geo.depth, geo.out_height * geo.out_width)
        return _Candidate(index, "conv2d", w.reshape(w.shape[0], -1), list(w.shape), panel, x_shape, y_shape, geo)
    if w.ndim != 2 or len(x_shape) < 2 or x_shape[-1] != w.shape[0]:
        return None
    rows = int(np.prod(x_shape[:-1]))
    panel = PanelShape(1, w.shape[1], w.shape[0], rows)
    return _Candidate(index, "matmul", np.ascontiguousarray(w.T), list(w.shape), panel, x_shape, y_shape)


def _collect(func) -> list[_Candidate]:
    from tvm import relax

    found = []
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                cand = _candidate(binding.value, len(found))
                if cand is not None:
                    found.append(cand)
    return found


# ------------------------------------------------------------------ kernels of one candidate
def _views(cand: _Candidate, depth: int) -> tuple[tuple, tuple]:
    """(input, output) buffer shapes of the panel kernel: a 1×1 conv reads its NCHW input, a k×k conv
    the im2col panel of ``depth`` rows; a matmul reads and writes transposed 2-D panels."""
    p = cand.panel
    if cand.kernel == "matmul":
        return (depth, p.cols), (p.rows, p.cols)
    if cand.kernel == "pointwise":
        return cand.x_shape, cand.y_shape
    return (p.batch, depth, p.cols), cand.y_shape


def _sparse_funcs(cand: _Candidate, tile_cols: int) -> dict[str, Any]:
    """The PrimFuncs a sparse layer runs (im2col of the rows the blocks read first, for k×k convs)."""
    funcs: dict[str, Any] = {}
    bsr, panel = cand.bsr, cand.panel
    if cand.kernel == "im2col":
        funcs["im2col"] = im2col_kernel(cand.geometry, len(cand.rows))
        bsr = bsr.with_columns_renumbered(cand.rows)
        panel = PanelShape(panel.batch, panel.rows, len(cand.rows), panel.cols)
    funcs["bsr"] = bsr_panel_kernel(panel, bsr, tile_cols, *_views(cand, panel.depth))
    cand.extras["renumbered"] = bsr
    return funcs


def _dense_funcs(cand: _Candidate, lanes: int) -> dict[str, Any]:
    """The dense kernels of the same shape and style: full im2col + dense panel for k×k convs."""
    funcs: dict[str, Any] = {}
    r, v = dense_tile(cand.panel.rows, cand.panel.cols, lanes)
    if cand.kernel == "im2col":
        funcs["im2col"] = im2col_kernel(cand.geometry, cand.panel.depth)
    funcs["dense"] = dense_panel_kernel(cand.panel, r, v, *_views(cand, cand.panel.depth))
    return funcs


def _measure(cand: _Candidate, target, lanes: int, number: int, repeat: int) -> tuple[float, float, int]:
    """(dense ms, best sparse ms, its column tile) measured on this machine."""
    rng = np.random.default_rng(cand.index)
    p = cand.panel
    x = rng.standard_normal(cand.x_shape if cand.op == "conv2d" else (p.depth, p.cols)).astype(np.float32)
    y = np.zeros(_views(cand, p.depth)[1], np.float32)
    bias = np.zeros(p.rows, np.float32)
    funcs, args = {}, {}
    all_rows = np.arange(p.depth, dtype=np.int32)
    col_full = np.zeros((p.batch, p.depth, p.cols), np.float32)
    for name, f in _dense_funcs(cand, lanes).items():
        funcs[f"dense_{name}"] = f
        args[f"dense_{name}"] = [x, all_rows, col_full] if name == "im2col" else \
            [col_full if cand.kernel == "im2col" else x, cand.weight.astype(np.float32), bias, y]
    tiles = sparse_tile_candidates(cand.bsr.block_rows, p.cols, lanes)
    for tile in tiles:
        for name, f in _sparse_funcs(cand, tile).items():
            if name == "im2col" and "sparse_im2col" in funcs:
                continue
            key = "sparse_im2col" if name == "im2col" else f"sparse_bsr_{tile}"
            funcs[key] = f
            if name == "im2col":
                col = np.zeros((p.batch, len(cand.rows), p.cols), np.float32)
                args[key] = [x, cand.rows, col]
            else:
                src = np.zeros((p.batch, len(cand.rows), p.cols), np.float32) if cand.kernel == "im2col" else x
                args[key] = [src, *cand.extras["renumbered"].kernel_arrays(), bias, y]
    ms = time_functions(funcs, args, target, number=number, repeat=repeat)
    dense = sum(v for k, v in ms.items() if k.startswith("dense_"))
    gather = ms.get("sparse_im2col", 0.0)
    best_tile = min(tiles, key=lambda t: ms[f"sparse_bsr_{t}"])
    return dense, gather + ms[f"sparse_bsr_{best_tile}"], best_tile


# ------------------------------------------------------------------ the rewrite
def apply_sparse_kernels(mod, target="llvm", mode: Mode = "auto", *, min_sparsity: float = 0.3,
                         margin: float = 0.05, layer_names: Mapping[str, str] | None = None,
                         number: int = 10, repeat: int = 5, func_name: str = "main"):
    """Replace conv2d/matmul with constant block-sparse weights in ``mod[func_name]`` by call_tir to
    BSR kernels. Returns ``(new module, [LayerDecision, ...])``.

    ``mode``: ``auto`` (sparse where faster than the dense kernel by more than ``margin``, measured
    on this machine if ``target`` runs here, else by the cost model), ``on`` (every layer with at
    least ``min_sparsity`` zero blocks) or ``off``. ``layer_names``: ``weight_key`` → layer name
    (see :func:`layer_names_from_onnx`) for the report."""
    from tvm import relax

    if mode not in MODES:
        raise OptionError(f"sparse mode must be one of {', '.join(MODES)}, got '{mode}'")
    if not 0 <= min_sparsity < 1:
        raise OptionError(f"min_sparsity must be in [0, 1), got {min_sparsity}")
    target = as_target(target)
    mod = relax.transform.FoldConstant()(mod) if mode != "off" else mod
    cands = _collect(mod[func_name])
    lanes = vector_lanes(target)
    measurable = runs_on_host(target)
    names = dict(layer_names or {})
    for cand in cands:
        r = detect_block_rows(cand.weight)
        blk_zero = block_zero_fraction(cand.weight, r)
        label = names.get(weight_key(_onnx_weight(cand)), f"{cand.op}#{cand.index}")
        d = LayerDecision(label, cand.op, cand.weight_shape, cand.kernel, f"{r}x1", round(blk_zero, 4),
                          round(zero_fraction(cand.weight), 4), cand.panel.dense_macs, False, "")
        cand.decision = d
        if mode == "off":
            d.decided_by = "mode=off"
            continue
        if blk_zero < min_sparsity:
            d.decided_by = "below min_sparsity"
            continue
        cand.bsr = pack_bsr(cand.weight, r)
        cand.rows = cand.bsr.used_columns().astype(np.int32) if cand.kernel == "im2col" else None
        if cand.rows is not None and cand.rows.size == 0:
            cand.rows = np.zeros(1, np.int32)
        tiles = sparse_tile_candidates(r, cand.panel.cols, lanes)
        d.tile_cols = tiles[0]
        if mode == "on":
            d.sparse, d.decided_by = True, "mode=on"
        elif measurable:
            dense_ms, sparse_ms, tile = _measure(cand, target, lanes, number, repeat)
            # stored unrounded: the decision below must be reproducible from the reported times
            d.dense_ms, d.sparse_ms, d.tile_cols = dense_ms, sparse_ms, tile
            d.speedup = dense_ms / max(sparse_ms, 1e-9)
            d.sparse, d.decided_by = sparse_ms < dense_ms * (1 - margin), "measured"
        else:
            d.speedup = round(predicted_speedup(r, cand.bsr.density), 3)
            d.sparse, d.decided_by = d.speedup > 1 + margin, "cost-model"
    chosen = {c.index: c for c in cands if c.decision.sparse}
    if chosen:
        mod = _rewrite(mod, func_name, chosen)
    return mod, [c.decision for c in cands]


def _onnx_weight(cand: _Candidate) -> np.ndarray:
    """The weight as the ONNX node stored it (OIHW for Conv, [K, O] for MatMul)."""
    return cand.weight.reshape(cand.weight_shape) if cand.op == "conv2d" else cand.weight.T


def _rewrite(mod, func_name: str, chosen: dict[int, _Candidate]):
    from tvm import relax

    @relax.expr_functor.mutator
    class _SparseRewriter(relax.PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.seen = 0

        def visit_call_(self, call):
            new = super().visit_call_(call)
            if _candidate(call, 0) is None:
                return new
            index = self.seen
            self.seen += 1
            cand = chosen.get(index)
            return new if cand is None else _emit_sparse(self.builder_, new, cand)

    rewriter = _SparseRewriter(mod)
    func = rewriter.visit_expr(mod[func_name])
    out = rewriter.builder_.get()
    out[func_name] = func
    return relax.transform.DeadCodeElimination()(out) if hasattr(relax.transform, "DeadCodeElimination") else out


def _emit_sparse(builder, call, cand: _Candidate):
    from tvm import relax

    x = call.args[0]
    d = cand.decision
    tile = d.tile_cols
    funcs = _sparse_funcs(cand, tile)
    bsr = cand.extras["renumbered"]
    data, indices, indptr = (relax.const(a) for a in bsr.kernel_arrays())
    bias = relax.const(np.zeros(cand.panel.rows, np.float32))
    base = f"sparse_{cand.op}_{cand.index}"
    f32 = "float32"

    def add(func, name):
        # opaque (op_pattern 8): already scheduled, so fusion passes must not merge it with its
        # neighbours (the kernel library's FuseOps/FuseTIR would otherwise remap its buffers)
        return builder.add_func(func.with_attr("global_symbol", name).with_attr("op_pattern", 8), name)

    if cand.kernel == "pointwise":
        gv = add(funcs["bsr"], base)
        return relax.call_tir(gv, [x, data, indices, indptr, bias], relax.TensorType(cand.y_shape, f32))
    if cand.kernel == "im2col":
        p = cand.panel
        g_col = add(funcs["im2col"], f"{base}_im2col")
        col = builder.emit(relax.call_tir(g_col, [x, relax.const(cand.rows)],
                                          relax.TensorType((p.batch, len(cand.rows), p.cols), f32)))
        gv = add(funcs["bsr"], base)
        return relax.call_tir(gv, [col, data, indices, indptr, bias], relax.TensorType(cand.y_shape, f32))
    p = cand.panel
    xt = builder.emit(relax.op.permute_dims(relax.op.reshape(x, (p.cols, p.depth)), [1, 0]))
    gv = add(funcs["bsr"], base)
    yt = builder.emit(relax.call_tir(gv, [xt, data, indices, indptr, bias],
                                     relax.TensorType((p.rows, p.cols), f32)))
    return relax.op.reshape(relax.op.permute_dims(yt, [1, 0]), cand.y_shape)
