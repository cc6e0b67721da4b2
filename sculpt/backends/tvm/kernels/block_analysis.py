"""Reading the legalized TIR: which block is the kernel, which loop is vectorized, which is broadcast.

A legalized (and FuseTIR-fused) Relax op is a PrimFunc with a few blocks at the root: producers
(padding), one *main* block and elementwise epilogue blocks (bias, activation, residual add). The
main block of conv2d / depthwise / matmul / pooling is a reduction whose loops are the block's iter
vars in order, spatial first. This module finds the three axes the register tile is built on:

- the *vector* axis: the last spatial axis, the contiguous axis of the output (NCHW: ow; matmul: j);
- the *broadcast* axis: a spatial axis the streamed operand (the read indexed by the vector axis)
  does not depend on, while another read does (conv: co, read from the weights and broadcast;
  matmul: i). Each step of the reduction loads it once and reuses the streamed vectors for it;
- the *row* axis: the next spatial axis the streamed operand depends on (conv: oh), tiled for
  more independent accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REDUCE = 2  # tirx.IterVar.CommReduce
SPATIAL = 0  # tirx.IterVar.DataPar


def _vars_in(expr) -> set:
    import tvm_ffi
    from tvm import tirx

    found = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, found.add), order="post")
    return found


def region_vars(region) -> set:
    out = set()
    for rng in region:
        out |= _vars_in(rng.min)
    return out


@dataclass
class Axis:
    index: int      # position among the block's iter vars (= loop position)
    name: str
    extent: int


@dataclass
class ReductionAnatomy:
    """The axes of a main reduction block that the register tile is built on."""

    spatial: list[Axis]
    reduce: list[Axis]
    vector: Axis
    broadcast: Axis | None
    row: Axis | None
    kind: str                       # conv2d, conv2d_1x1, depthwise, matmul, pool, reduce
    output_shape: tuple[int, ...]
    reads: list[str] = field(default_factory=list)
    fused_rows: bool = False        # row and vector loops fused into one contiguous axis (oh*ow)
    row_length: int = 0             # when fused: ow; a vector tile must divide it or be a multiple

    @property
    def reduce_extent(self) -> int:
        n = 1
        for a in self.reduce:
            n *= a.extent
        return n


def root_blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def is_reduction(sch, block_rv) -> bool:
    return any(int(iv.iter_type) == REDUCE for iv in sch.get(block_rv).iter_vars)


def has_if_then_else(sch, block_rv) -> bool:
    import tvm_ffi
    from tvm import ir

    found = []

    def visit(call):
        if "if_then_else" in str(getattr(call.op, "name", "")):
            found.append(call)

    tvm_ffi.structural_walk(sch.get(block_rv).body, (ir.Call, visit), order="post")
    return bool(found)


def writes_function_output(sch, block_rv, func) -> bool:
    """The block writes one of the function's parameters. TVM 0.27's PrimFuncs have no buffer map
    and their parameters' attributes build expressions: a parameter buffer is found by its name
    (FuseTIR names the function's own buffers apart from its parameters)."""
    params = {str(p) for p in func.params}
    return any(str(w.source.name) in params for w in sch.get(block_rv).writes)


def _loops_match_iter_vars(sch, block_rv) -> bool:
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    if len(loops) != len(block.iter_vars):
        return False
    for loop_rv, iv in zip(loops, block.iter_vars):
        loop = sch.get(loop_rv)
        if int(loop.extent) != int(iv.dom.extent) or int(loop.min) != 0:
            return False
    return True


def _kind(spatial, reduce, broadcast, multiply_accumulate) -> str:
    if not multiply_accumulate:
        return "pool"
    if broadcast is None:
        return "depthwise" if len(spatial) >= 3 else "reduce"
    if len(reduce) == 3:  # conv2d: rc, ry, rx
        kh, kw = reduce[1].extent, reduce[2].extent
        return "conv2d_1x1" if kh == 1 and kw == 1 else "conv2d"
    return "matmul"


def analyze_reduction(sch, block_rv) -> ReductionAnatomy | None:
    """The anatomy of a reduction block, or None when the register tile does not apply."""
    from tvm import tirx

    block = sch.get(block_rv)
    if not _loops_match_iter_vars(sch, block_rv):
        return None
    ivs = list(block.iter_vars)
    types = [int(iv.iter_type) for iv in ivs]
    if any(t not in (SPATIAL, REDUCE) for t in types):
        return None
    n_spatial = types.count(SPATIAL)
    if types != [SPATIAL] * n_spatial + [REDUCE] * (len(ivs) - n_spatial) or n_spatial == 0:
        return None
    axes = [Axis(i, str(iv.var.name), int(iv.dom.extent)) for i, iv in enumerate(ivs)]
    spatial, reduce = axes[:n_spatial], axes[n_spatial:]
    if len(block.writes) != 1:
        return None
    out_region = block.writes[0].region
    vector = spatial[-1]
    last_index = out_region[-1].min
    if not (isinstance(last_index, tirx.Var) and last_index.same_as(ivs[vector.index].var)):
        return None
    if vector.extent < 2:
        return None
    var_of = {a.index: ivs[a.index].var for a in axes}
    out_buf = block.writes[0].source
    reads = [r for r in block.reads if not r.source.same_as(out_buf)]
    streamed = [r for r in reads if any(v.same_as(var_of[vector.index]) for v in region_vars(r.region))]
    others = [r for r in reads if r not in streamed]
    if not streamed:
        return None
    streamed_vars = set()
    for r in streamed:
        streamed_vars |= {str(v.name) for v in region_vars(r.region)}
    other_vars = set()
    for r in others:
        other_vars |= {str(v.name) for v in region_vars(r.region)}
    broadcast = None
    for a in reversed(spatial[:-1]):
        if a.extent > 1 and a.name not in streamed_vars and a.name in other_vars:
            broadcast = a
            break
    row = None
    for a in reversed(spatial[:-1]):
        if a is not broadcast and a.extent > 1 and a.name in streamed_vars:
            row = a
            break
    multiply_accumulate = _is_multiply_accumulate(block.body)
    kind = _kind(spatial, reduce, broadcast, multiply_accumulate)
    if kind == "depthwise" and "einsum" in str(block.name_hint):
        kind = "matmul"  # panel_matmul's einsum at one row: a matrix-vector product, no broadcast axis
    return ReductionAnatomy(spatial, reduce, vector, broadcast, row, kind,
                            tuple(int(x) for x in out_buf.shape), [str(r.source.name) for r in reads])


def _is_multiply_accumulate(stmt) -> bool:
    import tvm_ffi
    from tvm import tirx

    muls = []

    def visit(mul):
        if "float" in str(getattr(mul, "dtype", None) or mul.ty):  # index arithmetic (oh * stride) is integer
            muls.append(mul)

    tvm_ffi.structural_walk(stmt, (tirx.Mul, visit), order="post")
    return bool(muls)


def contiguous_along_last_axis(sch, block_rv) -> bool:
    """Every access moves by 0 or 1 element along the block's last iter var, and only in the
    buffer's last dimension, and the body has no branch: a vector loop on it is plain loads/stores."""
    from tvm import tirx

    block = sch.get(block_rv)
    if not block.iter_vars or has_if_then_else(sch, block_rv):
        return False
    last = block.iter_vars[-1].var
    for region in list(block.reads) + list(block.writes):
        mins = [r.min for r in region.region]
        for dim, expr in enumerate(mins):
            uses = any(v.same_as(last) for v in _vars_in(expr))
            if not uses:
                continue
            if dim != len(mins) - 1:
                return False
            if not (isinstance(expr, tirx.Var) or (isinstance(expr, tirx.Add) and isinstance(expr.a, tirx.Var)
                                                   and expr.a.same_as(last) and isinstance(expr.b, tirx.IntImm))):
                return False
    return True


def rows_fusable(sch, block_rv, anatomy: ReductionAnatomy) -> bool:
    """The row axis sits right before the vector axis and every streamed read and the output
    index them as exactly ``[..., row, vector]`` over a last dimension of the vector's extent (a
    1x1 stride-1 unpadded conv, a matmul): then (row, vector) is one contiguous axis."""
    from tvm import tirx

    a = anatomy
    if a.row is None or a.row.index != a.vector.index - 1 or a.fused_rows:
        return False
    block = sch.get(block_rv)
    row_var, vec_var = block.iter_vars[a.row.index].var, block.iter_vars[a.vector.index].var
    out_buf = block.writes[0].source
    regions = [block.writes[0]] + [r for r in block.reads if not r.source.same_as(out_buf)
                                   and any(v.same_as(vec_var) for v in region_vars(r.region))]
    unit_reduce = [block.iter_vars[r.index].var for r in a.reduce if r.extent == 1]

    def is_exactly(expr, var) -> bool:  # var, or var + a reduction var of extent 1 (1x1 kernel taps)
        if isinstance(expr, tirx.Var):
            return expr.same_as(var)
        if isinstance(expr, tirx.Add) and isinstance(expr.a, tirx.Var) and isinstance(expr.b, tirx.Var):
            return expr.a.same_as(var) and any(expr.b.same_as(u) for u in unit_reduce)
        return False

    for region in regions:
        mins = [r.min for r in region.region]
        if len(mins) < 2 or int(region.source.shape[-1]) != a.vector.extent:
            return False
        if not (is_exactly(mins[-1], vec_var) and is_exactly(mins[-2], row_var)):
            return False
    return True


def with_fused_rows(anatomy: ReductionAnatomy) -> ReductionAnatomy:
    """The anatomy after fusing the row loop into the vector loop (loop positions shift by one)."""
    import dataclasses

    a = anatomy
    vector = Axis(a.row.index, f"{a.row.name}_{a.vector.name}", a.row.extent * a.vector.extent)
    spatial = [s for s in a.spatial if s.index < a.row.index] + [vector]
    reduce = [Axis(r.index - 1, r.name, r.extent) for r in a.reduce]
    return dataclasses.replace(a, spatial=spatial, reduce=reduce, vector=vector, row=None, fused_rows=True,
                               row_length=a.vector.extent)


def reads_pointwise(sch, block, main) -> bool:
    """``block`` reads the main block's output only at its own position ``[v0, v1, ...]`` (an
    elementwise epilogue, a slice of the width included): then it can be computed per tile of the
    main block. A padding after the kernel (its output is larger: the border would never be
    written), a broadcast (a squeeze-and-excitation gate) or a shuffle cannot."""
    from tvm import tirx

    out = sch.get(main).writes[0].source
    b = sch.get(block)
    ivs = [iv.var for iv in b.iter_vars]
    regions = [r for r in b.reads if r.source.same_as(out)]
    if not regions or len(ivs) != len(out.shape):
        return False
    if any(int(iv.dom.extent) > int(dim) for iv, dim in zip(b.iter_vars, out.shape)):
        return False  # it writes more than the kernel computes (a padding's border)
    for region in regions:
        for rng, var in zip(region.region, ivs):
            if not (isinstance(rng.min, tirx.Var) and rng.min.same_as(var) and int(rng.extent) == 1):
                return False
    return True
