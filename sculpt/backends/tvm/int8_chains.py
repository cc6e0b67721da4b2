"""Find the elementwise chains after int8 kernel calls that the kernels can compute in their epilogue.

After the int8 lowering a QDQ model holds, between two kernel calls,

    q1 = call_tir(kernel, ...)                      # int8/uint8
    x = dequantize(q1, s1, z1)                      # scalar scale and zero point
    ... add/subtract/multiply/divide/maximum/minimum/clip/relu of x and scalar constants ...
    q2 = quantize(last, s2, z2)

(HardSwish is ``x * min(max(x + 3, 0), 6) / 6``). When ``q1`` feeds only the dequantize and every
value of the chain feeds only the chain, ``q2`` is the kernel's call with the chain in its epilogue
(kernels/quantized_chain.py) and the rest is dead. :func:`output_chains` finds them, as data; the
lowering re-emits the kernels. :func:`divisions_as_products` rewrites every chain's divisions by
constants (those after kernels and the others alike) as products by reciprocals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sculpt.backends.tvm.kernels.quantized_chain import BINARY_STEPS, ChainStep, QuantizedChain
from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, static_shape

_BINARY_OPS = {f"relax.{op}": op for op in BINARY_STEPS}


@dataclass
class OutputChain:
    """``end`` (the chain's quantize call) computes ``chain`` of ``kernel_call``'s output."""

    end: object
    kernel_call: object
    chain: QuantizedChain


def _scalar_constant(expr, dtype: str) -> float | int | None:
    value = constant_value(expr)
    if value is None:
        return None
    array = value.numpy()
    if array.size != 1 or str(array.dtype) != dtype:
        return None
    return array.reshape(()).item()


def _uses(func) -> dict:
    """How many times each variable is read (in call arguments, tuples, aliases and the function's
    result)."""
    from tvm import relax

    counts: dict = {}

    def read(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                read(field)
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                read(arg)
        elif isinstance(expr, relax.TupleGetItem):
            read(expr.tuple_value)

    for block in func.body.blocks:
        for binding in block.bindings:
            read(binding.value)
    read(func.body.body)
    return counts


def _qparams(call, float_dtype: str = "float32") -> tuple[float, int] | None:
    """(scale, zero point) of a quantize/dequantize call with scalar constants, else None."""
    scale = _scalar_constant(call.args[1], float_dtype)
    zero_value = constant_value(call.args[2])
    if scale is None or zero_value is None or zero_value.numpy().size != 1:
        return None
    zero = zero_value.numpy()
    return (scale, int(zero.reshape(()))) if zero.dtype.kind in "iu" else None


def _bindings(func) -> dict:
    from tvm import relax

    return {b.var: b.value for block in func.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)}


def _chains(func, private: bool = True):
    """(quantize call, its dequantize call, the steps, the chain's calls) of every chain in ``func``;
    ``private``: only chains whose values (the dequantized input too) nothing else reads."""
    from tvm import relax

    value_of = _bindings(func)
    uses = _uses(func)
    for end in value_of.values():
        if not (isinstance(end, relax.Call) and getattr(end.op, "name", "") == "relax.quantize"):
            continue
        if _qparams(end) is None or str(end.attrs.out_dtype) not in ("int8", "uint8") \
                or not isinstance(end.args[0], relax.Var):
            continue
        chain = _chain_of(end.args[0], value_of, uses if private else None, static_shape(end))
        if chain is not None:
            yield (end,) + chain


def divisions_as_products(mod):
    """``mod`` with each chain's division by a constant a product by its float32 reciprocal, and the
    chain's quantize(x, s, z) quantize(x * (1/s), 1, z): a float32 division costs several multiplies
    (HardSwish's ``/ 6`` and the quantize made the chain after a kernel cost as much as the kernel's
    epilogue), and a chain's float ops are the QDQ graph's own, not integer units: onnxruntime computes
    them in float with its own formulas too. Each result may differ from the division's by one rounding,
    which changes a quantized value only where it lies within that of a rounding tie. Run by the int8
    lowering on every chain, on and off the kernels, so that both compute the same."""
    from tvm import relax

    from sculpt.backends.tvm.kernels.relax_rewrite import rewrite_calls

    divisions, ends = [], []
    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            for end, _, _, calls in _chains(func, private=False):
                ends.append(end)
                divisions += [c for c in calls if getattr(c.op, "name", "") == "relax.divide"
                              and _scalar_constant(c.args[1], "float32") is not None]
    if not ends:
        return mod

    def reciprocal(expr):
        return relax.const(np.float32(1) / np.float32(_scalar_constant(expr, "float32")), "float32")

    def before(call, rewriter, visit):
        if any(call.same_as(d) for d in divisions):
            return relax.op.multiply(visit(call.args[0]), reciprocal(call.args[1]))
        if any(call.same_as(e) for e in ends):
            scaled = rewriter.emit(relax.op.multiply(visit(call.args[0]), reciprocal(call.args[1])))
            return relax.op.quantize(scaled, relax.const(np.float32(1), "float32"), call.args[2],
                                     axis=int(call.attrs.axis), out_dtype=str(call.attrs.out_dtype))
        return None

    return rewrite_calls(mod, lambda call, rewriter: None, before=before)


def output_chains(func, is_kernel: Callable[[object], bool]) -> list[OutputChain]:
    """The chains of the Relax function ``func`` whose input is a call_tir of a GlobalVar for which
    ``is_kernel`` holds (an int8 kernel with a quantized output), each read by nothing else."""
    from tvm import relax

    value_of = _bindings(func)
    uses = _uses(func)
    found = []
    for end, dequantize, steps, _ in _chains(func):
        out, dtype = _qparams(end), str(end.attrs.out_dtype)
        source = dequantize.args[0]
        producer = value_of.get(source) if isinstance(source, relax.Var) else None
        if not isinstance(producer, relax.Call) or uses.get(source, 0) != 1 \
                or getattr(producer.op, "name", "") != "relax.call_tir" or not is_kernel(producer.args[0]):
            continue
        in_scale, in_zero = _qparams(dequantize)
        found.append(OutputChain(end, producer, QuantizedChain(in_scale, in_zero, steps, out[0], out[1], dtype)))
    return found


def _chain_of(last, value_of: dict, uses: dict | None, shape) -> tuple[object, tuple[ChainStep, ...], list] | None:
    """(the dequantize call, the steps, the calls of the steps) computing ``last`` from one dequantized
    tensor of ``shape`` — with ``uses``, each value read only inside the chain; None when ``last`` is not
    such a chain."""
    from tvm import relax

    index: dict = {}  # chain variable -> value index (0: the dequantized input, i: step i - 1's result)
    steps: list[ChainStep] = []
    reads: dict = {}  # chain variable -> reads inside the chain
    dequantize = None

    def visit(var) -> int | None:
        nonlocal dequantize
        reads[var] = reads.get(var, 0) + 1
        if var in index:
            return index[var]
        value = value_of.get(var)
        if not isinstance(value, relax.Call) or static_shape(var) != shape or \
                str(getattr(var.ty, "dtype", "")) != "float32":
            return None
        name = getattr(value.op, "name", "")
        if name == "relax.dequantize":
            source = value.args[0]
            if dequantize is not None or _qparams(value) is None or str(value.attrs.out_dtype) != "float32" \
                    or not isinstance(source, relax.Var) or static_shape(source) != shape \
                    or str(source.ty.dtype) not in ("int8", "uint8"):
                return None
            dequantize = value
            index[var] = 0
            return 0
        operands = _step_operands(value, name)
        if operands is None:
            return None
        resolved = []
        for operand in operands:
            if isinstance(operand, relax.Var):
                i = visit(operand)
                if i is None:
                    return None
                resolved.append(i)
            else:
                resolved.append(operand)
        if name in _BINARY_OPS:
            steps.append(ChainStep(_BINARY_OPS[name], *resolved))
        elif name == "relax.nn.relu":  # topi: max(x, 0)
            steps.append(ChainStep("maximum", resolved[0], 0.0))
        else:  # clip, as topi computes it: max(min(x, hi), lo)
            steps.append(ChainStep("minimum", resolved[0], resolved[2]))
            steps.append(ChainStep("maximum", len(steps), resolved[1]))
        index[var] = len(steps)
        return len(steps)

    if visit(last) is None or dequantize is None:
        return None
    # every chain value is read only by the chain (the last by the quantize)
    if uses is not None and any(uses.get(var, 0) != reads[var] for var in index):
        return None
    return dequantize, tuple(steps), [value_of[var] for var in index if index[var] > 0]


def _step_operands(call, name: str) -> list | None:
    """The operands of an elementwise call the chain can hold: Vars and float32 scalar constants (as
    floats); clip's bounds after its tensor. None for any other call."""
    from tvm import relax

    if name in _BINARY_OPS:
        operands = []
        for arg in call.args:
            if isinstance(arg, relax.Var):
                operands.append(arg)
            else:
                c = _scalar_constant(arg, "float32")
                if c is None:
                    return None
                operands.append(float(c))
        return operands
    if name == "relax.nn.relu" and isinstance(call.args[0], relax.Var):
        return [call.args[0]]
    if name == "relax.clip" and isinstance(call.args[0], relax.Var):
        bounds = [getattr(a, "value", None) for a in call.args[1:3]]  # IntImm/FloatImm, or PrimValue of one
        bounds = [getattr(b, "value", b) for b in bounds]
        if any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in bounds):
            return None
        return [call.args[0], float(np.float32(bounds[0])), float(np.float32(bounds[1]))]
    return None
