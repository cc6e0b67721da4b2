"""Activations in a channel-blocked layout (NCHW<c>c) between the blocked-channel convs.

The blocked conv kernel (blocked_conv) computes a tile of ``ob`` output channels as vectors. Written
to NCHW, every vector is scattered over ``lanes`` rows of the output (a transposing store), and the
next conv reads a cache line per input channel for a few pixels. Written to NCHW<c>c (``c`` = the
vector width: the channel blocks, rows, columns, then the block's ``c`` channels), the stores are
whole vectors and the next conv's broadcasts walk contiguous channels. Measured on AVX2, 1 thread,
a conv with bias and ReLU, NCHW in/out -> NCHW8c in/out: resnet50's 256->128 1x1 at 56x56
2.93 -> 2.53 ms, 512->128 1x1 at 28x28 1.46 -> 1.23 ms, 64->64 3x3 at 56x56 3.04 -> 2.90 ms.

The plan (``plan_blocked_layout``) keeps a tensor NCHW<c>c only when no layout transform is needed
anywhere: it is made by a blocked conv, a depthwise conv, a pool, a resize, a mean over rows and columns
(squeeze-and-excitation) or an elementwise op / channel concat of such tensors (and constants),
its channels are a whole number of blocks, and every consumer takes the blocked layout (a blocked
conv's input, or an op of those kinds whose output is kept too). Everything else stays NCHW, as
before: the graph's inputs and outputs, reshapes, transposes, transposed convs.

Mechanism: ``rewrite_in_blocked_layout`` replaces the convs (BlockedConvBuilder with input/output
blocks) and depthwise convs (BlockedDepthwiseBuilder), gives pools and resizes the blocked layout, and
hands the kept elementwise ops and concats their constants reshaped to the blocked
layout; Relax re-infers their 5-D shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sculpt.backends.tvm.kernels.blocked_conv import BlockedConvBuilder, ConvPolicy
from sculpt.backends.tvm.kernels.blocked_depthwise import BlockedDepthwiseBuilder
from sculpt.backends.tvm.kernels.relax_rewrite import RESIZE_OP, constant_value, in_layout, rewrite_calls, static_shape

ELEMENTWISE_OPS = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
    "relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu",
    "relax.nn.gelu_tanh", "relax.exp", "relax.sqrt", "relax.negative", "relax.abs", "relax.erf",
    "relax.nn.leakyrelu", "relax.power"})
CONCAT_OP = "relax.concat"
SPATIAL_MEAN_OP = "relax.mean"  # over the rows and columns, dims kept: squeeze-and-excitation's pooling
# a blocked tensor up to this size that an NCHW op reads gets an NCHW copy (a pass over it) instead
# of keeping its producers NCHW: resnet50's pooled 2048 features before the flatten
CONVERT_MAX_ELEMENTS = 1 << 14
# ops with a layout attribute that Relax computes in NCHW<c>c too
LAYOUT_OPS = frozenset({"relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", RESIZE_OP})


def _nchw_op(call) -> bool:
    a = call.attrs
    return str(a.layout) == "NCHW" and str(getattr(a, "out_layout", "") or "") in ("NCHW", "") \
        and (str(call.op.name) != RESIZE_OP or a.out_dtype is None or str(a.out_dtype) in ("", "float32", "void"))


def _spatial_mean(call) -> bool:
    axes = call.attrs.axis
    return axes is not None and [int(a) for a in axes] == [2, 3] and bool(call.attrs.keepdims)


def _same_or_per_channel(operand: tuple, result: tuple) -> bool:
    """An operand of an elementwise op that the blocked layout broadcasts the same way: the result's
    shape, or one value per channel ([N or 1, C, 1, 1]: a squeeze-and-excitation gate)."""
    return operand == result or (operand[0] in (1, result[0]) and operand[1] == result[1] and operand[2:] == (1, 1))


@dataclass
class BlockedLayoutPlan:
    """Which tensors (Relax vars of one function) stay NCHW<block>c; ``convs`` maps each blocked
    conv call to its (input block, output block) and ``ops`` is the set of elementwise/concat calls
    computed in the blocked layout."""

    block: int
    kept: set = field(default_factory=set)
    convs: dict = field(default_factory=dict)
    ops: set = field(default_factory=set)
    depthwise: set = field(default_factory=set)  # depthwise conv calls computed blocked (in and out)
    layout_ops: set = field(default_factory=set)  # pools and resizes computed blocked (in and out)
    refused: dict = field(default_factory=dict)  # candidates left NCHW -> why (the first reason found)
    converted: set = field(default_factory=set)  # kept tensors some consumers read as an NCHW copy
    constants: dict = field(default_factory=dict)  # variables bound to constants -> the constant


def blocked_constant(value: np.ndarray, block: int, channels: int) -> np.ndarray | None:
    """A constant operand of an elementwise op over NCHW tensors of ``channels`` channels, in
    NCHW<block>c; None if it does not broadcast per channel (or per element) that way."""
    if value.size == 1:
        return value
    shape = value.shape
    if shape in ((1, channels, 1, 1), (channels, 1, 1)):
        return value.reshape(channels // block, block)[None, :, None, None, :]
    if len(shape) == 4 and shape[1] == channels:
        n, c, h, w = shape
        return np.ascontiguousarray(value.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2))
    return None


def _op_name(value) -> str:
    return str(getattr(getattr(value, "op", None), "name", ""))


def _tensor_args(call) -> list:
    """The tensor operands of a call (concat's tuple unpacked)."""
    from tvm import relax

    out = []
    for arg in call.args:
        if isinstance(arg, relax.Tuple):
            out.extend(arg.fields)
        elif isinstance(arg, relax.Var) or constant_value(arg) is not None:
            out.append(arg)
    return out


def _variable_args(call, constant_of) -> list:
    """The tensor operands of a call that are not constants."""
    return [a for a in _tensor_args(call) if constant_of(a) is None]


def _bound_constants(bindings) -> dict:
    """Variables bound to a constant (the importer binds reshaped biases so) -> the constant."""
    return {b.var: b.value for b in bindings if constant_value(b.value) is not None}


def _blockable_shape(var, block: int) -> bool:
    shape = static_shape(var)
    try:
        float32 = str(var.ty.dtype) == "float32"
    except AttributeError:
        return False
    return float32 and shape is not None and len(shape) == 4 and shape[1] % block == 0


def plan_blocked_layout(func, builder: BlockedConvBuilder, block: int,
                        depthwise: BlockedDepthwiseBuilder | None = None) -> BlockedLayoutPlan:
    """The tensors of a Relax function that stay blocked (see the module docstring). A depthwise
    conv (``depthwise`` given) is blocked in and out, or neither, like an elementwise op."""
    from tvm import relax

    plan = BlockedLayoutPlan(block)
    bindings = [b for blk in func.body.blocks for b in blk.bindings]
    producer = {b.var: b.value for b in bindings}
    uses: dict = {b.var: [] for b in bindings}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            if v in uses:
                uses[v].append(b)
    outputs = set(relax.analysis.free_vars(func.body.body))
    constants = _bound_constants(bindings)

    def constant_of(arg):
        return constant_value(constants.get(arg, arg))

    def classify(value) -> str:
        name = _op_name(value)
        if name == "relax.nn.conv2d":
            if builder.tile_for(value, block) is not None:
                return "conv"
            return "depthwise" if depthwise is not None and depthwise.takes(value) else ""
        return name

    kinds = {b.var: classify(b.value) for b in bindings}  # once: a conv's kind runs the tile policy

    def candidate(var, value) -> bool:
        if not isinstance(value, relax.Call) or not _blockable_shape(var, block):
            return False
        name = kinds[var]
        if name == "conv":
            return True
        if name in ("depthwise", SPATIAL_MEAN_OP) or name in LAYOUT_OPS:
            return (isinstance(value.args[0], relax.Var) and _blockable_shape(value.args[0], block)
                    and (name == "depthwise" or (_spatial_mean(value) if name == SPATIAL_MEAN_OP
                                                 else _nchw_op(value))))
        if name not in ELEMENTWISE_OPS and not (name == CONCAT_OP and _concat_on_channels(value)):
            return False
        channels = static_shape(var)[1]
        for arg in _tensor_args(value):
            constant = constant_of(arg)
            if constant is not None:
                if name == CONCAT_OP or blocked_constant(constant.numpy(), block, channels) is None:
                    return False
            elif not _blockable_shape(arg, block) or (
                    name != CONCAT_OP and not _same_or_per_channel(static_shape(arg), static_shape(var))):
                return False
        return True

    kept = {b.var for b in bindings if candidate(b.var, b.value)}

    def convertible(var, consumers) -> bool:
        """A small tensor (a pooled map, a squeeze-and-excitation vector) stays blocked and gets one
        NCHW copy for the calls that need it, rather than turning the layers before it NCHW."""
        made_by = kinds[var]
        # a conv (and an op of one operand, fused into the conv or op before it) writes NCHW itself;
        # a pool, resize, mean, depthwise conv or concat would turn what it reads NCHW too, and so
        # would an op of two tensors (a residual add: the whole chain of residual blocks before it)
        if not (made_by in LAYOUT_OPS or made_by in ("depthwise", SPATIAL_MEAN_OP, CONCAT_OP)
                or (made_by in ELEMENTWISE_OPS and len(_variable_args(producer[var], constant_of)) > 1)):
            return False
        elements = int(np.prod(static_shape(var)))
        return elements <= CONVERT_MAX_ELEMENTS and all(isinstance(c.value, relax.Call) for c in consumers)

    def takes_blocked(var, consumer) -> bool:
        value = consumer.value
        name = kinds[consumer.var]
        if name == "conv":  # one this kernel takes (either input layout)
            return value.args[0].same_as(var)
        if name == "depthwise" or name in LAYOUT_OPS:
            return value.args[0].same_as(var) and consumer.var in kept
        return consumer.var in kept

    # a worklist: dropping a tensor can only make the tensors it reads (a consumer now refuses) and
    # the ones read from it (an input now NCHW) drop too
    pending = list(kept)
    while pending:
        var = pending.pop()
        if var not in kept:
            continue
        value = producer[var]
        inputs_kept = kinds[var] == "conv" or all(
            constant_of(a) is not None or a in kept for a in _tensor_args(value))
        refusing = [c for c in uses[var] if not takes_blocked(var, c)]
        if refusing and convertible(var, refusing):
            refusing = []  # those consumers read an NCHW copy
        if var in outputs or not isinstance(var, relax.DataflowVar) or not inputs_kept or refusing:
            kept.discard(var)
            plan.refused[var] = ("a function output" if var in outputs or not isinstance(var, relax.DataflowVar)
                                 else "an NCHW input" if not inputs_kept
                                 else f"read by {kinds[refusing[0].var] or type(refusing[0].value).__name__}")
            pending.extend(a for a in _tensor_args(value) if a in kept)
            pending.extend(c.var for c in uses[var] if c.var in kept)
    plan.kept, plan.constants = kept, constants
    plan.converted = {v for v in kept if any(not takes_blocked(v, c) for c in uses[v])}
    for b in bindings:
        name = kinds[b.var]
        if name == "depthwise" and b.var in kept:
            plan.depthwise.add(b.value)
        elif name in LAYOUT_OPS and b.var in kept:
            plan.layout_ops.add(b.value)
        elif name == "conv":
            x = b.value.args[0]
            in_block = block if isinstance(x, relax.Var) and x in kept else 0
            out_block = block if b.var in kept else 0
            if in_block or out_block:
                plan.convs[b.value] = (in_block, out_block)
        elif b.var in kept:
            plan.ops.add(b.value)
    return plan


def _concat_on_channels(call) -> bool:
    axis = getattr(call.attrs, "axis", None)
    return axis is not None and int(axis) in (1, -3)


def rewrite_in_blocked_layout(mod, choose: ConvPolicy, traits, decisions: list | None = None, winograd=None):
    """``mod`` with the blocked-channel convs of ``rewrite_blocked_convs`` and, where the plan keeps
    them, their activations in NCHW<lanes>c."""
    from tvm import relax

    block = traits.vector_lanes
    builder = BlockedConvBuilder(choose, traits, decisions, winograd)
    depthwise = BlockedDepthwiseBuilder(block, traits.vector_registers)

    plan = BlockedLayoutPlan(block)

    copies: dict = {}  # converted tensor -> its NCHW copy (in the function being rewritten)

    def start(func):
        nonlocal plan
        plan = plan_blocked_layout(func, builder, block, depthwise)
        copies.clear()

    def nchw_operand(arg, rewriter, visit):
        if isinstance(arg, relax.Tuple):
            return relax.Tuple([nchw_operand(f, rewriter, visit) for f in arg.fields])
        if not (isinstance(arg, relax.Var) and arg in plan.converted):
            return visit(arg)
        if arg not in copies:
            n, c, h, w = static_shape(arg)
            lanes_inner = rewriter.emit(relax.op.permute_dims(visit(arg), [0, 1, 4, 2, 3]))
            copies[arg] = rewriter.emit(relax.op.reshape(lanes_inner, (n, c, h, w)))
        return copies[arg]

    def before(call, rewriter, visit):
        """Calls the plan changes, from their original form (a blocked operand fits no NCHW op)."""
        if call in plan.depthwise:
            return depthwise.rewrite(call, visit(call.args[0]), rewriter)
        if call in plan.layout_ops:
            return in_layout(call, visit(call.args[0]), f"NCHW{block}c")
        if call in plan.convs:
            return builder.rewrite(call, rewriter, *plan.convs[call], x=visit(call.args[0]))
        if call in plan.ops:  # Relax infers the blocked shapes from the operands
            original = _with_blocked_constants(call, block, plan.constants)
            return relax.Call(original.op, [visit(a) for a in original.args], original.attrs, original.ty_args)
        if any(isinstance(a, relax.Var) and a in plan.converted for a in _tensor_args(call)):
            new = relax.Call(call.op, [nchw_operand(a, rewriter, visit) for a in call.args], call.attrs, call.ty_args)
            replaced = builder.rewrite(new, rewriter)
            return new if replaced is None else replaced
        return None

    return rewrite_calls(mod, builder.rewrite, before=before, on_function=start)


def _with_blocked_constants(call, block: int, constants: dict):
    from tvm import relax

    shape = static_shape(call)
    channels = shape[1] if shape else None
    args = []
    for arg in call.args:
        value = constant_value(constants.get(arg, arg))
        if value is not None and channels is not None:
            arg = relax.const(blocked_constant(value.numpy(), block, channels), str(value.dtype))
        args.append(arg)
    return relax.Call(call.op, args, call.attrs, call.ty_args)
