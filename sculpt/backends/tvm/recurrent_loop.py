"""The LSTM (and GRU) recurrence as one TIR function with a serial loop over time, called from Relax
(call_tir). A GRU's function is the same loop with its own step (:func:`cpu_gru_loop_script`).

:mod:`sculpt.backends.tvm.recurrent_import` (mode ``"loop"``) replaces an LSTM node by ONNX ops for
what has no recurrence (the input projection of every step, both directions, in one MatMul + Add;
the validity mask of ``sequence_lens``) and one node ``SculptRecurrentLoop`` (domain ``ai.sculpt``) for
the recurrence. TVM's ONNX importer converts that node, while :func:`loop_converters` is active, into
``call_tir`` of the function written here:

    for each direction d, for each step s (t = s, or T-1-s for a reverse direction), for each batch row b:
        gates[:] = projected[t, b, d] + h[d, b] @ R[d]^T       (4H accumulators, vectorized over gates)
        i, o, f, c = the gate activations (peepholes, clip, input_forget, ONNX's activation functions)
        C = f * C + i * c;  H = o * h(C);  past a sequence's end the state stays and Y is 0

The state lives in the Y_h / Y_c outputs, so the function allocates only the 4H gates. On the CPU
the function is written scheduled (``tirx.is_scheduled``: sculpt's kernel pipeline leaves it alone);
for the GPU, :func:`gpu_loop` writes the same recurrence for one work-group (threads over the
gates, state and gates in shared memory, a barrier between the phases of a step), and
:func:`replace_loops_for_gpu` swaps it in from the configuration the CPU function carries."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

LOOP_OP = "SculptRecurrentLoop"
LOOP_DOMAIN = "ai.sculpt"
CONFIG_ATTR = "sculpt.lstm_loop"  # the PrimFunc attribute holding the LoopConfig as JSON


@dataclass
class LoopActivation:
    name: str  # lower case ONNX name
    alpha: float | None = None
    beta: float | None = None


@dataclass
class LoopConfig:
    """What the function computes: shapes, per-direction reverse flags and activations (f, g, h)."""

    steps: int
    batch: int
    hidden: int
    reverse: list[int]  # per direction: 1 walks the steps backwards
    activations: list[list[LoopActivation]]  # per direction: [f, g, h]
    clip: float | None = None
    input_forget: bool = False
    peepholes: bool = False
    masked: bool = False  # sequence_lens given: a [steps, batch] 0/1 mask input
    op: str = "LSTM"  # or "GRU"
    linear_before_reset: bool = False  # GRU
    extra: dict = field(default_factory=dict)

    @property
    def directions(self) -> int:
        return len(self.reverse)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoopConfig":
        data = json.loads(text)
        data["activations"] = [[LoopActivation(**a) for a in acts] for acts in data["activations"]]
        return cls(**data)


def _f32(value: float) -> str:
    return f"T.float32({float(value)!r})"


# tanh(x) = x P(x^2) / Q(x^2) on x clamped to [-9, 9] (the rational approximation of Eigen's ptanh_float,
# which TVM's topi.fast_tanh uses too): a few float32 ulps, and, unlike libm's tanhf/expf (one scalar call
# per element), it vectorizes. sigmoid(x) = tanh(x / 2) / 2 + 1 / 2 then costs the same.
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)  # x^13 ... x^1
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)  # x^6 ... x^0


def _rational_tanh(x: str) -> str:
    clamped = f"T.max({_f32(-9.0)}, T.min({_f32(9.0)}, {x}))"
    square = f"({clamped} * {clamped})"
    p = _f32(_TANH_P[0])
    for c in _TANH_P[1:]:
        p = f"({p} * {square} + {_f32(c)})"
    q = _f32(_TANH_Q[0])
    for c in _TANH_Q[1:]:
        q = f"({q} * {square} + {_f32(c)})"
    return f"({clamped} * {p} / {q})"


def activation_expr(act: LoopActivation, x: str) -> str:
    """The TVMScript expression of ONNX activation ``act`` applied to the float32 variable ``x``."""
    one, zero = _f32(1.0), _f32(0.0)
    name, a, b = act.name, act.alpha, act.beta
    table = {
        "sigmoid": f"({_f32(0.5)} * {_rational_tanh(f'{_f32(0.5)} * {x}')} + {_f32(0.5)})",
        "tanh": _rational_tanh(x),
        "relu": f"T.max({x}, {zero})",
        "softsign": f"{x} / ({one} + T.fabs({x}))",
        "softplus": f"T.log(T.exp({x}) + {one})",
        "leakyrelu": f"T.if_then_else({x} >= {zero}, {x}, {_f32(a or 0)} * {x})",
        "thresholdedrelu": f"T.if_then_else({x} > {_f32(a or 0)}, {x}, {zero})",
        "elu": f"T.if_then_else({x} >= {zero}, {x}, {_f32(a or 0)} * (T.exp({x}) - {one}))",
        "hardsigmoid": f"T.max({zero}, T.min({one}, {_f32(a or 0)} * {x} + {_f32(b or 0)}))",
        "affine": f"{_f32(a or 0)} * {x} + {_f32(b or 0)}",
        "scaledtanh": f"{_f32(a or 0)} * T.tanh({_f32(b or 0)} * {x})",
    }
    if name not in table:
        raise ValueError(f"activation '{name}' is not one of ONNX's")
    return table[name]


def _per_direction(cfg: LoopConfig, values: list[str], d: str = "d") -> str:
    """An expression choosing values[d] for the direction variable ``d`` (a constant when all agree)."""
    if len(set(values)) == 1:
        return values[0]
    out = values[-1]
    for index in range(len(values) - 2, -1, -1):
        out = f"T.if_then_else({d} == {index}, {values[index]}, {out})"
    return out


def _step_index(cfg: LoopConfig) -> str:
    """t of step s in direction d."""
    if cfg.reverse == [0] * cfg.directions:
        return "s"
    if cfg.reverse == [1] * cfg.directions:
        return f"{cfg.steps - 1} - s"
    return _per_direction(cfg, ["s" if r == 0 else f"{cfg.steps - 1} - s" for r in cfg.reverse])


def _cell_body(cfg: LoopConfig, indent: str, gate: str, hidden_state: str, cell_state: str, out: str,
               k: str = "k") -> str:
    """The statements of the elementwise part of one step for hidden unit ``k``: ``gate(j)`` reads the
    pre-activation of gate row j, ``hidden_state``/``cell_state``/``out`` are buffer accesses (without
    the closing bracket's index, filled in with k)."""
    H = cfg.hidden

    def clip(x: str) -> str:
        if cfg.clip is None:
            return x
        return f"T.max({_f32(-cfg.clip)}, T.min({_f32(cfg.clip)}, {x}))"

    def act(position: int, x: str) -> str:
        exprs = [activation_expr(acts[position], x) for acts in cfg.activations]
        return _per_direction(cfg, exprs)

    lines = [f"c_prev: T.float32 = {cell_state}"]
    i_pre = gate(f"{k}") + (f" + peep[d, {k}] * c_prev" if cfg.peepholes else "")
    lines.append(f"i_pre: T.float32 = {clip(i_pre)}")
    lines.append(f"i_g: T.float32 = {act(0, 'i_pre')}")
    if cfg.input_forget:
        lines.append(f"f_g: T.float32 = {_f32(1.0)} - i_g")
    else:
        f_pre = gate(f"{2 * H} + {k}") + (f" + peep[d, {2 * H} + {k}] * c_prev" if cfg.peepholes else "")
        lines.append(f"f_pre: T.float32 = {clip(f_pre)}")
        lines.append(f"f_g: T.float32 = {act(0, 'f_pre')}")
    lines.append(f"c_pre: T.float32 = {clip(gate(f'{3 * H} + {k}'))}")
    lines.append(f"c_g: T.float32 = {act(1, 'c_pre')}")
    lines.append("c_new: T.float32 = f_g * c_prev + i_g * c_g")
    o_pre = gate(f"{H} + {k}") + (f" + peep[d, {H} + {k}] * c_new" if cfg.peepholes else "")
    lines.append(f"o_pre: T.float32 = {clip(o_pre)}")
    lines.append(f"o_g: T.float32 = {act(0, 'o_pre')}")
    lines.append(f"h_new: T.float32 = o_g * ({act(2, 'c_new')})")
    if cfg.masked:
        lines.append("m: T.float32 = mask[t, b]")
        lines.append(f"{out} = h_new * m")
        lines.append(f"{hidden_state} = {hidden_state} + m * (h_new - {hidden_state})")
        lines.append(f"{cell_state} = c_prev + m * (c_new - c_prev)")
    else:
        lines.append(f"{out} = h_new")
        lines.append(f"{hidden_state} = h_new")
        lines.append(f"{cell_state} = c_new")
    return "".join(f"{indent}{line}\n" for line in lines)


def _signature(cfg: LoopConfig) -> str:
    S, B, D, H = cfg.steps, cfg.batch, cfg.directions, cfg.hidden
    G = 4 * H
    TJ = gate_tile(G)
    return (f"proj: T.Buffer(({S}, {B}, {D * G}), \"float32\"), "
            f"rt: T.Buffer(({D}, {G // TJ}, {H}, {TJ}), \"float32\"), "
            f"h0: T.Buffer(({D}, {B}, {H}), \"float32\"), c0: T.Buffer(({D}, {B}, {H}), \"float32\"), "
            f"peep: T.Buffer(({D}, {3 * H}), \"float32\"), mask: T.Buffer(({S}, {B}), \"float32\"), "
            f"y: T.Buffer(({S}, {D}, {B}, {H}), \"float32\"), yh: T.Buffer(({D}, {B}, {H}), \"float32\"), "
            f"yc: T.Buffer(({D}, {B}, {H}), \"float32\")")


def gate_tile(gates: int) -> int:
    """Gate rows per tile of the recurrent matmul (its accumulators: 8 AVX2 / 16 NEON registers at 64): the
    largest of 64, 32, ..., 1 dividing ``gates``. The recurrent weights are stored tile by tile,
    ``rt[d, j // TJ, k, j % TJ] = R[d, j, k]``, so a tile streams through contiguous memory."""
    return next(t for t in (64, 32, 16, 8, 4, 2, 1) if gates % t == 0)


def tiled_recurrent_weights(R):
    """``R`` [D, 4H, H] (ONNX's layout) as the loop reads it: [D, 4H / TJ, H, TJ]."""
    D, G, H = R.shape
    TJ = gate_tile(G)
    return R.reshape(D, G // TJ, TJ, H).transpose(0, 1, 3, 2).copy()


PARALLEL_MACS = 1 << 17  # recurrent MACs per step and direction from which the gate tiles run in parallel


def parallel_gates(cfg: LoopConfig) -> bool:
    """Whether the gate tiles of a step are a parallel loop (TVM's thread pool; one launch per step and
    direction): from PARALLEL_MACS on (hidden 181+), where a step's work outweighs a launch."""
    return 4 * cfg.hidden * cfg.hidden >= PARALLEL_MACS


def cpu_lstm_loop_script(cfg: LoopConfig) -> str:
    """TVMScript of the CPU function (see the module docstring)."""
    S, B, D, H = cfg.steps, cfg.batch, cfg.directions, cfg.hidden
    G = 4 * H
    TJ = gate_tile(G)
    cell = _cell_body(cfg, " " * 20, lambda j: f"gates[{j}]", "yh[d, b, k]", "yc[d, b, k]", "y[t, d, b, k]")
    return f"""
@T.prim_func(private=True)
def sculpt_lstm_loop({_signature(cfg)}):
    T.func_attr({{"tirx.is_scheduled": True, "tirx.noalias": True}})
    gates = T.decl_buffer(({G},), "float32")
    for d, b, k in T.grid({D}, {B}, {H}):
        yh[d, b, k] = h0[d, b, k]
        yc[d, b, k] = c0[d, b, k]
    for d in range({D}):
        for s in range({S}):
            t: T.int32 = {_step_index(cfg)}
            for b in range({B}):
                for jo in {"T.parallel" if parallel_gates(cfg) else "range"}({G // TJ}):
                    acc = T.decl_buffer(({TJ},), "float32", scope="local")
                    for ji in T.vectorized({TJ}):
                        acc[ji] = proj[t, b, d * {G} + jo * {TJ} + ji]
                    for k in range({H}):
                        for ji in T.vectorized({TJ}):
                            acc[ji] = acc[ji] + yh[d, b, k] * rt[d, jo, k, ji]
                    for ji in T.vectorized({TJ}):
                        gates[jo * {TJ} + ji] = acc[ji]
                for k in range({H}):
{cell}"""


def _parse(script: str, cfg: LoopConfig):
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the script's T)

    func = tvm.script.from_source(script)
    if not isinstance(func, tvm.tirx.PrimFunc):
        func = func[f"sculpt_{cfg.op.lower()}_loop"]
    return func.with_attr(CONFIG_ATTR, cfg.to_json())


def cpu_loop(cfg: LoopConfig):
    """The CPU PrimFunc of the loop (scheduled; it carries its configuration for the GPU swap)."""
    return _parse(cpu_gru_loop_script(cfg) if cfg.op == "GRU" else cpu_lstm_loop_script(cfg), cfg)


def gpu_threads(cfg: LoopConfig, max_threads: int = 256) -> int:
    """Threads of the one work-group: the largest divisor of H up to ``max_threads`` (each thread then has
    whole hidden units and gate rows, and no thread sits out a barrier behind a condition)."""
    H = cfg.hidden
    return max(t for t in range(1, min(H, max_threads) + 1) if H % t == 0)


def gpu_shared_bytes(cfg: LoopConfig) -> int:
    gates = 4 if cfg.op == "LSTM" else 3
    return 4 * cfg.batch * (gates * cfg.hidden + 2 * cfg.hidden)


def gpu_lstm_loop_script(cfg: LoopConfig, max_threads: int = 256) -> str:
    """TVMScript of the GPU function: one work-group of NT threads (NT divides H); per step each thread
    computes the gate rows j = tx, tx + NT, ... (dot products over h in shared memory), a barrier, then
    the hidden units k = tx, tx + NT, ... update the state in shared memory, a barrier."""
    S, B, D, H = cfg.steps, cfg.batch, cfg.directions, cfg.hidden
    G = 4 * H
    NT = gpu_threads(cfg, max_threads)
    TJ = gate_tile(G)
    cell = _cell_body(cfg, " " * 28, lambda j: f"gates[b * {G} + {j}]", f"hs[b * {H} + k]", f"cs[b * {H} + k]",
                      "y[t, d, b, k]")
    return f"""
@T.prim_func(private=True)
def sculpt_lstm_loop({_signature(cfg)}):
    T.func_attr({{"tirx.is_scheduled": True, "tirx.noalias": True}})
    for bx in T.thread_binding(1, thread="blockIdx.x"):
        for tx in T.thread_binding({NT}, thread="threadIdx.x"):
            gates = T.decl_buffer(({B * G},), "float32", scope="shared")
            hs = T.decl_buffer(({B * H},), "float32", scope="shared")
            cs = T.decl_buffer(({B * H},), "float32", scope="shared")
            acc = T.decl_buffer((1,), "float32", scope="local")
            for d in range({D}):
                for b in range({B}):
                    for kk in range({H // NT}):
                        hs[b * {H} + kk * {NT} + tx] = h0[d, b, kk * {NT} + tx]
                        cs[b * {H} + kk * {NT} + tx] = c0[d, b, kk * {NT} + tx]
                T.tvm_storage_sync("shared")
                for s in range({S}):
                    t: T.int32 = {_step_index(cfg)}
                    for b in range({B}):
                        for jj in range({G // NT}):
                            acc[0] = proj[t, b, d * {G} + jj * {NT} + tx]
                            for k in range({H}):
                                acc[0] = acc[0] + hs[b * {H} + k] * rt[d, (jj * {NT} + tx) // {TJ}, k, (jj * {NT} + tx) % {TJ}]
                            gates[b * {G} + jj * {NT} + tx] = acc[0]
                    T.tvm_storage_sync("shared")
                    for b in range({B}):
                        for kk in range({H // NT}):
                            k: T.int32 = kk * {NT} + tx
{cell}                    T.tvm_storage_sync("shared")
                for b in range({B}):
                    for kk in range({H // NT}):
                        yh[d, b, kk * {NT} + tx] = hs[b * {H} + kk * {NT} + tx]
                        yc[d, b, kk * {NT} + tx] = cs[b * {H} + kk * {NT} + tx]
                T.tvm_storage_sync("shared")
"""


def gpu_loop(cfg: LoopConfig, max_threads: int = 256):
    script = gpu_gru_loop_script(cfg, max_threads) if cfg.op == "GRU" else gpu_lstm_loop_script(cfg, max_threads)
    return _parse(script, cfg)


def replace_loops_for_gpu(mod, max_threads: int = 256, max_shared_bytes: int | None = None):
    """``mod`` with every CPU loop function replaced by its GPU form. Returns (mod, names replaced).
    A loop whose state and gates exceed ``max_shared_bytes`` is a ValueError naming it."""
    from tvm import tirx

    replaced = []
    loops = [(gvar, func) for gvar, func in mod.functions_items()
             if isinstance(func, tirx.PrimFunc) and CONFIG_ATTR in func.attrs]
    if loops:
        mod = mod.clone()  # a pass does not change its input module
    for gvar, func in loops:
        cfg = LoopConfig.from_json(str(func.attrs[CONFIG_ATTR]))
        if max_shared_bytes is not None and gpu_shared_bytes(cfg) > max_shared_bytes:
            raise ValueError(f"{gvar.name_hint}: the LSTM loop keeps {gpu_shared_bytes(cfg)} bytes of state and "
                             f"gates in shared memory, over the target's {max_shared_bytes}")
        new = gpu_loop(cfg, max_threads)
        for key in ("global_symbol",):
            if key in func.attrs:
                new = new.with_attr(key, func.attrs[key])
        mod[gvar] = new
        replaced.append(gvar.name_hint)
    return mod, replaced


# ----------------------------------------------------------------------------- the importer's converter
def _converter_class():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class SculptRecurrentLoopConverter(OnnxOpConverter):
        """``SculptRecurrentLoop`` -> call_tir of the CPU loop function; outputs Y, Y_h, Y_c (a GRU's
        third output is its scratch for r * h)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            config = attr["config"]
            cfg = LoopConfig.from_json(config.decode() if isinstance(config, bytes) else config)
            gvar = bb.add_func(cpu_loop(cfg), f"sculpt_{cfg.op.lower()}_loop")
            S, B, D, H = cfg.steps, cfg.batch, cfg.directions, cfg.hidden
            out = [relax.TensorType((S, D, B, H), "float32"), relax.TensorType((D, B, H), "float32"),
                   relax.TensorType((D, B, H), "float32")]
            return bb.emit(relax.call_tir(gvar, list(inputs), out))

    return SculptRecurrentLoopConverter


class loop_converters:
    """While active, TVM's ONNX importer converts ``SculptRecurrentLoop`` nodes (its converter table is a
    module function, read at each use: it is extended for the duration)."""

    def __enter__(self):
        from tvm.relax.frontend.onnx import onnx_frontend

        self._module = onnx_frontend
        self._original = original = onnx_frontend._get_convert_map
        converter = _converter_class()

        def extended():
            table = original()
            table[LOOP_OP] = converter
            return table

        onnx_frontend._get_convert_map = extended
        return self

    def __exit__(self, *exc):
        self._module._get_convert_map = self._original
        return False


# ----------------------------------------------------------------------------- GRU
def _gru_signature(cfg: LoopConfig) -> str:
    S, B, D, H = cfg.steps, cfg.batch, cfg.directions, cfg.hidden
    rows1 = 3 * H if cfg.linear_before_reset else 2 * H
    T1, T2 = gate_tile(rows1), gate_tile(H)
    rt2 = "(1, 1, 1, 1)" if cfg.linear_before_reset else f"({D}, {H // T2}, {H}, {T2})"
    return (f"proj: T.Buffer(({S}, {B}, {D * 3 * H}), \"float32\"), "
            f"rt: T.Buffer(({D}, {rows1 // T1}, {H}, {T1}), \"float32\"), rt2: T.Buffer({rt2}, \"float32\"), "
            f"h0: T.Buffer(({D}, {B}, {H}), \"float32\"), rbh: T.Buffer(({D}, {H}), \"float32\"), "
            f"mask: T.Buffer(({S}, {B}), \"float32\"), "
            f"y: T.Buffer(({S}, {D}, {B}, {H}), \"float32\"), yh: T.Buffer(({D}, {B}, {H}), \"float32\"), "
            f"yc: T.Buffer(({D}, {B}, {H}), \"float32\")")


def _gru_act(cfg: LoopConfig, position: int, x: str) -> str:
    return _per_direction(cfg, [activation_expr(acts[position], x) for acts in cfg.activations])


def _gru_clip(cfg: LoopConfig, x: str) -> str:
    return x if cfg.clip is None else f"T.max({_f32(-cfg.clip)}, T.min({_f32(cfg.clip)}, {x}))"


def _gru_reset_body(cfg: LoopConfig, indent: str, rec: str, hidden: str, scratch: str) -> str:
    """(linear_before_reset=0) the scratch r * h of hidden unit k; ``rec(j)`` reads h @ R^T row j."""
    H, G = cfg.hidden, 3 * cfg.hidden
    lines = [f"r_pre: T.float32 = {_gru_clip(cfg, f'proj[t, b, d * {G} + {H} + k] + ' + rec(f'{H} + k'))}",
             f"{scratch} = ({_gru_act(cfg, 0, 'r_pre')}) * {hidden}"]
    return "".join(f"{indent}{line}\n" for line in lines)


def _gru_cell_body(cfg: LoopConfig, indent: str, rec: str, hidden: str, out: str) -> str:
    """The state update of hidden unit k: z, the candidate (r applied before or after the matmul), h."""
    H, G = cfg.hidden, 3 * cfg.hidden
    proj = lambda j: f"proj[t, b, d * {G} + {j}]"  # noqa: E731
    lines = [f"h_prev: T.float32 = {hidden}",
             f"z_pre: T.float32 = {_gru_clip(cfg, proj('k') + ' + ' + rec('k'))}",
             f"z_g: T.float32 = {_gru_act(cfg, 0, 'z_pre')}"]
    if cfg.linear_before_reset:
        lines += [f"r_pre: T.float32 = {_gru_clip(cfg, proj(f'{H} + k') + ' + ' + rec(f'{H} + k'))}",
                  f"r_g: T.float32 = {_gru_act(cfg, 0, 'r_pre')}",
                  f"n_pre: T.float32 = {_gru_clip(cfg, proj(f'{2 * H} + k') + ' + r_g * (' + rec(f'{2 * H} + k') + ' + rbh[d, k])')}"]
    else:
        lines.append(f"n_pre: T.float32 = {_gru_clip(cfg, proj(f'{2 * H} + k') + ' + ' + rec(f'{2 * H} + k'))}")
    lines += [f"n_g: T.float32 = {_gru_act(cfg, 1, 'n_pre')}",
              "h_new: T.float32 = n_g + z_g * (h_prev - n_g)"]
    if cfg.masked:
        lines += ["m: T.float32 = mask[t, b]", f"{out} = h_new * m", f"{hidden} = h_prev + m * (h_new - h_prev)"]
    else:
        lines += [f"{out} = h_new", f"{hidden} = h_new"]
    return "".join(f"{indent}{line}\n" for line in lines)


def cpu_gru_loop_script(cfg: LoopConfig) -> str:
    """TVMScript of the GRU's CPU function: per step h @ R^T for z and r (and the candidate's rows with
    linear_before_reset), else r * h (in the Y_c buffer, a scratch for a GRU) @ Rh^T, then the update."""
    S, B, D, H = cfg.steps, cfg.batch, cfg.directions, cfg.hidden
    rows1 = 3 * H if cfg.linear_before_reset else 2 * H
    T1, T2 = gate_tile(rows1), gate_tile(H)
    loop = "T.parallel" if 3 * H * H >= PARALLEL_MACS else "range"
    rec = lambda j: f"gates[{j}]"  # noqa: E731
    second = "" if cfg.linear_before_reset else f"""
                for k in range({H}):
{_gru_reset_body(cfg, " " * 20, rec, "yh[d, b, k]", "yc[d, b, k]")}
                for jo in {loop}({H // T2}):
                    acc2 = T.decl_buffer(({T2},), "float32", scope="local")
                    for ji in T.vectorized({T2}):
                        acc2[ji] = T.float32(0)
                    for k in range({H}):
                        for ji in T.vectorized({T2}):
                            acc2[ji] = acc2[ji] + yc[d, b, k] * rt2[d, jo, k, ji]
                    for ji in T.vectorized({T2}):
                        gates[{2 * H} + jo * {T2} + ji] = acc2[ji]"""
    return f"""
@T.prim_func(private=True)
def sculpt_gru_loop({_gru_signature(cfg)}):
    T.func_attr({{"tirx.is_scheduled": True, "tirx.noalias": True}})
    gates = T.decl_buffer(({3 * H},), "float32")
    for d, b, k in T.grid({D}, {B}, {H}):
        yh[d, b, k] = h0[d, b, k]
        yc[d, b, k] = T.float32(0)
    for d in range({D}):
        for s in range({S}):
            t: T.int32 = {_step_index(cfg)}
            for b in range({B}):
                for jo in {loop}({rows1 // T1}):
                    acc = T.decl_buffer(({T1},), "float32", scope="local")
                    for ji in T.vectorized({T1}):
                        acc[ji] = T.float32(0)
                    for k in range({H}):
                        for ji in T.vectorized({T1}):
                            acc[ji] = acc[ji] + yh[d, b, k] * rt[d, jo, k, ji]
                    for ji in T.vectorized({T1}):
                        gates[jo * {T1} + ji] = acc[ji]{second}
                for k in range({H}):
{_gru_cell_body(cfg, " " * 20, rec, "yh[d, b, k]", "y[t, d, b, k]")}"""


def gpu_gru_loop_script(cfg: LoopConfig, max_threads: int = 256) -> str:
    """TVMScript of the GRU's GPU function: one work-group of NT threads (NT divides H), gates, state and
    r * h in shared memory, a barrier after each phase."""
    S, B, D, H = cfg.steps, cfg.batch, cfg.directions, cfg.hidden
    NT = gpu_threads(cfg, max_threads)
    rows1 = 3 * H if cfg.linear_before_reset else 2 * H
    T1, T2 = gate_tile(rows1), gate_tile(H)
    rec = lambda j: f"gates[b * {3 * H} + {j}]"  # noqa: E731
    second = "" if cfg.linear_before_reset else f"""
                    for b in range({B}):
                        for kk in range({H // NT}):
                            k: T.int32 = kk * {NT} + tx
{_gru_reset_body(cfg, " " * 28, rec, f"hs[b * {H} + k]", f"rh[b * {H} + k]")}
                    T.tvm_storage_sync("shared")
                    for b in range({B}):
                        for jj in range({H // NT}):
                            acc[0] = T.float32(0)
                            for k in range({H}):
                                acc[0] = acc[0] + rh[b * {H} + k] * rt2[d, (jj * {NT} + tx) // {T2}, k, (jj * {NT} + tx) % {T2}]
                            gates[b * {3 * H} + {2 * H} + jj * {NT} + tx] = acc[0]
                    T.tvm_storage_sync("shared")"""
    return f"""
@T.prim_func(private=True)
def sculpt_gru_loop({_gru_signature(cfg)}):
    T.func_attr({{"tirx.is_scheduled": True, "tirx.noalias": True}})
    for bx in T.thread_binding(1, thread="blockIdx.x"):
        for tx in T.thread_binding({NT}, thread="threadIdx.x"):
            gates = T.decl_buffer(({B * 3 * H},), "float32", scope="shared")
            hs = T.decl_buffer(({B * H},), "float32", scope="shared")
            rh = T.decl_buffer(({B * H},), "float32", scope="shared")
            acc = T.decl_buffer((1,), "float32", scope="local")
            for d in range({D}):
                for b in range({B}):
                    for kk in range({H // NT}):
                        hs[b * {H} + kk * {NT} + tx] = h0[d, b, kk * {NT} + tx]
                T.tvm_storage_sync("shared")
                for s in range({S}):
                    t: T.int32 = {_step_index(cfg)}
                    for b in range({B}):
                        for jj in range({rows1 // NT}):
                            acc[0] = T.float32(0)
                            for k in range({H}):
                                acc[0] = acc[0] + hs[b * {H} + k] * rt[d, (jj * {NT} + tx) // {T1}, k, (jj * {NT} + tx) % {T1}]
                            gates[b * {3 * H} + jj * {NT} + tx] = acc[0]
                    T.tvm_storage_sync("shared"){second}
                    for b in range({B}):
                        for kk in range({H // NT}):
                            k: T.int32 = kk * {NT} + tx
{_gru_cell_body(cfg, " " * 28, rec, f"hs[b * {H} + k]", "y[t, d, b, k]")}
                    T.tvm_storage_sync("shared")
                for b in range({B}):
                    for kk in range({H // NT}):
                        yh[d, b, kk * {NT} + tx] = hs[b * {H} + kk * {NT} + tx]
                        yc[d, b, kk * {NT} + tx] = T.float32(0)
                T.tvm_storage_sync("shared")
"""
