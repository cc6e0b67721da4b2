"""An ONNX graph as a differentiable PyTorch module, one initializer ↔ one parameter.

``GraphModule(model, trainable)`` runs the graph's nodes in their order with ``torch`` operations;
the float initializers named in ``trainable`` become ``nn.Parameter``s (the others stay constant
tensors), so that trained values can be written back into the *same* initializers of the *same*
graph (:meth:`GraphModule.trained_values`). Nothing is rebuilt: the ONNX graph stays the source of
truth for structure, the module only evaluates it.

Supported: the operators sculpt's passes produce and the PP-OCR / backend-test models use (see
``_HANDLERS``). Anything else is refused up front, in one line naming the operator and the node
(:class:`UnconvertibleModelError`). :func:`check_against_onnxruntime` compares the module with
onnxruntime on given inputs before any training relies on it.

Imports torch: only import this module after :func:`sculpt.training.require_torch`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from sculpt.errors import SculptError
from sculpt.ir.model import Model, constant_node_value

CONVERSION_RTOL = 1e-4  # max |torch - onnxruntime| / max |onnxruntime| per output, before training


class UnconvertibleModelError(SculptError):
    """The graph holds an operator (or an attribute of one) the converter does not support."""


# inputs of each op that carry trainable float weights (index → trainable); others are never trained
TRAINABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Add": (0, 1), "Sub": (0, 1),
    "Mul": (0, 1), "Div": (0, 1), "BatchNormalization": (1, 2, 3, 4), "PRelu": (1,),
    "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
}

_ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.INT16: torch.int16,
}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


class _Node:
    """One node ready to run: its handler, attributes and input/output names."""

    def __init__(self, node: onnx.NodeProto, handler: Callable, opset: int):
        self.name = node.name or f"{node.op_type}({', '.join(node.output)})"
        self.op_type = node.op_type
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self.attrs = _attrs(node)
        self.opset = opset
        self.handler = handler


class GraphModule(torch.nn.Module):
    """The graph ``model`` as a module. ``forward(feeds)`` takes {input name: tensor} and returns
    {name: tensor} for the graph outputs and the names in ``extra_outputs``."""

    def __init__(self, model: Model, trainable: Iterable[str] = ()):
        super().__init__()
        graph = model.graph
        opset = next((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.input_names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        self.output_names = [o.name for o in graph.output]
        self.nodes: list[_Node] = []
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise UnconvertibleModelError(f"cannot train through operator '{node.domain}.{node.op_type}' "
                                              f"(node '{node.name}'): not an ONNX operator")
            handler = _HANDLERS.get(node.op_type)
            if handler is None or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
                raise UnconvertibleModelError(f"cannot train through operator '{node.op_type}' (node '{node.name}'): "
                                              "the PyTorch converter does not support it")
            if node.op_type == "Constant":
                self.nodes.append(_Node(node, handler, opset))
                self.nodes[-1].attrs = {"value": constant_node_value(node)}
                continue
            self.nodes.append(_Node(node, handler, opset))
        trainable = set(trainable)
        self.parameter_names: list[str] = []
        self.weights = torch.nn.ParameterList()
        self.constants: dict[str, torch.Tensor] = {}
        # integer weights behind a DequantizeLinear train as their float value, fake-quantized (round
        # with a straight-through gradient, scale and zero point fixed) and written back as integers
        self.quantized: dict[str, _QuantizedWeight] = quantized_weights(model)
        for t in graph.initializer:
            value = torch.from_numpy(np.array(numpy_helper.to_array(t)))
            if t.name in trainable and t.name in self.quantized:
                self.weights.append(torch.nn.Parameter(self.quantized[t.name].dequantize(value)))
                self.parameter_names.append(t.name)
            elif t.name in trainable:
                if not value.is_floating_point():
                    raise UnconvertibleModelError(f"initializer '{t.name}' is not a float tensor and cannot train")
                self.weights.append(torch.nn.Parameter(value.float()))
                self.parameter_names.append(t.name)
            else:
                self.constants[t.name] = value.float() if value.dtype == torch.float64 else value
        self.extra_outputs: list[str] = []

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env = self.initializer_values()
        env.update(feeds)
        for node in self.nodes:
            args = [env[name] if name else None for name in node.inputs]
            try:
                outs = node.handler(node, *args)
            except UnconvertibleModelError:
                raise
            except Exception as e:  # a shape or type the handler does not cover: say which node
                raise UnconvertibleModelError(f"cannot train through operator '{node.op_type}' (node '{node.name}'): "
                                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            if isinstance(outs, torch.Tensor):
                outs = [outs]
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
        return {name: env[name] for name in self.output_names + self.extra_outputs}

    def initializer_values(self) -> dict[str, torch.Tensor]:
        """{initializer name: the tensor the graph reads}: constants, and the parameters (a quantized
        weight's fake integers)."""
        env: dict[str, torch.Tensor] = dict(self.constants)
        for name, p in zip(self.parameter_names, self.weights):
            env[name] = self.quantized[name].fake_integers(p) if name in self.quantized else p
        return env

    def trained_values(self) -> dict[str, np.ndarray]:
        """{initializer name: its current value} for the trainable initializers (integers, in the
        initializer's element type, for a quantized weight)."""
        out = {}
        with torch.no_grad():
            for name, p in zip(self.parameter_names, self.weights):
                q = self.quantized.get(name)
                out[name] = (q.integers(p) if q is not None else p.detach().cpu().numpy()).copy()
        return out


class _QuantizedWeight:
    """An integer initializer read only by DequantizeLinear (input 0), with constant scale and zero point."""

    def __init__(self, scale: np.ndarray, zero_point: np.ndarray, axis: int, dtype: np.dtype, rank: int):
        info = np.iinfo(dtype)
        self.low, self.high, self.dtype = float(info.min), float(info.max), dtype
        shape = [1] * rank
        if scale.ndim == 1 and rank:
            shape[axis % rank] = -1
        self.scale = torch.from_numpy(scale.astype(np.float32).reshape(shape if scale.ndim == 1 else scale.shape))
        self.zero = torch.from_numpy(zero_point.astype(np.float32).reshape(self.scale.shape))

    def dequantize(self, value: torch.Tensor) -> torch.Tensor:
        return (value.float() - self.zero) * self.scale

    def fake_integers(self, w: torch.Tensor) -> torch.Tensor:
        """round(w / scale) + zero point, clamped to the integer range; gradient straight through."""
        x = w / self.scale + self.zero
        return torch.clamp(x + (torch.round(x) - x).detach(), self.low, self.high)

    def integers(self, w: torch.Tensor) -> np.ndarray:
        return torch.clamp(torch.round(w / self.scale + self.zero), self.low, self.high).cpu().numpy().astype(self.dtype)


def quantized_weights(model: Model) -> dict[str, _QuantizedWeight]:
    """The integer initializers every reader of which is a DequantizeLinear (as input 0) with constant
    scale and zero point (the int8 weights of a QDQ model; int32 biases included)."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, k))
    out = {}
    for name, t in inits.items():
        if t.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32):
            continue
        uses = readers.get(name, [])
        if not uses or any(n.op_type != "DequantizeLinear" or k != 0 for n, k in uses):
            continue
        node = uses[0][0]
        if len(node.input) < 2 or node.input[1] not in inits or (len(node.input) > 2 and node.input[2]
                                                                   and node.input[2] not in inits):
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else \
            np.zeros_like(scale, dtype=np.int32)
        axis = _attrs(node).get("axis", 1)
        value = numpy_helper.to_array(t)
        out[name] = _QuantizedWeight(scale, zp, axis, value.dtype, value.ndim)
    return out


def trainable_initializers(model: Model) -> list[str]:
    """The float initializers every use of which is a weight slot of ``TRAINABLE_INPUTS`` (not a
    shape, a scale of Resize, a bound of Clip...), and the integer weights behind a DequantizeLinear
    (trained fake-quantized), in graph order."""
    quantized = quantized_weights(model)
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, k))
    graph_outputs = {o.name for o in model.graph.output}
    names = []
    for t in model.graph.initializer:
        if t.name in quantized and t.name not in graph_outputs:
            names.append(t.name)
            continue
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) or t.name in graph_outputs:
            continue
        used = uses.get(t.name, [])
        if used and all(k in TRAINABLE_INPUTS.get(op, ()) for op, k in used):
            names.append(t.name)
    return names


def check_against_onnxruntime(module: GraphModule, model: Model, samples: Sequence[Mapping[str, np.ndarray]],
                              rtol: float = CONVERSION_RTOL) -> float:
    """The largest relative error (max |torch - ort| / max |ort| per output) of the module against
    onnxruntime on ``samples``; UnconvertibleModelError above ``rtol``.

    A QDQ graph is compared with its own arithmetic (onnxruntime unoptimized). Where the outputs differ
    by more than ``rtol``, the graph is checked node by node instead (:func:`node_by_node_error`), and
    the value returned is then the node-by-node error: in a QDQ graph one quantizer that rounds an
    element at a .5 tie the other way (PyTorch and onnxruntime sum a conv's products in different
    orders) moves it one step and the later quantizers grow that step far beyond ``rtol``; in a deep
    float graph the two runtimes' rounding differences add up along the chain (PP-OCRv4 rec after a
    whole-graph CP factorization: 1.03e-4) while every node is right."""
    from sculpt.runtime import make_session

    # the fused int8 kernels onnxruntime runs by default requantize in fixed point and differ from the
    # graph's arithmetic by more than 1e-4
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    session = make_session(model, optimize=not quantized)
    worst = 0.0
    with torch.no_grad():
        for sample in samples:
            expected = dict(zip(module.output_names, session.run(module.output_names, dict(sample))))
            got = module({k: torch.from_numpy(np.asarray(v)) for k, v in sample.items()})
            for name in module.output_names:
                err = _relative_error(name, got[name], expected[name])
                worst = max(worst, err)
    if worst <= rtol or not samples:
        return worst
    return max(node_by_node_error(module, model, sample, rtol) for sample in samples)


def _relative_error(name: str, got: torch.Tensor, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected| (0 where both are the same non-finite values)."""
    ref = np.asarray(expected, dtype=np.float64)
    out = got.detach().double().numpy()
    if out.shape != ref.shape:
        raise UnconvertibleModelError(f"the PyTorch conversion gives '{name}' the shape {list(out.shape)}, "
                                      f"onnxruntime {list(ref.shape)}")
    if not ref.size:
        return 0.0
    err = float(np.abs(out - ref).max()) / max(float(np.abs(ref).max()), 1e-12)
    if not np.isfinite(err) and np.array_equal(np.isfinite(out), np.isfinite(ref)):
        err = 0.0
    return err


def node_by_node_error(module: GraphModule, model: Model, sample: Mapping[str, np.ndarray],
                       rtol: float = CONVERSION_RTOL) -> float:
    """Every node of the module evaluated on onnxruntime's own values of its inputs (the graph run
    unoptimized, every tensor exposed) and compared with onnxruntime's value of its outputs: float
    outputs within ``rtol`` of their largest magnitude, integer ones equal — except a QuantizeLinear's,
    which may be one step off where onnxruntime's x / scale lies within ROUNDING_TIE_TOLERANCE of a
    rounding tie. Returns the largest float error; UnconvertibleModelError naming the first node that
    differs otherwise."""
    from sculpt.runtime import make_session
    from sculpt.runtime.compare import ROUNDING_TIE_TOLERANCE, rounding_tie_distance

    names = [o for node in model.graph.node for o in node.output if o]
    session = make_session(model, optimize=False, extra_outputs=names)
    values = dict(zip(names, session.run(names, dict(sample))))
    env = module.initializer_values()
    env.update({k: torch.from_numpy(np.asarray(v)) for k, v in sample.items()})
    env.update({k: torch.from_numpy(np.array(v)) for k, v in values.items()})  # teacher-forced
    worst = 0.0
    with torch.no_grad():
        for node in module.nodes:
            outs = node.handler(node, *[env[name] if name else None for name in node.inputs])
            outs = [outs] if isinstance(outs, torch.Tensor) else outs
            for name, got in zip(node.outputs, outs):
                if not name or name not in values:
                    continue
                want = values[name]
                if np.issubdtype(want.dtype, np.floating):
                    err = _relative_error(name, got, want)
                    if err > rtol:
                        raise UnconvertibleModelError(
                            f"the PyTorch conversion of node '{node.name}' ({node.op_type}) differs from onnxruntime "
                            f"on '{name}' by {err:.3g} (max |a-b| / max |b|) > {rtol:g}, on onnxruntime's inputs")
                    worst = max(worst, err)
                    continue
                steps = np.abs(got.detach().double().numpy() - want.astype(np.float64))
                off = steps > 0
                if not off.any():
                    continue
                allowed = node.op_type == "QuantizeLinear" and steps.max() <= 1
                if allowed:
                    x, scale = (env[k].detach().numpy() for k in node.inputs[:2])
                    distance = rounding_tie_distance(x, scale, node.attrs.get("axis", 1))
                    allowed = bool((distance[off] <= ROUNDING_TIE_TOLERANCE).all())
                if not allowed:
                    raise UnconvertibleModelError(
                        f"the PyTorch conversion of node '{node.name}' ({node.op_type}) differs from onnxruntime "
                        f"on '{name}': {int(off.sum())} of {off.size} values up to {steps.max():g} off, on "
                        "onnxruntime's inputs")
    return worst


# ------------------------------------------------------------------------------------------ ops
def _pads_for(node: _Node, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for a conv/pool node, auto_pad resolved on ``x``."""
    a = node.attrs
    nd = len(kernel)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(a.get("pads", [0] * (2 * nd)))


def _torch_padding(pads: list[int]) -> tuple[list[int] | None, list[int]]:
    """(symmetric padding for torch, or None) and F.pad's list for the asymmetric case."""
    nd = len(pads) // 2
    begin, end = pads[:nd], pads[nd:]
    if begin == end:
        return begin, []
    fpad = []
    for i in reversed(range(nd)):
        fpad += [begin[i], end[i]]
    return None, fpad


def _conv(node, x, w, b=None):
    a = node.attrs
    nd = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    sym, fpad = _torch_padding(_pads_for(node, x, kernel, strides, dil))
    if sym is None:
        x, sym = F.pad(x, fpad), [0] * nd
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, strides, sym, dil, a.get("group", 1))


def _conv_transpose(node, x, w, b=None):
    a = node.attrs
    nd = w.dim() - 2
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    if "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnconvertibleModelError(f"cannot train through operator 'ConvTranspose' (node '{node.name}'): "
                                      "output_shape / auto_pad are not supported")
    pads = list(a.get("pads", [0] * (2 * nd)))
    if pads[:nd] != pads[nd:]:
        raise UnconvertibleModelError(f"cannot train through operator 'ConvTranspose' (node '{node.name}'): "
                                      "asymmetric pads are not supported")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return conv(x, w, b, strides, pads[:nd], list(a.get("output_padding", [0] * nd)), a.get("group", 1), dil)


def _gemm(node, a_, b_, c=None):
    a = node.attrs
    if a.get("transA", 0):
        a_ = a_.transpose(0, 1)
    if a.get("transB", 0):
        b_ = b_.transpose(0, 1)
    y = a.get("alpha", 1.0) * (a_ @ b_)
    if c is not None:
        y = y + a.get("beta", 1.0) * c
    return y


def _pool(node, x, kind: str):
    a = node.attrs
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    ceil = bool(a.get("ceil_mode", 0))
    sym, fpad = _torch_padding(_pads_for(node, x, kernel, strides, dil))
    if kind == "max":
        if sym is None:
            x, sym = F.pad(x, fpad, value=-math.inf), [0] * nd
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return pool(x, kernel, strides, sym, dil, ceil_mode=ceil)
    include = bool(a.get("count_include_pad", 0))
    if sym is None:
        if not include:
            raise UnconvertibleModelError(f"cannot train through operator 'AveragePool' (node '{node.name}'): "
                                          "asymmetric pads without count_include_pad are not supported")
        x, sym = F.pad(x, fpad), [0] * nd
    if any(p * 2 > k for p, k in zip(sym, kernel)):
        raise UnconvertibleModelError(f"cannot train through operator 'AveragePool' (node '{node.name}'): "
                                      "pads larger than half the kernel")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return pool(x, kernel, strides, sym, ceil, include)


def _softmax(node, x, log: bool = False):
    fn = torch.log_softmax if log else torch.softmax
    axis = node.attrs.get("axis", -1 if node.opset >= 13 else 1)
    axis = axis % x.dim()
    if node.opset >= 13:
        return fn(x, axis)
    shape = x.shape
    flat = x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1)
    return fn(flat, 1).reshape(shape)


def _batchnorm(node, x, scale, bias, mean, var, *_):
    eps = node.attrs.get("epsilon", 1e-5)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean.reshape(shape)) * (scale.reshape(shape) / torch.sqrt(var.reshape(shape) + eps)) + bias.reshape(shape)


def _clip(node, x, lo=None, hi=None):
    if node.opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        return torch.clamp(x, lo, hi)
    return torch.clamp(x, lo.item() if lo is not None else None, hi.item() if hi is not None else None)


def _axes(node, axes_input=None, attr: str = "axes"):
    if axes_input is not None:
        return _ints(axes_input)
    return list(node.attrs[attr]) if attr in node.attrs else None


def _reduce(fn):
    def run(node, x, axes=None):
        ax = _axes(node, axes if node.opset >= (18 if fn is not torch.sum else 13) else None)
        keep = bool(node.attrs.get("keepdims", 1))
        if not ax:
            if node.attrs.get("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        if fn is torch.amax:
            return torch.amax(x, dim=ax, keepdim=keep)
        return fn(x, dim=ax, keepdim=keep)
    return run


def _squeeze(node, x, axes=None):
    ax = _axes(node, axes)
    if ax is None:
        return x.squeeze()
    ax = sorted((a % x.dim() for a in ax), reverse=True)
    for a in ax:
        x = x.squeeze(a)
    return x


def _unsqueeze(node, x, axes=None):
    ax = _axes(node, axes)
    rank = x.dim() + len(ax)
    for a in sorted(a % rank for a in ax):
        x = x.unsqueeze(a)
    return x


def _slice(node, x, starts=None, ends=None, axes=None, steps=None):
    if node.opset < 10:
        starts, ends, axes = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        n = x.shape[a]
        if st > 0:
            s = min(max(s + n if s < 0 else s, 0), n)
            e = min(max(e + n if e < 0 else e, 0), n)
            index[a] = slice(s, e, st)
        else:  # negative step: slice forwards, then flip
            s = min(max(s + n if s < 0 else s, -1), n - 1)
            e = min(max(e + n if e < 0 else e, -1), n - 1)
            idx = torch.arange(s, e, st, device=x.device)
            x = x.index_select(a, idx)
            index[a] = slice(None)
    return x[tuple(index)]


def _pad(node, x, pads=None, value=None, axes=None):
    if node.opset < 11:
        pads, value = node.attrs["pads"], node.attrs.get("value", 0.0)
    pads = _ints(pads)
    value = float(value.item()) if isinstance(value, torch.Tensor) and value.numel() else float(value or 0.0)
    mode = node.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rank = x.dim()
    ax = _ints(axes) if axes is not None else list(range(rank))
    n = len(ax)
    full = [0] * (2 * rank)
    for i, a in enumerate(ax):
        full[a % rank], full[rank + a % rank] = pads[i], pads[n + i]
    fpad = []
    for i in reversed(range(rank)):
        fpad += [full[i], full[rank + i]]
    if mode != "constant":
        while fpad and fpad[-1] == 0 and fpad[-2] == 0 and len(fpad) > 2 * (rank - 2):
            fpad = fpad[:-2]
        return F.pad(x, fpad, mode={"reflect": "reflect", "edge": "replicate"}[mode])
    return F.pad(x, fpad, value=value)


def _resize(node, x, roi=None, scales=None, sizes=None):
    a = node.attrs
    if node.opset < 11:  # Upsample / Resize-10: (x, scales)
        scales, sizes = roi, None
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = a.get("coordinate_transformation_mode", b"half_pixel" if node.opset >= 11 else b"asymmetric")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    if sizes is not None and sizes.numel():
        out = _ints(sizes)[2:]
    else:
        sc = [float(s) for s in scales.tolist()]
        if sc[:2] != [1.0, 1.0]:
            raise UnconvertibleModelError(f"cannot train through operator 'Resize' (node '{node.name}'): "
                                          "only spatial scales are supported")
        out = [int(math.floor(n * s)) for n, s in zip(x.shape[2:], sc[2:])]
    if mode == "nearest":
        nearest = a.get("nearest_mode", b"round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if ctm == "asymmetric" and nearest == "floor":
            return F.interpolate(x, size=out, mode="nearest")
        if ctm in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "round_prefer_floor"):
            if all(o % n == 0 for o, n in zip(out, x.shape[2:])):  # integer upsampling: exact
                return F.interpolate(x, size=out, mode="nearest-exact")
        if node.opset < 11 or (ctm == "asymmetric" and nearest != "ceil"):
            return F.interpolate(x, size=out, mode="nearest")
    elif mode == "linear" and x.dim() in (3, 4):
        torch_mode = "linear" if x.dim() == 3 else "bilinear"
        if ctm == "align_corners":
            return F.interpolate(x, size=out, mode=torch_mode, align_corners=True)
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, size=out, mode=torch_mode, align_corners=False)
    raise UnconvertibleModelError(f"cannot train through operator 'Resize' (node '{node.name}'): mode '{mode}' with "
                                  f"coordinate_transformation_mode '{ctm}' is not supported")


def _reshape(node, x, shape=None):
    target = _ints(shape) if shape is not None else list(node.attrs["shape"])
    allow_zero = node.attrs.get("allowzero", 0)
    if not allow_zero:
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _flatten(node, x):
    axis = node.attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _gather(node, x, idx):
    axis = node.attrs.get("axis", 0) % x.dim()
    idx = idx.long()
    flat = torch.where(idx < 0, idx + x.shape[axis], idx).reshape(-1)
    out = x.index_select(axis, flat)
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _split(node, x, split=None):
    axis = node.attrs.get("axis", 0) % x.dim()
    if split is None:
        split = node.attrs.get("split")
    if split is None:
        n = len(node.outputs)
        size = x.shape[axis]
        chunk = -(-size // n)
        sizes = [min(chunk, size - k * chunk) for k in range(n)]
    else:
        sizes = _ints(split)
    return list(torch.split(x, sizes, dim=axis))


def _cast(node, x):
    to = _ONNX_TO_TORCH_DTYPE.get(node.attrs["to"])
    if to is None:
        raise UnconvertibleModelError(f"cannot train through operator 'Cast' (node '{node.name}'): "
                                      f"element type {node.attrs['to']}")
    return x.to(to)


def _constant(node):
    value = node.attrs["value"]
    t = torch.from_numpy(np.array(value))
    return t.float() if t.dtype == torch.float64 else t


def _concat(node, *xs):
    xs = [x for x in xs if x is not None]
    dtype = xs[0].dtype
    return torch.cat([x.to(dtype) for x in xs], dim=node.attrs["axis"])


def _expand(node, x, shape):
    target = _ints(shape)
    rank = max(len(target), x.dim())
    target = [1] * (rank - len(target)) + target
    current = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(current).expand([max(t, c) if t == 1 or c == 1 else t for t, c in zip(target, current)])


def _binary(fn):
    def run(node, a, b):
        return fn(a, b)
    return run


def _div(node, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _hardsigmoid(node, x):
    alpha = node.attrs.get("alpha", 0.2)
    beta = node.attrs.get("beta", 0.5)
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def _matmul(node, a, b):
    return torch.matmul(a, b)


def _transpose(node, x):
    perm = node.attrs.get("perm")
    return x.permute(list(perm)) if perm is not None else x.permute(list(reversed(range(x.dim()))))


def _unary(fn):
    def run(node, x):
        return fn(x)
    return run


def _layernorm(node, x, scale, bias=None):
    axis = node.attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, list(x.shape[axis:]), scale, bias, node.attrs.get("epsilon", 1e-5))


def _instancenorm(node, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attrs.get("epsilon", 1e-5))


def _quantize_linear(node, x, scale, zero_point=None):
    """Fake quantization: the integers as float values (round with a straight-through gradient,
    clamped to the zero point's type), so that gradients flow to what came before."""
    dtype = zero_point.dtype if zero_point is not None else torch.uint8
    info = torch.iinfo(dtype)
    zp = zero_point.float() if zero_point is not None else torch.zeros(())
    scale, zp = _per_axis(node, x, scale), _per_axis(node, x, zp)
    q = x / scale + zp
    return torch.clamp(q + (torch.round(q) - q).detach(), float(info.min), float(info.max))


def _dequantize_linear(node, x, scale, zero_point=None):
    zp = zero_point.float() if zero_point is not None else torch.zeros(())
    return (x.float() - _per_axis(node, x, zp)) * _per_axis(node, x, scale)


def _per_axis(node, x, v):
    if v.dim() != 1 or x.dim() == 0:
        return v.float()
    shape = [1] * x.dim()
    shape[node.attrs.get("axis", 1) % x.dim()] = -1
    return v.float().reshape(shape)


_HANDLERS: dict[str, Callable] = {
    "QuantizeLinear": _quantize_linear,
    "DequantizeLinear": _dequantize_linear,
    "Constant": _constant,
    "Identity": _unary(lambda x: x),
    "Dropout": lambda node, x, *_: x,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Relu": _unary(torch.relu),
    "LeakyRelu": lambda node, x: F.leaky_relu(x, node.attrs.get("alpha", 0.01)),
    "PRelu": lambda node, x, slope: torch.where(x >= 0, x, x * slope),
    "Clip": _clip,
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hardsigmoid,
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Softmax": _softmax,
    "LogSoftmax": lambda node, x: _softmax(node, x, log=True),
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "InstanceNormalization": _instancenorm,
    "MaxPool": lambda node, x: _pool(node, x, "max"),
    "AveragePool": lambda node, x: _pool(node, x, "avg"),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=list(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: torch.amax(x, dim=list(range(2, x.dim())), keepdim=True)),
    "Resize": _resize,
    "Upsample": _resize,
    "Concat": _concat,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Slice": _slice,
    "Pad": _pad,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "Shape": lambda node, x: torch.tensor(list(x.shape), dtype=torch.int64)[
        slice(node.attrs.get("start", 0), node.attrs.get("end"))],
    "Cast": _cast,
    "Gather": _gather,
    "Split": _split,
    "Expand": _expand,
}


def supported_operators() -> list[str]:
    return sorted(_HANDLERS)
