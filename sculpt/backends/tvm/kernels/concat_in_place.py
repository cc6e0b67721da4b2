"""Relax rewrite after CallTIRRewrite: a concat whose inputs the kernels before it can write in place.

A concat of batch-1 tensors along an axis with only unit dimensions before it (channels in NCHW and
in NCHW<c>c) is a copy of each input into one contiguous byte range of its output. When every input
is the fresh output of one kernel call of the same block, that kernel can write its output straight
into its range of the concat's output and the copy goes away: the concat's output is allocated
before the first of those kernels, each input's allocation becomes a view of it at the input's byte
offset (``R.memory.view`` then ``R.memory.ensure_zero_offset``, which moves the data pointer rather
than the DLTensor's byte offset, so the kernels' zero-offset checks hold), and the concat call is
dropped. The memory planner follows views as the storage they view (StaticPlanBlockMemory's
"in-place memory ops"), so the output's storage stays alive from the first kernel to its last
reader and nothing else is planned into it meanwhile.

SqueezeNet's fire modules (expand 1x1 and expand 3x3 -> concat) copied 2 x 775 KB per module at
55x55 (0.13 ms each, 1 thread). Applied only where it is exact: static shapes, every view offset a
multiple of 64 bytes (the VM's allocation alignment: below it ``ensure_zero_offset`` would copy and
the kernel would write the copy), each input a distinct allocation written by one kernel and placed
into one concat, and no input itself a placed concat's output (its storage is another's).

Before fusion (:func:`isolate_placeable_concats`), a concat that will be placed gets a PrimFunc of its
own marked opaque, so FuseOps does not fuse it into a kernel before it (the Winograd output transform
of SqueezeNet's expand 3x3 fused the concat and copied the expand 1x1's output in it)."""

from __future__ import annotations

import math

from sculpt.backends.tvm.kernels.relax_rewrite import OPAQUE_PATTERN, static_shape

ALIGNMENT = 64  # bytes: tvm::runtime::kAllocAlignment; ensure_zero_offset copies below it
CONCAT_BLOCK = "T_concat"  # the block name of TOPI's concatenate, which LegalizeOps emits


def concat_axis(func) -> int | None:
    """The axis ``func`` (a PrimFunc) concatenates its inputs along, if it is exactly a concat: one
    block named like TOPI's, inputs and output of one dtype and rank, the output's shape the inputs'
    joined along one axis. Else None."""
    import tvm_ffi
    from tvm import s_tir

    params = list(func.params)  # TVM 0.27: a PrimFunc's parameters are its buffers
    if len(params) < 3:
        return None
    blocks = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, blocks.append), order="post")
    blocks = [b for b in blocks if b.name_hint != "root"]
    if len(blocks) != 1 or blocks[0].name_hint != CONCAT_BLOCK:
        return None
    try:
        shapes = [tuple(int(d) for d in b.shape) for b in params]
    except TypeError:
        return None
    if len({str(b.dtype) for b in params}) != 1 or len({len(s) for s in shapes}) != 1:
        return None
    *inputs, output = shapes
    for axis in range(len(output)):
        others = [d for a, d in enumerate(output) if a != axis]
        if all([d for a, d in enumerate(s) if a != axis] == others for s in inputs) \
                and sum(s[axis] for s in inputs) == output[axis]:
            return axis
    return None


def _byte_offsets(shapes: list[tuple[int, ...]], axis: int, itemsize: int) -> list[int] | None:
    """Where each input of a concat along ``axis`` starts in its output, in bytes, if each occupies one
    contiguous range (every dimension before ``axis`` is 1) starting at an aligned offset; else None."""
    if any(d != 1 for d in shapes[0][:axis]):
        return None
    offsets, at = [], 0
    for s in shapes:
        if at % ALIGNMENT:
            return None
        offsets.append(at)
        at += math.prod(s) * itemsize
    return offsets


def _input_offsets(inputs: list, axis: int) -> list[int] | None:
    """The byte offsets of a concat's ``inputs`` (Relax variables) in its output, if they are distinct,
    of static shapes, and each placeable (``_byte_offsets``); else None."""
    if len(set(inputs)) != len(inputs):
        return None
    shapes = [static_shape(x) for x in inputs]
    if any(s is None for s in shapes):
        return None
    return _byte_offsets(shapes, axis, _itemsize(inputs[0]))


def _rewritten_functions(mod, rewrite_block) -> dict:
    """{GlobalVar: the Relax function with each block ``rewrite_block`` returns new bindings for
    rebuilt with them (of the same kind)} for the functions where it returned any."""
    from tvm import relax

    updated = {}
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        blocks, changed = [], False
        for block in func.body.blocks:
            bindings = rewrite_block(block)
            changed |= bindings is not None
            blocks.append(block if bindings is None else relax.DataflowBlock(bindings)
                          if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(bindings))
        if changed:
            updated[gv] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                                         func.is_pure, func.attrs, func.span)
    return updated


def _is_alloc(value) -> bool:
    from tvm import relax

    return isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.builtin.alloc_tensor"


def _place_block(block, mod, normalize):
    """The bindings of ``block`` (after CallTIRRewrite: not a dataflow block) with every eligible concat
    placed, or None if none is."""
    from tvm import relax, tirx

    if isinstance(block, relax.DataflowBlock):
        return None
    bindings = list(block.bindings)
    bound = {b.var: b.value for b in bindings}

    def origin(var):
        """The variable an alias chain (``lv = alloc``) starts from."""
        while isinstance(bound.get(var), relax.Var):
            var = bound[var]
        return var

    def prim_call(value):
        return isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar) \
            and isinstance(mod[value.op], tirx.PrimFunc)

    writers: dict = {}  # allocation var -> index of the kernel call that writes it (its first user)
    for i, b in enumerate(bindings):
        if prim_call(b.value):
            for arg in b.value.args:
                if isinstance(arg, relax.Var):
                    writers.setdefault(origin(arg), i)
    index = {b.var: i for i, b in enumerate(bindings)}
    placed_inputs, placed_outputs = set(), set()
    plans = []  # (concat index, output alloc var, [(input alloc var, byte offset)])
    for i, b in enumerate(bindings):
        if not prim_call(b.value):
            continue
        axis = concat_axis(mod[b.value.op])
        if axis is None:
            continue
        *ins, out = b.value.args
        if not all(isinstance(v, relax.Var) for v in b.value.args):
            continue
        roots, out_root = [origin(v) for v in ins], origin(out)
        if not _is_alloc(bound.get(out_root)) or writers.get(out_root) != i:
            continue
        if any(r in placed_inputs or r in placed_outputs for r in roots):
            continue
        if not all(_is_alloc(bound.get(r)) and index[r] < writers.get(r, -1) < i for r in roots):
            continue
        if any(not origin(bindings[writers[r]].value.args[-1]).same_as(r) for r in roots):
            continue  # the allocation is not the writing call's last (output) argument
        offsets = _input_offsets(roots, axis)
        if offsets is None or static_shape(out_root) is None:
            continue
        placed_inputs.update(roots)
        placed_outputs.add(out_root)
        plans.append((i, out_root, list(zip(roots, offsets))))
    if not plans:
        return None
    drop = {i for i, _, _ in plans}
    hoist = {}  # index of an input's allocation -> the output allocation to bind before it (first only)
    views = {}
    for _, out_root, parts in plans:
        first = min(index[r] for r, _ in parts)
        hoist[first] = out_root
        drop.add(index[out_root])
        for r, offset in parts:
            views[r] = (out_root, offset)
    new = []
    for i, b in enumerate(bindings):
        if i in hoist:
            out_root = hoist[i]
            new.append(relax.VarBinding(out_root, bound[out_root]))
        if i in drop:
            continue
        if b.var in views:
            out_root, offset = views[b.var]
            shape = [int(d) for d in b.var.ty.shape]
            view = relax.Var(f"{b.var.name}_view", b.var.ty)
            new.append(relax.VarBinding(view, normalize(
                relax.op.memory.view(out_root, shape, str(b.var.ty.dtype), offset))))
            new.append(relax.VarBinding(b.var, normalize(relax.op.memory.ensure_zero_offset(view))))
            continue
        new.append(b)
    return new


def _itemsize(var) -> int:
    import numpy as np

    return np.dtype(str(var.ty.dtype)).itemsize


def place_concats(mod):
    """``mod`` (after CallTIRRewrite) with every eligible concat's inputs written in place (see the
    module docstring)."""
    from tvm import relax

    normalize = relax.BlockBuilder(mod).normalize
    for gv, func in _rewritten_functions(mod, lambda block: _place_block(block, mod, normalize)).items():
        mod[gv] = func
    return mod


def isolate_placeable_concats(mod):
    """``mod`` (legalized, before FuseOps) with every concat that :func:`place_concats` can place
    calling an opaque copy of its PrimFunc, which fusion leaves alone."""
    from tvm import relax

    isolated: dict = {}  # original GlobalVar name -> the opaque copy's GlobalVar
    builder = relax.BlockBuilder(mod)  # names and types the opaque copies

    def opaque_copy(gv):
        if gv.name_hint not in isolated:
            func = mod[gv].with_attr("op_pattern", OPAQUE_PATTERN)
            isolated[gv.name_hint] = builder.add_func(func, f"{gv.name_hint}_in_place")
        return isolated[gv.name_hint]

    updated = _rewritten_functions(
        mod, lambda block: _isolate_in_block(block, mod, opaque_copy, builder.normalize))
    mod = builder.get()
    for gv, func in updated.items():
        mod[gv] = func
    return mod


def _isolate_in_block(block, mod, opaque_copy, normalize):
    """The bindings of ``block`` with its placeable concats calling opaque copies, or None if none is."""
    from tvm import relax, tirx

    bindings = list(block.bindings)
    bound = {b.var: b.value for b in bindings}
    concat_outputs, taken = set(), set()

    def kernel(value):
        """The PrimFunc a ``call_tir`` calls, else None."""
        if not isinstance(value, relax.Call) or getattr(value.op, "name", "") != "relax.call_tir":
            return None
        func = mod[value.args[0]]
        return func if isinstance(func, tirx.PrimFunc) else None

    changed = False
    for i, b in enumerate(bindings):
        func = kernel(b.value)
        axis = None if func is None else concat_axis(func)
        if axis is None:
            continue
        concat_outputs.add(b.var)
        ins = list(b.value.args[1].fields) if isinstance(b.value.args[1], relax.Tuple) else []
        producers = [kernel(bound.get(x)) if isinstance(x, relax.Var) else None for x in ins]
        if not ins or any(p is None or relax.analysis.has_reshape_pattern(p) for p in producers):
            continue
        if any(x in taken or x in concat_outputs for x in ins) or _input_offsets(ins, axis) is None:
            continue
        taken.update(ins)
        call = b.value
        bindings[i] = relax.VarBinding(b.var, normalize(relax.Call(
            call.op, [opaque_copy(call.args[0])] + list(call.args[1:]), call.attrs, call.ty_args)))
        changed = True
    return bindings if changed else None
