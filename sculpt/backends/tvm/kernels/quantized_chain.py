"""An elementwise function of a quantized tensor, computed inside the int8 kernels' epilogue.

Between two int8 units a QDQ model often holds ``dequantize -> activation -> quantize`` (HardSwish,
ReLU6, PP-LCNet's learnable affine): as Relax ops that is one more function over the whole tensor,
reading and writing it, that runs after the kernel (on one thread when the tensor is small). A
:class:`QuantizedChain` is that function as data — the dequantization's scale and zero point, the float
steps over one tensor with scalar constants, the quantization's — and :meth:`QuantizedChain.apply`
writes it as the TIR expressions TVM's legalization of the same Relax ops gives (``dequantize``:
float32(q - zp) * scale; ``quantize``: clamp(round(x / scale) + zp); the binary ops in their order,
LLVM contracting a multiply and an add as it does there), so a kernel that applies it to its quantized
output stores what the Relax ops would have computed from it.

Mechanism only: which chains are folded into which kernel is the int8 lowering's choice."""

from __future__ import annotations

from dataclasses import dataclass

# the binary float ops a chain step may be (a value of the chain with a scalar constant, or two values)
BINARY_STEPS = ("add", "subtract", "multiply", "divide", "maximum", "minimum")


@dataclass(frozen=True)
class ChainStep:
    """``op(a, b)`` where each operand is an earlier value of the chain (its index: 0 is the dequantized
    input, i the result of step i - 1) or a float32 scalar constant."""

    op: str
    a: int | float
    b: int | float


def _is_value(operand) -> bool:
    return isinstance(operand, int) and not isinstance(operand, bool)


@dataclass(frozen=True)
class QuantizedChain:
    """quantize(steps(dequantize(q, in_scale, in_zero)), out_scale, out_zero) to ``out_dtype``; the
    result is the last step's (or the dequantized input when there are none)."""

    in_scale: float
    in_zero: int
    steps: tuple[ChainStep, ...]
    out_scale: float
    out_zero: int
    out_dtype: str

    def __post_init__(self):
        for i, step in enumerate(self.steps):
            if step.op not in BINARY_STEPS:
                raise ValueError(f"chain step {i}: {step.op!r} is not one of {BINARY_STEPS}")
            for operand in (step.a, step.b):
                if _is_value(operand) and not 0 <= operand <= i:
                    raise ValueError(f"chain step {i} reads value {operand}, not an earlier one")

    def apply(self, rounded, lanes: int, zero: int):
        """The chain on the quantized values ``rounded + zero`` (``rounded``: ``lanes`` float32 integers,
        the kernel's requantized output before its zero point ``zero``) as int32 lanes of ``out_dtype``'s
        range. The dequantization's float32(q - in_zero) is ``rounded + (zero - in_zero)``, exactly."""
        from tvm import tirx

        vec_i32 = f"int32x{lanes}"

        def f32(v: float):
            return tirx.Broadcast(tirx.FloatImm("float32", float(v)), lanes)

        def operand(o, values):
            return values[o] if _is_value(o) else f32(o)

        shifted = rounded if zero == self.in_zero else rounded + f32(zero - self.in_zero)
        x = shifted * f32(self.in_scale)
        values = [x]
        for step in self.steps:
            a, b = operand(step.a, values), operand(step.b, values)
            values.append({"add": lambda: a + b, "subtract": lambda: a - b, "multiply": lambda: a * b,
                           "divide": lambda: tirx.Div(a, b), "maximum": lambda: tirx.Max(a, b),
                           "minimum": lambda: tirx.Min(a, b)}[step.op]())
        lo, hi = (0, 255) if self.out_dtype == "uint8" else (-128, 127)
        rounded = tirx.round(tirx.Div(values[-1], f32(self.out_scale))) + f32(self.out_zero)
        return tirx.Cast(vec_i32, tirx.Max(tirx.Min(rounded, f32(hi)), f32(lo)))
