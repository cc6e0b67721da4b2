"""Scheduled TIR kernels (TVMScript, the schedule written into the loops): block-sparse × dense panel,
the dense kernel of the same shape and style (the baseline the sparse one must beat), and im2col.

Every kernel computes on a *panel* view ``X[b, k, n]`` of its input: a 1×1 convolution (NCHW, stride
1, no padding) reads its input directly as ``[B, Cin, H·W]``; a k×k convolution reads the im2col
panel ``[B, Cin·kh·kw, Ho·Wo]`` (only the rows that some block reads); a MatMul reads the transposed
activations ``[1, K, M]``. Output ``Y[b, o, n] = bias[o] + Σ_k S[o, k] · X[b, k, n]``.

Loop structure (the same for sparse and dense): one parallel loop over (batch, block row, column
tile); a register tile ``acc[R, V]`` (``T.decl_buffer(scope="local")``) initialised with the bias;
the reduction loop over the block row's stored blocks (sparse) or over all K (dense), with R
unrolled and V vectorized over the contiguous column axis; then the tile is stored. A last, narrower
column tile covers N mod V; rows past the matrix (R not dividing the row count) are not stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sculpt.backends.tvm.sparse.bsr import BSRMatrix


@dataclass(frozen=True)
class PanelShape:
    """The matrix product a kernel computes: Y[batch, rows, cols] = S[rows, depth] · X[batch, depth, cols]."""

    batch: int
    rows: int
    depth: int
    cols: int

    @property
    def dense_macs(self) -> int:
        return self.batch * self.rows * self.depth * self.cols


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _check_views(panel: PanelShape, x_shape, y_shape) -> None:
    if _prod(x_shape) != panel.batch * panel.depth * panel.cols:
        raise ValueError(f"input shape {list(x_shape)} is not a [{panel.batch}, {panel.depth}, {panel.cols}] panel")
    if _prod(y_shape) != panel.batch * panel.rows * panel.cols:
        raise ValueError(f"output shape {list(y_shape)} is not a [{panel.batch}, {panel.rows}, {panel.cols}] panel")


def _column_tiles(cols: int, tile_cols: int) -> tuple[int, int, int, int]:
    """How a kernel walks a panel's ``cols`` columns: (columns per tile, how many full tiles, the
    width of the last tile, tiles in all)."""
    width = max(1, min(tile_cols, cols))
    return width, cols // width, cols % width or width, -(-cols // width)


def _panel_views(panel: PanelShape, x_shape, y_shape) -> tuple[tuple, tuple]:
    """The shapes the kernel's X and Y buffers are declared with (the panel's own by default),
    checked to hold the panel."""
    xs = tuple(x_shape or (panel.batch, panel.depth, panel.cols))
    ys = tuple(y_shape or (panel.batch, panel.rows, panel.cols))
    _check_views(panel, xs, ys)
    return xs, ys


def bsr_panel_kernel(panel: PanelShape, matrix: BSRMatrix, tile_cols: int,
                     x_shape: Sequence[int] | None = None, y_shape: Sequence[int] | None = None):
    """PrimFunc ``(X, data, indices, indptr, bias, Y)`` of the block-sparse product; the BSR arrays are
    ``matrix.kernel_arrays()`` (passed at run time, as constants of the compiled Relax module)."""
    from tvm.script import tirx as T

    B, O, K, N = panel.batch, panel.rows, panel.depth, panel.cols
    if matrix.shape != (O, K):
        raise ValueError(f"BSR matrix {matrix.shape} does not match the panel {O}×{K}")
    R = matrix.block_rows
    NBR = matrix.n_block_rows
    NNZ = max(matrix.nnz_blocks, 1)
    V, FULL, TAIL, NT = _column_tiles(N, tile_cols)
    XS, YS = _panel_views(panel, x_shape, y_shape)

    @T.macro
    def tile(Xf, data, indices, indptr, bias, Yf, b, io, n0, width):
        acc = T.decl_buffer((R, width), "float32", scope="local")
        for r in T.unroll(R):
            for v in T.vectorized(width):
                acc[r, v] = bias[T.min(io * R + r, O - 1)]
        for j in range(indptr[io], indptr[io + 1]):
            for r in T.unroll(R):
                for v in T.vectorized(width):
                    acc[r, v] = acc[r, v] + data[j, r] * Xf[b, indices[j], n0 + v]
        for r in T.unroll(R):
            if io * R + r < O:
                for v in T.vectorized(width):
                    Yf[b, io * R + r, n0 + v] = acc[r, v]

    @T.prim_func
    def bsr_panel(X: T.Buffer(XS, "float32"), data: T.Buffer((NNZ, R), "float32"),
                  indices: T.Buffer((NNZ,), "int32"), indptr: T.Buffer((NBR + 1,), "int32"),
                  bias: T.Buffer((O,), "float32"), Y: T.Buffer(YS, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        Xf = T.decl_buffer((B, K, N), "float32", data=X.data)
        Yf = T.decl_buffer((B, O, N), "float32", data=Y.data)
        for p in T.parallel(B * NBR * NT):
            if p % NT < FULL:
                tile(Xf, data, indices, indptr, bias, Yf, p // (NBR * NT), p // NT % NBR, p % NT * V, V)
            else:
                tile(Xf, data, indices, indptr, bias, Yf, p // (NBR * NT), p // NT % NBR, p % NT * V, TAIL)

    return bsr_panel


def dense_panel_kernel(panel: PanelShape, tile_rows: int, tile_cols: int,
                       x_shape: Sequence[int] | None = None, y_shape: Sequence[int] | None = None):
    """PrimFunc ``(X, W, bias, Y)`` of the dense product with W [rows, depth]: the same loop structure
    as :func:`bsr_panel_kernel`, every K visited."""
    from tvm.script import tirx as T

    B, O, K, N = panel.batch, panel.rows, panel.depth, panel.cols
    R = max(1, min(tile_rows, O))
    NBR = -(-O // R)
    V, FULL, TAIL, NT = _column_tiles(N, tile_cols)
    XS, YS = _panel_views(panel, x_shape, y_shape)

    @T.macro
    def tile(Xf, W, bias, Yf, b, io, n0, width):
        acc = T.decl_buffer((R, width), "float32", scope="local")
        for r in T.unroll(R):
            for v in T.vectorized(width):
                acc[r, v] = bias[T.min(io * R + r, O - 1)]
        for k in range(K):
            for r in T.unroll(R):
                for v in T.vectorized(width):
                    acc[r, v] = acc[r, v] + W[T.min(io * R + r, O - 1), k] * Xf[b, k, n0 + v]
        for r in T.unroll(R):
            if io * R + r < O:
                for v in T.vectorized(width):
                    Yf[b, io * R + r, n0 + v] = acc[r, v]

    @T.prim_func
    def dense_panel(X: T.Buffer(XS, "float32"), W: T.Buffer((O, K), "float32"), bias: T.Buffer((O,), "float32"),
                    Y: T.Buffer(YS, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        Xf = T.decl_buffer((B, K, N), "float32", data=X.data)
        Yf = T.decl_buffer((B, O, N), "float32", data=Y.data)
        for p in T.parallel(B * NBR * NT):
            if p % NT < FULL:
                tile(Xf, W, bias, Yf, p // (NBR * NT), p // NT % NBR, p % NT * V, V)
            else:
                tile(Xf, W, bias, Yf, p // (NBR * NT), p // NT % NBR, p % NT * V, TAIL)

    return dense_panel


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D NCHW convolution, group 1: input [B, C, H, W], kernel kh×kw, strides, dilations, pads
    (top, left, bottom, right), output [B, O, Ho, Wo]."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]

    @property
    def out_height(self) -> int:
        kh = (self.kernel[0] - 1) * self.dilations[0] + 1
        return (self.height + self.pads[0] + self.pads[2] - kh) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        kw = (self.kernel[1] - 1) * self.dilations[1] + 1
        return (self.width + self.pads[1] + self.pads[3] - kw) // self.strides[1] + 1

    @property
    def is_pointwise(self) -> bool:
        """1×1, stride 1, no padding: the input is already the panel."""
        return self.kernel == (1, 1) and self.strides == (1, 1) and not any(self.pads)

    @property
    def depth(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1]


def im2col_kernel(geo: ConvGeometry, n_rows: int):
    """PrimFunc ``(X, rows, Col)``: ``Col[b, u, oh·Wo + ow]`` = the input value that kernel row
    ``rows[u]`` (a flat (c, ky, kx) index, as in W.reshape(O, -1)) meets at output (oh, ow); zero in
    the padding. Only the rows a sparse kernel reads need be gathered."""
    from tvm.script import tirx as T

    B, C, H, W = geo.batch, geo.channels, geo.height, geo.width
    KH, KW = geo.kernel
    SH, SW = geo.strides
    DH, DW = geo.dilations
    PT, PL = geo.pads[0], geo.pads[1]
    HO, WO = geo.out_height, geo.out_width
    U = max(1, n_rows)

    @T.prim_func
    def im2col(X: T.Buffer((B, C, H, W), "float32"), rows: T.Buffer((U,), "int32"),
               Col: T.Buffer((B, U, HO * WO), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for p in T.parallel(B * U):
            for oh in range(HO):
                for ow in range(WO):
                    Col[p // U, p % U, oh * WO + ow] = T.if_then_else(
                        0 <= oh * SH + rows[p % U] // KW % KH * DH - PT
                        and oh * SH + rows[p % U] // KW % KH * DH - PT < H
                        and 0 <= ow * SW + rows[p % U] % KW * DW - PL
                        and ow * SW + rows[p % U] % KW * DW - PL < W,
                        X[p // U, rows[p % U] // (KH * KW),
                          T.max(T.min(oh * SH + rows[p % U] // KW % KH * DH - PT, H - 1), 0),
                          T.max(T.min(ow * SW + rows[p % U] % KW * DW - PL, W - 1), 0)],
                        T.float32(0))

    return im2col


# ------------------------------------------------------------------ tiles
def vector_lanes(target) -> int:
    """float32 lanes of the widest vector unit the target has (4 for NEON, 8 AVX2, 16 AVX-512)."""
    from sculpt.backends.tvm.kernels.target_traits import traits_of

    return traits_of(target).vector_lanes
    cpu = str(attrs.get("mcpu", "")) if hasattr(attrs, "get") else ""
    mattr = " ".join(str(a) for a in (attrs.get("mattr", []) if hasattr(attrs, "get") else []))
    if "avx512" in mattr or cpu in ("znver4", "znver5", "skylake-avx512", "icelake-server", "sapphirerapids",
                                    "cascadelake", "cooperlake", "tigerlake", "icelake-client"):
        return 16
    if "avx2" in mattr or cpu.startswith(("znver", "haswell", "skylake", "broadwell", "alderlake", "x86-64-v3")):
        return 8
    return 4


def sparse_tile_candidates(block_rows: int, cols: int, lanes: int) -> list[int]:
    """Column tile widths worth trying for a BSR kernel: about 16–32 accumulator registers in all, a
    wider tile when R is small (more independent FMAs per loaded block)."""
    regs = {1: 4, 4: 4, 8: 2, 16: 1}.get(block_rows, 2)
    widths = [lanes * regs, lanes * regs * 2] if block_rows <= 4 else [lanes * regs, lanes * max(1, regs // 2)]
    out = []
    for w in widths:
        w = min(w, cols)
        if w not in out:
            out.append(w)
    return out


def dense_tile(rows: int, cols: int, lanes: int) -> tuple[int, int]:
    """Register tile (R, V) of the dense baseline kernel: 8 rows × 2 vectors (16 on AVX-512, 8 on NEON)."""
    return min(8, rows), min(lanes * (1 if lanes >= 16 else 2), cols)
