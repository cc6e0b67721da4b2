"""LSTM, GRU and RNN for the TVM import: an LSTM or GRU as a loop over time (the default, ``"loop"``), or
each node unrolled over its static sequence length (``"unroll"``; RNN always).

Loop (:func:`lower_recurrent`, :class:`_LoopLowering`): the node's input projection of every step and
direction becomes one MatMul + Add, the recurrence one ``SculptRecurrentLoop`` node that the importer turns into
a TIR function with a serial loop over time (:mod:`sculpt.backends.tvm.recurrent_loop`). Measured
(tools/bench_recurrent.py, 1 thread): never slower than unrolling, 1.6-2.6x faster from 100 steps on,
level at hidden 512 (memory-bound), and its compile time does not grow with the sequence (2 s vs 80 s
at 200 steps): the default for every sequence length.

Unroll:

TVM 0.27's Relax ONNX importer has no converter for the recurrent ops. Before the import, every
LSTM/GRU/RNN node is replaced by the ONNX ops it computes, one time step after the other: the input
projection of all steps in one MatMul, then per step one MatMul with the recurrent weights, a Split
into the gates, the gate activations (ONNX's defaults or the node's ``activations``, with
``activation_alpha``/``activation_beta``), and Mul/Add for the state update. Every variant of the
ONNX operators is covered: forward, reverse and bidirectional, ``sequence_lens`` (constant or a
graph input: steps past a sequence's length keep its state and output zeros), initial states,
peepholes, ``clip``, LSTM's ``input_forget``, GRU's ``linear_before_reset`` and ``layout=1``.

The result is still an ONNX model (checked against onnxruntime in the tests), so TVM's importer and
sculpt's kernel pipeline see only MatMul, Add, Mul, Sub, Split, Reshape, Concat and the
activations. The weights (W, R, B, P) must be constants; the sequence length must be static.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from sculpt.backends.tvm.recurrent_loop import (LOOP_DOMAIN, LOOP_OP, LoopActivation, LoopConfig,
                                                 tiled_recurrent_weights)
from sculpt.backends.tvm.relax_import import TVMImportError
from sculpt.ir.model import Model

# gates per op in ONNX's order (LSTM: i o f c, GRU: z r h, RNN: one), activations per direction
RECURRENT_OPS = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# activations that take alpha / beta, with ONNX's defaults
_ALPHA_DEFAULTS = {"affine": 1.0, "leakyrelu": 0.01, "thresholdedrelu": 1.0, "scaledtanh": 1.0,
                   "hardsigmoid": 0.2, "elu": 1.0}
_BETA_DEFAULTS = {"affine": 0.0, "scaledtanh": 1.0, "hardsigmoid": 0.5}
_SIMPLE_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "softsign": "Softsign",
                       "softplus": "Softplus"}


class RecurrentImportError(TVMImportError):
    """A recurrent node sculpt cannot unroll (weights not constant, unknown sequence length, ...)."""


def has_recurrent_nodes(model: Model) -> bool:
    return any(n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node)


RECURRENT_MODES = ("unroll", "loop")
DEFAULT_RECURRENT_MODE = "loop"


def lower_recurrent(model: Model, mode: str | None = None) -> int:
    """Replace every LSTM/GRU/RNN node of ``model`` (in place) by what TVM's importer takes. ``mode``
    (default DEFAULT_RECURRENT_MODE): ``"unroll"``, every step as ONNX ops; ``"loop"``, an LSTM's or GRU's
    input projection as one MatMul and its recurrence as one ``SculptRecurrentLoop`` node, converted while
    :class:`sculpt.backends.tvm.recurrent_loop.loop_converters` is active into a TIR function with a
    serial loop over time (RNN is unrolled). Returns the number of nodes replaced."""
    mode = mode or DEFAULT_RECURRENT_MODE
    if mode not in RECURRENT_MODES:
        raise RecurrentImportError(f"unknown recurrent mode '{mode}' (choose from {', '.join(RECURRENT_MODES)})")
    if mode == "unroll":
        return unroll_recurrent(model)
    count = _replace_recurrent_nodes(model, lambda op: _LoopLowering if op in ("LSTM", "GRU") else _Unroller)
    if not any(o.domain == LOOP_DOMAIN for o in model.proto.opset_import) and has_loop_nodes(model):
        model.proto.opset_import.append(onnx.helper.make_opsetid(LOOP_DOMAIN, 1))
    return count


def has_loop_nodes(model: Model) -> bool:
    return any(n.op_type == LOOP_OP and n.domain == LOOP_DOMAIN for n in model.graph.node)


def unroll_recurrent(model: Model) -> int:
    """Replace every LSTM/GRU/RNN node of ``model`` (in place) by its unrolled ONNX ops. Returns the
    number of nodes replaced. Shapes must be known (run shape inference with static inputs first)."""
    return _replace_recurrent_nodes(model, lambda op: _Unroller)


def _replace_recurrent_nodes(model: Model, lowering_for) -> int:
    """Each LSTM/GRU/RNN node removed and lowered by ``lowering_for(op_type)(model, node).run()``."""
    targets = [n for n in model.graph.node if n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx")]
    if not targets:
        return 0
    with model.indexed():
        for node in targets:
            original = onnx.NodeProto()
            original.CopyFrom(node)
            model.remove_node(node)  # first: its outputs get their new producers
            lowering_for(original.op_type)(model, original).run()
    model.topological_sort()  # the new nodes were appended after their readers
    model.remove_unused()  # the original weights (now transposed copies)
    return len(targets)


@dataclass
class _Activation:
    name: str  # lower case
    alpha: float | None
    beta: float | None


class _Unroller:
    """The ops of one recurrent node, appended to the model under names derived from the node's."""

    def __init__(self, model: Model, node: onnx.NodeProto):
        self.model, self.node = model, node
        self.opset = model.opset
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.prefix = node.name or f"{node.op_type}_{node.output[0] or node.output[-1]}"
        # the names in use, read once: an unrolled node adds thousands of tensors, and asking the graph
        # index for each would cost a scan per name where the index checks itself (SCULPT_CHECK_INDEX)
        graph = model.graph
        self.taken = {v.name for v in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]}
        for other in graph.node:
            self.taken.update(other.output)
            self.taken.add(other.name)
        self.count = 0

    # ---------------------------------------------------------------- emitting ops
    def fail(self, message: str):
        raise RecurrentImportError(f"{self.node.op_type} '{self.node.name}': {message}")

    def fresh(self, kind: str) -> str:
        """A name no tensor or node of the model has: ``<node>/<kind><n>``."""
        while True:
            self.count += 1
            name = f"{self.prefix}/{kind}{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        name = out or self.fresh(op_type)
        node = onnx.helper.make_node(op_type, inputs, [name], name=self.fresh(op_type) if out else name, **attrs)
        self.model.append_node(node)
        return name

    def const(self, value, dtype=np.float32) -> str:
        name = self.fresh("const")
        self.model.append_initializer(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        """``x`` cut along ``axis`` into pieces of ``sizes`` (one Split: the split sizes are an
        attribute before opset 13, an input from 13 on; TVM's Slice converter takes only the input form
        of opset 10+)."""
        if len(sizes) == 1:
            return [x]
        outs = [self.fresh("Split") for _ in sizes]
        if self.opset >= 13:
            node = onnx.helper.make_node("Split", [x, self.const(sizes, np.int64)], outs, name=outs[0], axis=axis)
        else:
            node = onnx.helper.make_node("Split", [x], outs, name=outs[0], axis=axis, split=list(sizes))
        self.model.append_node(node)
        return outs

    def steps_of(self, x: str, count: int, width: int) -> list[str]:
        """The ``count`` slices x[i] of a [count, B, width] tensor, each as [B, width]."""
        shape = self.const([-1, width], np.int64)
        return [self.op("Reshape", [part, shape]) for part in self.split(x, [1] * count, 0)]

    def initial_state(self, name: str, directions: int, hidden: int) -> list[str | None]:
        """Per direction the [B, hidden] initial state; None where it is zero (no input, or a zero
        constant, as exporters write it: the first step then skips its recurrent MatMul)."""
        if not name:
            return [None] * directions
        value = self.model.get_constant(name)
        if value is None:
            return self.steps_of(name, directions, hidden)
        value = value.astype(np.float32)
        return [None if not np.any(value[d]) else self.const(value[d]) for d in range(directions)]

    def clip(self, x: str) -> str:
        bound = self.attrs.get("clip")
        if bound is None:
            return x
        if self.opset >= 11:
            return self.op("Clip", [x, self.const(-bound), self.const(bound)])
        return self.op("Clip", [x], min=-float(bound), max=float(bound))

    def add(self, a: str | None, b: str | None) -> str | None:
        return b if a is None else a if b is None else self.op("Add", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def activate(self, act: _Activation, x: str) -> str:
        name = act.name
        if name in _SIMPLE_ACTIVATIONS:
            return self.op(_SIMPLE_ACTIVATIONS[name], [x])
        if name == "leakyrelu":
            return self.op("LeakyRelu", [x], alpha=act.alpha)
        if name == "thresholdedrelu":
            return self.op("ThresholdedRelu", [x], alpha=act.alpha)
        if name == "elu":
            return self.op("Elu", [x], alpha=act.alpha)
        if name == "hardsigmoid":
            return self.op("HardSigmoid", [x], alpha=act.alpha, beta=act.beta)
        if name == "affine":
            return self.op("Add", [self.op("Mul", [x, self.const(act.alpha)]), self.const(act.beta)])
        if name == "scaledtanh":
            return self.op("Mul", [self.op("Tanh", [self.op("Mul", [x, self.const(act.beta)])]), self.const(act.alpha)])
        self.fail(f"activation '{act.name}' is not one of ONNX's")

    # ---------------------------------------------------------------- reading the node
    def input_name(self, index: int) -> str:
        return self.node.input[index] if index < len(self.node.input) else ""

    def constant(self, index: int, what: str) -> np.ndarray | None:
        name = self.input_name(index)
        if not name:
            return None
        value = self.model.get_constant(name)
        if value is None:
            self.fail(f"{what} ('{name}') must be a constant to unroll the node for TVM")
        return value.astype(np.float32)

    def activations(self, directions: int) -> list[list[_Activation]]:
        per_direction = len(_DEFAULT_ACTIVATIONS[self.node.op_type])
        names = [a.decode() if isinstance(a, bytes) else str(a) for a in self.attrs.get("activations", [])]
        if not names:
            names = _DEFAULT_ACTIVATIONS[self.node.op_type] * directions
        if len(names) != per_direction * directions:
            self.fail(f"{len(names)} activations given, {per_direction * directions} expected")
        alphas = list(self.attrs.get("activation_alpha", []))
        betas = list(self.attrs.get("activation_beta", []))
        acts = []
        for name in names:
            key = name.lower()
            alpha = (alphas.pop(0) if alphas else _ALPHA_DEFAULTS[key]) if key in _ALPHA_DEFAULTS else None
            beta = (betas.pop(0) if betas else _BETA_DEFAULTS[key]) if key in _BETA_DEFAULTS else None
            acts.append(_Activation(key, alpha, beta))
        return [acts[d * per_direction:(d + 1) * per_direction] for d in range(directions)]

    def time_major_input(self, layout: int, verb: str) -> tuple:
        """X as [T, B, I] (a Transpose first for ``layout=1``) and that static shape."""
        x = self.input_name(0)
        shape = self.model.static_shape(x)
        if shape is None or len(shape) != 3:
            self.fail(f"the shape of X ('{x}') must be static to {verb} the node (fix the input shapes)")
        if layout == 1:
            x = self.op("Transpose", [x], perm=[1, 0, 2])
            shape = (shape[1], shape[0], shape[2])
        return x, shape

    def weights(self, gates: int) -> tuple:
        """(direction, directions, layout, W, R, hidden size) of the node, checked against each other."""
        hidden = int(self.attrs.get("hidden_size", 0))
        direction = self.attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "reverse", "bidirectional"):
            self.fail(f"unknown direction '{direction}'")
        directions = 2 if direction == "bidirectional" else 1
        layout = int(self.attrs.get("layout", 0))
        W, R = self.constant(1, "W"), self.constant(2, "R")
        if W is None or R is None:
            self.fail("W and R are required")
        hidden = hidden or R.shape[-1]
        if W.shape[0] != directions or W.shape[1] != gates * hidden or R.shape[1:] != (gates * hidden, hidden):
            self.fail(f"W {list(W.shape)} / R {list(R.shape)} do not fit hidden_size {hidden}, {directions} direction(s)")
        return direction, directions, layout, W, R, hidden

    # ---------------------------------------------------------------- the unrolled recurrence
    def run(self) -> None:
        node, op_type = self.node, self.node.op_type
        gates = RECURRENT_OPS[op_type]
        direction, directions, layout, W, R, hidden = self.weights(gates)
        B = self.constant(3, "B")
        if B is None:
            B = np.zeros((directions, 2 * gates * hidden), np.float32)
        P = self.constant(7, "P") if op_type == "LSTM" else None
        x, shape = self.time_major_input(layout, "unroll")
        steps = shape[0]
        masks = self.step_masks(steps, shape[1])
        acts = self.activations(directions)
        initial_h, initial_c = self.input_name(5), self.input_name(6) if op_type == "LSTM" else ""

        initial_h_parts = self.initial_state(initial_h, directions, hidden)
        initial_c_parts = self.initial_state(initial_c, directions, hidden)
        ys, hs, cs = [], [], []
        for d in range(directions):
            reverse = direction == "reverse" or d == 1
            h, c = initial_h_parts[d], initial_c_parts[d]
            bias = B[d, :gates * hidden] + B[d, gates * hidden:]
            rec_bias_h = None
            if op_type == "GRU" and self.attrs.get("linear_before_reset", 0):
                rec_bias_h = B[d, gates * hidden + 2 * hidden:]
                bias = bias.copy()
                bias[2 * hidden:] -= rec_bias_h
            projected = self.op("Add", [self.op("MatMul", [x, self.const(W[d].T)]), self.const(bias)])
            weights = self.const(R[d].T)
            outputs: list[str | None] = [None] * steps
            projected_steps = self.steps_of(projected, steps, gates * hidden)
            for t in (reversed(range(steps)) if reverse else range(steps)):
                x_t = projected_steps[t]
                if op_type == "LSTM":
                    peep = P[d] if P is not None else None
                    h_new, c_new = self.lstm_step(x_t, h, c, weights, hidden, acts[d], peep)
                else:
                    h_new = (self.gru_step(x_t, h, R[d], hidden, acts[d], rec_bias_h) if op_type == "GRU"
                             else self.activate(acts[d][0], self.clip(self.add(x_t, self.recur(h, weights)))))
                    c_new = None
                mask = masks[t]
                outputs[t] = h_new if mask is None else self.mul(h_new, mask)
                h = self.masked_update(h, h_new, mask)
                if op_type == "LSTM":
                    c = self.masked_update(c, c_new, mask)
            ys.append(self.op("Concat", [self.op("Reshape", [y, self.const([1, 1, -1, hidden], np.int64)])
                                         for y in outputs], axis=0) if steps > 1 else
                      self.op("Reshape", [outputs[0], self.const([1, 1, -1, hidden], np.int64)]))
            hs.append(self.op("Reshape", [h, self.const([1, -1, hidden], np.int64)]))
            if op_type == "LSTM":
                cs.append(self.op("Reshape", [c, self.const([1, -1, hidden], np.int64)]))

        self.emit_output(0, ys, axis=1, perm=[2, 0, 1, 3] if layout == 1 else None)
        self.emit_output(1, hs, axis=0, perm=[1, 0, 2] if layout == 1 else None)
        if op_type == "LSTM":
            self.emit_output(2, cs, axis=0, perm=[1, 0, 2] if layout == 1 else None)

    def emit_output(self, index: int, parts: list[str], axis: int, perm: list[int] | None) -> None:
        out = self.node.output[index] if index < len(self.node.output) else ""
        if not out:
            return
        if perm is not None:
            joined = self.op("Concat", parts, axis=axis) if len(parts) > 1 else parts[0]
            self.op("Transpose", [joined], out=out, perm=perm)
        elif len(parts) > 1:
            self.op("Concat", parts, out=out, axis=axis)
        else:
            self.op("Identity", parts, out=out)

    def recur(self, h: str | None, weights: str) -> str | None:
        """h @ R^T, or nothing while the state is still the zero initial state."""
        return None if h is None else self.op("MatMul", [h, weights])

    def masked_update(self, old: str | None, new: str, mask: str | None) -> str:
        """The state after a step: ``new`` where the sequence goes on, ``old`` past its end."""
        if mask is None:
            return new
        if old is None:
            return self.mul(new, mask)
        return self.op("Add", [old, self.mul(mask, self.op("Sub", [new, old]))])

    def step_masks(self, steps: int, batch: int) -> list[str | None]:
        """Per step a [batch, 1] float mask (1 while t < sequence_lens), or None for all-valid steps."""
        name = self.input_name(4)
        if not name:
            return [None] * steps
        lengths = self.model.get_constant(name)
        if lengths is not None:
            lengths = lengths.astype(np.int64).reshape(-1)
            if lengths.size == 1:
                lengths = np.full(batch, lengths[0])
            return [None if np.all(t < lengths) else
                    self.const((t < lengths).astype(np.float32).reshape(-1, 1)) for t in range(steps)]
        lengths64 = self.op("Cast", [name], to=onnx.TensorProto.INT64)
        return [self.op("Reshape", [self.op("Cast", [self.op("Less", [self.const(t, np.int64), lengths64])],
                                            to=onnx.TensorProto.FLOAT), self.const([-1, 1], np.int64)])
                for t in range(steps)]

    def lstm_step(self, x_t, h, c, weights, hidden, acts, peep):
        f_act, g_act, h_act = acts
        pre = self.add(x_t, self.recur(h, weights))
        i_pre, o_pre, f_pre, c_pre = self.split(pre, [hidden] * 4, 1)
        if peep is not None and c is not None:
            i_pre = self.add(i_pre, self.mul(c, self.const(peep[:hidden])))
            f_pre = self.add(f_pre, self.mul(c, self.const(peep[2 * hidden:])))
        i = self.activate(f_act, self.clip(i_pre))
        if self.attrs.get("input_forget", 0):
            f = self.op("Sub", [self.const(1.0), i])
        else:
            f = self.activate(f_act, self.clip(f_pre))
        cell = self.mul(i, self.activate(g_act, self.clip(c_pre)))
        c_new = cell if c is None else self.add(self.mul(f, c), cell)
        if peep is not None:
            o_pre = self.add(o_pre, self.mul(c_new, self.const(peep[hidden:2 * hidden])))
        o = self.activate(f_act, self.clip(o_pre))
        return self.mul(o, self.activate(h_act, c_new)), c_new

    def gru_step(self, x_t, h, R, hidden, acts, rec_bias_h):
        f_act, g_act = acts
        xz, xr, xh = self.split(x_t, [hidden] * 3, 1)
        if rec_bias_h is not None:  # linear_before_reset: r * (h @ Rh^T + Rbh)
            hz = hr = None
            if h is not None:
                both = self.op("MatMul", [h, self.const(R.T)])
                hz, hr, hh = self.split(both, [hidden] * 3, 1)
                linear = self.op("Add", [hh, self.const(rec_bias_h)])
            else:
                linear = self.const(rec_bias_h)
            z = self.activate(f_act, self.clip(self.add(xz, hz)))
            r = self.activate(f_act, self.clip(self.add(xr, hr)))
            candidate = self.activate(g_act, self.clip(self.add(xh, self.mul(r, linear))))
        else:  # (r * h) @ Rh^T
            hz = hr = None
            if h is not None:
                zr = self.op("MatMul", [h, self.const(R[:2 * hidden].T)])
                hz, hr = self.split(zr, [hidden] * 2, 1)
            z = self.activate(f_act, self.clip(self.add(xz, hz)))
            r = self.activate(f_act, self.clip(self.add(xr, hr)))
            reset = None if h is None else self.op("MatMul", [self.mul(r, h), self.const(R[2 * hidden:].T)])
            candidate = self.activate(g_act, self.clip(self.add(xh, reset)))
        if h is None:  # (1 - z) * candidate
            return self.op("Sub", [candidate, self.mul(z, candidate)])
        return self.op("Add", [candidate, self.mul(z, self.op("Sub", [h, candidate]))])


@dataclass
class _LoopShape:
    direction: str
    directions: int
    layout: int
    W: np.ndarray
    R: np.ndarray
    B: np.ndarray | None
    hidden: int
    x: str          # X, time-major
    steps: int
    batch: int


class _LoopLowering(_Unroller):
    """An LSTM or GRU node as its input projection (ONNX ops) and one SculptRecurrentLoop node (the
    recurrence)."""

    def run(self) -> None:
        if self.node.op_type == "GRU":
            return self.run_gru()
        p = self.prologue(gates=4)
        directions, hidden, B = p.directions, p.hidden, p.B
        if B is None:
            B = np.zeros((directions, 8 * hidden), np.float32)
        P = self.constant(7, "P")
        bias = np.concatenate([B[d, :4 * hidden] + B[d, 4 * hidden:] for d in range(directions)])
        projected = self.project(p, bias)
        recurrent = self.const(tiled_recurrent_weights(p.R))
        h0 = self.state_input(5, directions, p.batch, hidden, p.layout)
        c0 = self.state_input(6, directions, p.batch, hidden, p.layout)
        peep = self.const(P if P is not None else np.zeros((directions, 3 * hidden), np.float32))
        mask = self.sequence_mask(p.steps, p.batch)
        cfg = LoopConfig(**self.loop_config(p, mask), input_forget=bool(self.attrs.get("input_forget", 0)),
                         peepholes=P is not None)
        self.emit_loop(p, [projected, recurrent, h0, c0, peep], mask, cfg, outputs=3)

    def run_gru(self) -> None:
        p = self.prologue(gates=3)
        directions, H, B = p.directions, p.hidden, p.B
        if B is None:
            B = np.zeros((directions, 6 * H), np.float32)
        before_reset = bool(self.attrs.get("linear_before_reset", 0))
        biases = []
        for d in range(directions):
            bias = B[d, :3 * H] + B[d, 3 * H:]
            if before_reset:  # the candidate's recurrent bias sits inside r * (h @ Rh^T + Rbh)
                bias = bias.copy()
                bias[2 * H:] -= B[d, 5 * H:]
            biases.append(bias)
        projected = self.project(p, np.concatenate(biases))
        R = p.R
        if before_reset:
            first, second = self.const(tiled_recurrent_weights(R)), self.const(np.zeros((1, 1, 1, 1), np.float32))
            rbh = self.const(B[:, 5 * H:])
        else:
            first = self.const(tiled_recurrent_weights(R[:, :2 * H]))
            second = self.const(tiled_recurrent_weights(R[:, 2 * H:]))
            rbh = self.const(np.zeros((directions, H), np.float32))
        h0 = self.state_input(5, directions, p.batch, H, p.layout)
        mask = self.sequence_mask(p.steps, p.batch)
        cfg = LoopConfig(**self.loop_config(p, mask), op="GRU", linear_before_reset=before_reset)
        self.emit_loop(p, [projected, first, second, h0, rbh], mask, cfg, outputs=2)

    def prologue(self, gates: int) -> "_LoopShape":
        """What an LSTM (4 gates) or GRU (3) loop needs from the node: directions, layout, weights,
        hidden size and the static [T, B] of X (time-major: a Transpose first for ``layout=1``)."""
        direction, directions, layout, W, R, hidden = self.weights(gates)
        x, shape = self.time_major_input(layout, "compile")
        return _LoopShape(direction, directions, layout, W, R, self.constant(3, "B"), hidden, x,
                          int(shape[0]), int(shape[1]))

    def project(self, p: "_LoopShape", bias: np.ndarray) -> str:
        """All directions' input projections in one MatMul: [T, B, I] @ [I, D*gates*H] + bias."""
        weights = np.concatenate([p.W[d].T for d in range(p.directions)], axis=1)
        return self.op("Add", [self.op("MatMul", [p.x, self.const(weights)]), self.const(bias)])

    def loop_config(self, p: "_LoopShape", mask) -> dict:
        acts = self.activations(p.directions)
        return dict(steps=p.steps, batch=p.batch, hidden=p.hidden,
                    reverse=[int(p.direction == "reverse" or d == 1) for d in range(p.directions)],
                    activations=[[LoopActivation(a.name, a.alpha, a.beta) for a in per] for per in acts],
                    clip=None if self.attrs.get("clip") is None else float(self.attrs["clip"]),
                    masked=mask is not None)

    def emit_loop(self, p: "_LoopShape", inputs: list, mask, cfg, outputs: int) -> None:
        """The SculptRecurrentLoop node (its last input the [T, B] mask, ones when every step is
        valid) and, for ``layout=1``, the Transposes back to batch-major outputs. The loop node has
        3 outputs; an op with fewer (GRU) leaves the last as scratch."""
        node = self.node
        outs = [node.output[i] if i < len(node.output) and node.output[i] and p.layout == 0
                else self.fresh(f"loop_out{i}") for i in range(outputs)]
        outs += [self.fresh("loop_scratch") for _ in range(3 - outputs)]
        loop = onnx.helper.make_node(LOOP_OP, inputs + [mask if mask is not None else self.const(np.ones((p.steps, p.batch)))],
                                     outs, name=self.fresh(LOOP_OP), domain=LOOP_DOMAIN, config=cfg.to_json())
        self.model.append_node(loop)
        if p.layout == 1:
            for index, perm in ((0, [2, 0, 1, 3]), (1, [1, 0, 2]), (2, [1, 0, 2]))[:outputs]:
                if index < len(node.output) and node.output[index]:
                    self.op("Transpose", [outs[index]], out=node.output[index], perm=perm)

    def state_input(self, index: int, directions: int, batch: int, hidden: int, layout: int) -> str:
        """The [D, B, H] initial state (zeros when the node has none)."""
        name = self.input_name(index)
        if not name:
            return self.const(np.zeros((directions, batch, hidden), np.float32))
        value = self.model.get_constant(name)
        if value is not None:
            value = value.astype(np.float32)
            return self.const(value.transpose(1, 0, 2) if layout == 1 else value)
        return self.op("Transpose", [name], perm=[1, 0, 2]) if layout == 1 else name

    def sequence_mask(self, steps: int, batch: int) -> str | None:
        """The [T, B] float mask (1 while t < sequence_lens), or None when every step is valid."""
        name = self.input_name(4)
        if not name:
            return None
        lengths = self.model.get_constant(name)
        if lengths is not None:
            lengths = np.broadcast_to(lengths.astype(np.int64).reshape(-1), (batch,))
            if np.all(lengths >= steps):
                return None
            return self.const((np.arange(steps)[:, None] < lengths[None, :]).astype(np.float32))
        lengths64 = self.op("Reshape", [self.op("Cast", [name], to=onnx.TensorProto.INT64),
                                        self.const([1, -1], np.int64)])
        less = self.op("Less", [self.const(np.arange(steps).reshape(-1, 1), np.int64), lengths64])
        return self.op("Cast", [less], to=onnx.TensorProto.FLOAT)
