"""Run the GPU program of a Mali/Adreno build on a real OpenCL implementation (PoCL, through pyopencl),
in the order TVM's host code runs it, and compare it with onnxruntime.

The apache-tvm wheel has no OpenCL runtime, so TVM's VM cannot run these builds here. This module
reads what the VM would do from the build itself:

* the Relax ``main`` after TVM's lowering pipeline: a straight line of storage and tensor
  allocations (the static memory plan, with its buffer reuse), calls of TIR functions, reshapes;
* each TIR function right before ``MakePackedAPI``: its host code, executed here for each call of
  ``main`` (symbolic shapes bound to the call's tensors, lets, loops, conditions, workspaces) into
  the device-kernel launches it makes, in order: kernel name, arguments, launch extents.

Both are captured by a pass instrument while ``tvm.compile`` builds the executable, so the plan and
the OpenCL C source (``opencl.opencl_source`` of that same executable) come from one build. Launching
follows TVM's OpenCL runtime: work dimension = highest thread axis used + 1, local size = the
``threadIdx`` extents, global size = ``blockIdx`` extents x local size.

PoCL is a CPU implementation of OpenCL: a match shows that the kernels TVM generated, launched the way
TVM launches them, compute the model. It does not show how a Mali/Adreno driver compiles them, their
speed, or anything about float precision modes specific to those GPUs. PoCL runs the work-items of a
group one after another between barriers, so a kernel that races on local memory (reads what another
work-item writes with no barrier in between) fails here even where a GPU's lock-step execution hides
it: TVM 0.27's GPU cumsum (``gpu_2d_continuous_cumsum``, an in-place scan) does, at rows longer than
a few elements; PP-OCR does not use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sculpt.backends.tvm.opencl import OpenCLError, opencl_device
from sculpt.common import one_line
from sculpt.errors import ShapeError
from sculpt.ir.model import Model

_THREAD_AXES = {"blockIdx.x": (0, 0), "blockIdx.y": (0, 1), "blockIdx.z": (0, 2),
                "threadIdx.x": (1, 0), "threadIdx.y": (1, 1), "threadIdx.z": (1, 2)}
_CHECKS_ONLY = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")  # input checks: done on the feeds


class OpenCLRunError(OpenCLError):
    """The build does something the PoCL launcher does not handle, or a launch failed."""


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class KernelArg:
    """One argument of a kernel launch: a tensor operand of the call (``operand``), a workspace the TIR
    function allocates (``workspace``), or a scalar (``value`` with ``dtype``)."""

    kind: str  # "operand" | "workspace" | "scalar"
    index: int = -1
    value: int | float = 0
    dtype: str = ""


@dataclass(frozen=True)
class KernelLaunch:
    kernel: str
    args: tuple[KernelArg, ...]
    global_size: tuple[int, ...]
    local_size: tuple[int, ...]


@dataclass(frozen=True)
class Operand:
    """An argument of a call in ``main``: a variable (``var``), a constant tensor (``const``) or an
    integer (``int``, e.g. a symbolic shape TVM passes to a TIR function)."""

    kind: str  # "var" | "const" | "int"
    index: int = -1
    value: int = 0


@dataclass(frozen=True)
class Step:
    """One instruction of ``main``.

    ``storage``: var <- a buffer of ``nbytes``; ``tensor``: var <- a view at ``offset`` into storage
    ``source``; ``reshape``: var <- ``source`` with ``shape``; ``call``: TIR function ``function`` on
    ``operands`` (outputs included, as TVM passes them), which its host code turns into ``launches``
    using ``workspaces`` (bytes of each global buffer it allocates). A ``tensor`` in a texture ``scope``
    (Adreno's texture lowering) is an image of its own, as TVM's OpenCL runtime makes it on a device
    without cl_khr_image2d_from_buffer (PoCL has none)."""

    op: str
    var: int = -1
    source: int = -1
    nbytes: int = 0
    offset: int = 0
    shape: tuple[int, ...] = ()
    dtype: str = ""
    function: str = ""
    operands: tuple[Operand, ...] = ()
    launches: tuple[KernelLaunch, ...] = ()
    workspaces: tuple[int, ...] = ()
    scope: str = "global"


@dataclass
class OpenCLPlan:
    """Everything needed to run a build's GPU program without TVM's runtime."""

    source: str  # the OpenCL C of the build (all kernels)
    inputs: list[tuple[str, tuple[int, ...], str]]  # main's parameters: name, shape, dtype (vars 0..n-1)
    steps: list[Step]
    results: list[int]  # vars main returns, flattened
    result_specs: list[tuple[tuple[int, ...], str]]
    constants: list[np.ndarray]
    constant_scopes: list[str] = field(default_factory=list)  # "global", or the texture scope of an image

    @property
    def calls(self) -> list[Step]:
        return [s for s in self.steps if s.op == "call"]

    @property
    def launches(self) -> int:
        """How many kernel launches one run makes."""
        return sum(len(s.launches) for s in self.calls)

    def kernels_launched(self) -> set[str]:
        return {launch.kernel for s in self.calls for launch in s.launches}


def plan_build(mod, target) -> tuple[object, OpenCLPlan]:
    """Build the Relax module ``mod`` for an OpenCL ``target`` (a tvm.target.Target) with ``tvm.compile``,
    exactly as sculpt compiles it, and read the launch plan from the same build.

    Returns (executable, plan); ``plan.source`` is ``opencl.opencl_source(executable)``."""
    import tvm
    from tvm import relax

    from sculpt.backends.tvm.adreno_texture import build_texture, is_texture_target
    from sculpt.backends.tvm.opencl import kernel_definitions, opencl_source
    from sculpt.backends.tvm.relax_import import build_gpu

    captured: dict = {}

    @tvm.instrument.pass_instrument
    class _Capture:
        def run_after_pass(self, module, info):
            if any(gv.name_hint == "main" and isinstance(f, relax.Function) for gv, f in module.functions.items()):
                captured["relax"] = module  # the last one is the output of the Relax pipeline

        def run_before_pass(self, module, info):
            if info.name == "tirx.MakePackedAPI":
                captured["tir"] = module

    input_names = [p.name for p in mod["main"].params]
    current = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=current.opt_level, config=dict(current.config),
                                   required_pass=list(current.required_pass),
                                   disabled_pass=list(current.disabled_pass), instruments=[_Capture()]):
        if is_texture_target(target):
            executable = build_texture(mod, target)  # Adreno's texture lowering (adreno_texture)
        else:
            executable = build_gpu(mod, target)  # TVM's pipeline with sculpt's fail-safe GPU schedules
    if "relax" not in captured or "tir" not in captured:
        raise OpenCLRunError("could not observe TVM's lowering of the build (the Relax pipeline or "
                             "MakePackedAPI did not run)")
    host_functions = {gv.name_hint: f for gv, f in captured["tir"].functions.items()
                      if int(f.attrs.get("calling_conv", 0)) != 2}  # 2: a device kernel
    plan = _main_plan(captured["relax"], host_functions)
    # the GPU pipeline renames parameters that are not C identifiers (gpu_schedule): feeds keep the model's names
    plan.inputs = [(name, shape, dtype) for name, (_, shape, dtype) in zip(input_names, plan.inputs)]
    plan.source = opencl_source(executable)
    missing = sorted(plan.kernels_launched() - set(kernel_definitions(plan.source)))
    if missing:
        raise OpenCLRunError(f"kernels launched by the host code but not in the OpenCL source: {', '.join(missing)}")
    return executable, plan


def _key(node) -> int:
    """Identity of a TVM node (its handle), for dictionaries: ``==`` on TIR variables builds an expression."""
    return node.__chandle__()


def _short(node) -> str:
    return " ".join(str(node).split())[:120]


# ------------------------------------------------------------------ TIR host code -> launches
MAX_LAUNCHES_PER_CALL = 100_000


@dataclass(frozen=True)
class _Ref:
    """A buffer in the host code: a tensor operand of the call or a workspace."""

    arg: KernelArg


def _trunc_div(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _binary_ops() -> dict:
    import operator

    from tvm import tirx

    return {tirx.Add: operator.add, tirx.Sub: operator.sub, tirx.Mul: operator.mul,
            tirx.FloorDiv: operator.floordiv, tirx.FloorMod: operator.mod, tirx.Div: _trunc_div,
            tirx.Mod: lambda a, b: a - b * _trunc_div(a, b), tirx.Min: min, tirx.Max: max,
            tirx.EQ: operator.eq, tirx.NE: operator.ne, tirx.LT: operator.lt, tirx.LE: operator.le,
            tirx.GT: operator.gt, tirx.GE: operator.ge, tirx.And: lambda a, b: a and b,
            tirx.Or: lambda a, b: a or b, tirx.RShift: operator.rshift, tirx.LShift: operator.lshift,
            tirx.BitwiseAnd: operator.and_, tirx.BitwiseOr: operator.or_, tirx.BitwiseXor: operator.xor}


class _HostCode:
    """Executes a TIR function's host code for one call (known argument shapes): binds its symbolic
    shapes, evaluates its lets, loops and conditions, and records the kernel launches and workspaces."""

    def __init__(self, name: str, func, operands: list):
        self.name = name
        self.env: dict[int, object] = {}
        self.launches: list[KernelLaunch] = []
        self.workspaces: list[int] = []
        self.binary = _binary_ops()
        if len(operands) != len(func.params):
            raise OpenCLRunError(f"main calls {name} with {len(operands)} arguments, it takes {len(func.params)}")
        for i, (param, value) in enumerate(zip(func.params, operands)):
            self._bind_param(i, param, value)
        self.visit(func.body)

    def fail(self, what: str):
        raise OpenCLRunError(f"{self.name}: {what}")

    def _bind_param(self, i: int, param, value) -> None:
        from tvm.tirx.buffer import BufferType

        if not isinstance(param.ty, BufferType):
            if not isinstance(value, int):
                self.fail(f"parameter {param} is a scalar, main passes a tensor")
            self.env[_key(param)] = value
            return
        if isinstance(value, int):
            self.fail(f"parameter {param} is a buffer, main passes the integer {value}")
        shape = value
        dims = list(param.ty.shape)
        if len(dims) != len(shape):
            self.fail(f"parameter {param} has {len(dims)} dimensions, main passes a tensor of shape {list(shape)}")
        from tvm import tirx

        for dim, actual in zip(dims, shape):
            if isinstance(dim, tirx.Var) and _key(dim) not in self.env:
                self.env[_key(dim)] = int(actual)  # a symbolic shape takes the call's value
            elif self.eval(dim) != actual:
                self.fail(f"parameter {param} expects shape {list(dims)}, main passes {list(shape)}")
        offset = param.ty.elem_offset
        if isinstance(offset, tirx.Var) and _key(offset) not in self.env:
            self.env[_key(offset)] = 0  # every tensor starts its own buffer (views are sub-buffers)
        compact = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
        for stride, actual in zip(list(param.ty.strides or []), compact):
            if isinstance(stride, tirx.Var) and _key(stride) not in self.env:
                self.env[_key(stride)] = actual
        self.env[_key(param)] = _Ref(KernelArg("operand", i))

    # -- expressions
    def eval(self, expr):
        import tvm
        from tvm import tirx

        if isinstance(expr, (tirx.IntImm, tirx.FloatImm)):
            return expr.value
        if isinstance(expr, tirx.Var):
            if _key(expr) not in self.env:
                self.fail(f"{expr} is used before it has a value")
            return self.env[_key(expr)]
        op = self.binary.get(type(expr))
        if op is not None:
            return op(self.eval(expr.a), self.eval(expr.b))
        if isinstance(expr, tirx.Not):
            return not self.eval(expr.a)
        if isinstance(expr, tirx.BitwiseNot):
            return ~self.eval(expr.a)
        if isinstance(expr, tirx.Cast):
            value = self.eval(expr.value)
            dtype = _dtype(expr)
            return bool(value) if dtype == "bool" else float(value) if dtype.startswith(("float", "bfloat")) \
                else int(value)
        if isinstance(expr, tirx.Select):
            return self.eval(expr.true_value) if self.eval(expr.condition) else self.eval(expr.false_value)
        if isinstance(expr, tirx.Let):
            self.env[_key(expr.var)] = self.eval(expr.value)
            return self.eval(expr.body)
        if isinstance(expr, tvm.ir.expr.Call):
            name = expr.op.name
            if name == "tirx.buffer_data":
                return self.eval(expr.args[0])
            if name == "tirx.if_then_else":
                return self.eval(expr.args[1]) if self.eval(expr.args[0]) else self.eval(expr.args[2])
        self.fail(f"the host code computes {_short(expr)}, which the PoCL launcher cannot evaluate")

    # -- statements
    def visit(self, stmt) -> None:
        import tvm
        from tvm import tirx

        if isinstance(stmt, tirx.SeqStmt):
            for s in stmt:
                self.visit(s)
        elif isinstance(stmt, tirx.DeclBuffer):
            self.env[_key(stmt.buffer)] = self.eval(stmt.data)
        elif isinstance(stmt, tirx.AllocBuffer):
            self._allocate(stmt.buffer)
        elif isinstance(stmt, (tirx.Bind, tirx.LetStmt)):
            self.env[_key(stmt.var)] = self.eval(stmt.value)
        elif isinstance(stmt, tirx.AttrStmt):
            self.visit(stmt.body)
        elif isinstance(stmt, tirx.For):
            begin, extent = self.eval(stmt.min), self.eval(stmt.extent)
            step = self.eval(stmt.step) if stmt.step is not None else 1
            for i in range(begin, begin + extent, step):
                self.env[_key(stmt.loop_var)] = i
                self.visit(stmt.body)
        elif isinstance(stmt, tirx.IfThenElse):
            branch = stmt.then_case if self.eval(stmt.condition) else stmt.else_case
            if branch is not None:
                self.visit(branch)
        elif isinstance(stmt, tirx.AssertStmt):
            if not self.eval(stmt.condition):
                self.fail(f"a host-code check fails: {_short(stmt.condition)}")
        elif isinstance(stmt, tirx.Evaluate):
            call = stmt.value
            if isinstance(call, tvm.ir.expr.Call) and call.op.name == "tirx.call_ffi_kernel":
                self._launch(call)
            elif not (isinstance(call, tvm.ir.expr.Call) and _is_set_device(call)):
                self.fail(f"the host code evaluates {_short(call)}; the PoCL launcher follows kernel launches, "
                          "loops, conditions and lets")
        else:
            self.fail(f"the host code has a {type(stmt).__name__} ({_short(stmt)}), which the PoCL launcher does "
                      "not follow")

    def _allocate(self, buffer) -> None:
        ty = buffer.ty
        scope = str(getattr(ty, "storage_scope", "global") or "global")
        if scope != "global":
            self.fail(f"the host code allocates {buffer} in scope '{scope}'")
        count = 1
        for d in ty.shape:
            count *= int(self.eval(d))
        self.env[_key(buffer)] = _Ref(KernelArg("workspace", len(self.workspaces)))
        dtype, _, lanes = str(ty.dtype).partition("x")  # a vector type like float32x4 (texture-lowered code)
        self.workspaces.append(count * np.dtype(dtype).itemsize * int(lanes or 1))

    def _launch(self, call) -> None:
        tags = [str(t) for t in call.attrs.launch_params]
        kernel = str(call.args[0].value)
        values = list(call.args[1:])
        split = len(values) - len(tags)
        args = []
        for expr in values[:split]:
            value = self.eval(expr)
            if isinstance(value, _Ref):
                args.append(value.arg)
            else:
                args.append(KernelArg("scalar", value=value, dtype=_dtype(expr)))
        grid, block, dims = [1, 1, 1], [1, 1, 1], 0
        for tag, extent in zip(tags, values[split:]):
            if tag not in _THREAD_AXES:
                self.fail(f"kernel {kernel} has launch parameter '{tag}' (dynamic shared memory or another axis "
                          "the PoCL launcher does not handle)")
            level, axis = _THREAD_AXES[tag]
            (grid if level == 0 else block)[axis] = int(self.eval(extent))
            dims = max(dims, axis + 1)
        if len(self.launches) >= MAX_LAUNCHES_PER_CALL:
            self.fail(f"more than {MAX_LAUNCHES_PER_CALL} kernel launches in one call")
        self.launches.append(KernelLaunch(kernel, tuple(args), tuple(grid[d] * block[d] for d in range(dims)),
                                          tuple(block[:dims])))


def _dtype(expr) -> str:
    """The dtype of a TIR expression ("int32", "float32", ...)."""
    return str(expr.ty.dtype)


def _is_set_device(call) -> bool:
    from tvm import tirx

    return (call.op.name in ("tirx.tvm_call_packed", "tirx.call_packed") and call.args
            and isinstance(call.args[0], tirx.StringImm) and call.args[0].value == "__tvm_set_device")


# ------------------------------------------------------------------ Relax main -> steps
def _main_plan(module, host_functions: dict) -> OpenCLPlan:
    import tvm
    from tvm import relax

    main = module["main"]
    variables: dict[int, int] = {}  # relax variable -> index of its value
    shapes: dict[int, tuple[int, ...]] = {}  # value index -> tensor shape
    constants: list[np.ndarray] = []
    constant_scopes: list[str] = []
    scopes = [str(v.memory_scope) for v in (module.global_infos.get("vdevice") or [])]  # alloc_tensor's index
    textures: set[int] = set()  # values held in images
    constant_index: dict[int, int] = {}
    tuples: dict[int, list[int]] = {}  # a tuple variable -> the tensor variables it holds
    expanded: dict[tuple, _HostCode] = {}  # (function, argument shapes) -> its launches
    inputs = []

    def define(var, shape=None) -> int:
        variables[_key(var)] = len(variables)
        if shape is not None:
            shapes[variables[_key(var)]] = tuple(shape)
        return variables[_key(var)]

    for p in main.params:
        shape, dtype = _static_tensor(p.ty, f"input '{p.name}'")
        define(p, shape)
        inputs.append((p.name, shape, dtype))

    def operand(expr) -> Operand:
        from tvm import tirx

        if isinstance(expr, relax.Var):
            if _key(expr) not in variables:
                raise OpenCLRunError(f"main: {expr.name} is used before it is defined")
            return Operand("var", variables[_key(expr)])
        if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
            if _key(expr) not in constant_index:
                constant_index[_key(expr)] = len(constants)
                constants.append(expr.value.numpy())
                vdevice = getattr(expr.ty, "vdevice", None)
                constant_scopes.append(str(vdevice.memory_scope) if vdevice is not None else "global")
            return Operand("const", constant_index[_key(expr)])
        if isinstance(expr, tirx.IntImm):
            return Operand("int", value=int(expr.value))
        raise OpenCLRunError(f"main: an argument {_short(expr)} is neither a tensor nor an integer")

    def arguments(args) -> list[Operand]:
        out = []
        for a in args:
            if isinstance(a, relax.ShapeExpr):  # symbolic values TVM passes to a TIR function
                out.extend(operand(v) for v in a.values)
            else:
                out.append(operand(a))
        return out

    def tensors(expr) -> list[int]:
        """The variables a (possibly nested) tuple expression or tuple variable stands for."""
        if isinstance(expr, relax.Tuple):
            return [leaf for f in expr.fields for leaf in tensors(f)]
        if isinstance(expr, relax.Var) and _key(expr) in tuples:
            return list(tuples[_key(expr)])
        found = operand(expr)
        if found.kind != "var":
            raise OpenCLRunError(f"main returns a constant ({_short(expr)})")
        return [found.index]

    def shape_of(o: Operand):
        if o.kind == "int":
            return o.value
        if o.kind == "const":
            return tuple(constants[o.index].shape)
        if o.index not in shapes:
            raise OpenCLRunError("main passes a value that is not a tensor to a TIR function")
        return shapes[o.index]

    steps: list[Step] = []
    body = main.body
    for block in body.blocks:
        for binding in block.bindings:
            value, var = binding.value, binding.var
            if not isinstance(value, relax.Call):
                if isinstance(value, relax.Var) and _key(value) in tuples:
                    tuples[_key(var)] = tuples[_key(value)]
                elif isinstance(value, relax.Var):  # an alias
                    variables[_key(var)] = variables[_key(value)]
                elif isinstance(value, relax.Tuple):  # the results, gathered
                    tuples[_key(var)] = [leaf for f in value.fields for leaf in tensors(f)]
                elif isinstance(value, relax.TupleGetItem) and _key(value.tuple_value) in tuples:
                    variables[_key(var)] = tuples[_key(value.tuple_value)][int(value.index)]
                else:
                    raise OpenCLRunError(f"main: {var.name} = {_short(value)} is not a call")
                continue
            op = value.op
            if isinstance(op, tvm.ir.GlobalVar):
                name = op.name_hint
                if name not in host_functions:
                    raise OpenCLRunError(f"main calls {name}, which is not a TIR function of the build")
                operands = tuple(arguments(value.args))
                signature = (name, tuple(shape_of(o) for o in operands))
                if signature not in expanded:
                    expanded[signature] = _HostCode(name, host_functions[name], list(signature[1]))
                code = expanded[signature]
                steps.append(Step("call", function=name, operands=operands, launches=tuple(code.launches),
                                  workspaces=tuple(code.workspaces)))
                define(var)
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.vm.alloc_storage":
                scope = str(value.args[3].value) if len(value.args) > 3 else "global"
                if scope != "global":
                    raise OpenCLRunError(f"main allocates storage in scope '{scope}' (textures are not handled)")
                steps.append(Step("storage", var=define(var), nbytes=int(value.args[0].values[0].value)))
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.vm.alloc_tensor":
                storage = operand(value.args[0])
                shape = tuple(int(d.value) for d in value.args[2].values)
                index = int(value.args[4].value) if len(value.args) > 4 else 0
                scope = scopes[index] if 0 <= index < len(scopes) else "global"
                steps.append(Step("tensor", var=define(var, shape), source=storage.index,
                                  offset=int(value.args[1].value), shape=shape, dtype=str(value.args[3].value),
                                  scope=scope))
                if scope != "global":
                    textures.add(steps[-1].var)
            elif isinstance(op, tvm.ir.Op) and op.name in ("relax.vm.kill_object", "relax.null_value"):
                define(var)  # kill_object drops a reference; the object lives on while a tuple or view holds it
            elif isinstance(op, relax.ExternFunc) and op.global_symbol == "vm.builtin.reshape":
                source = operand(value.args[0])
                shape, dtype = _static_tensor(var.ty, f"main: {var.name}")
                if source.kind != "var":
                    raise OpenCLRunError(f"main reshapes a constant ({var.name})")
                if source.index in textures:
                    raise OpenCLRunError(f"main reshapes a tensor held in an image ({var.name})")
                steps.append(Step("reshape", var=define(var, shape), source=source.index, shape=shape, dtype=dtype))
            elif isinstance(op, relax.ExternFunc) and op.global_symbol == "vm.builtin.to_device":
                source = operand(value.args[0])  # a copy into another memory scope (buffer <-> image)
                shape, dtype = _static_tensor(var.ty, f"main: {var.name}")
                scope = str(value.args[3].value) if len(value.args) > 3 else "global"
                if source.kind != "var":
                    raise OpenCLRunError(f"main copies a constant to the device ({var.name})")
                steps.append(Step("copy", var=define(var, shape), source=source.index, shape=shape, dtype=dtype,
                                  scope=scope))
                if scope != "global":
                    textures.add(steps[-1].var)
            elif isinstance(op, relax.ExternFunc) and op.global_symbol in _CHECKS_ONLY:
                define(var)
            else:
                what = op.global_symbol if isinstance(op, relax.ExternFunc) else getattr(op, "name", str(op))
                raise OpenCLRunError(f"main calls {what}, which the PoCL launcher does not handle")
    results = tensors(body.body)
    specs = [_static_tensor(ty, "main's result") for ty in _flatten_type(main.ret_ty)]
    if len(specs) != len(results):
        raise OpenCLRunError(f"main returns {len(results)} tensors, its type lists {len(specs)}")
    return OpenCLPlan("", inputs, steps, results, specs, constants, constant_scopes)


def _flatten_type(ty) -> list:
    from tvm import relax

    if isinstance(ty, relax.TupleType):
        return [leaf for f in ty.fields for leaf in _flatten_type(f)]
    return [ty]


def _static_tensor(ty, what: str) -> tuple[tuple[int, ...], str]:
    from tvm import relax, tirx

    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise OpenCLRunError(f"{what} is not a tensor of known shape")
    dims = []
    for d in ty.shape.values:
        if not isinstance(d, tirx.IntImm):
            raise OpenCLRunError(f"{what} has a dynamic shape")
        dims.append(int(d.value))
    return tuple(dims), str(ty.dtype)


# ------------------------------------------------------------------ running the plan on OpenCL
@dataclass
class _Tensor:
    buffer: object  # pyopencl Buffer, or Image (a tensor in a texture scope)
    shape: tuple[int, ...]
    dtype: str
    scope: str = "global"


@dataclass
class OpenCLRun:
    outputs: list[np.ndarray]
    platform: str
    device: str
    launches: int
    build_seconds: float
    run_seconds: float


class OpenCLRunner:
    """The plan's program built once on the OpenCL device; ``run`` executes ``main`` on inputs."""

    def __init__(self, plan: OpenCLPlan):
        import pyopencl as cl

        self.plan = plan
        self.context, self.device = opencl_device()
        self.queue = cl.CommandQueue(self.context)
        start = time.perf_counter()
        try:
            self.program = cl.Program(self.context, plan.source).build()
        except cl.Error as e:
            raise OpenCLRunError(f"{self.device.platform.name} could not build the OpenCL program: "
                                 f"{one_line(e, 300)}") from None
        self.build_seconds = time.perf_counter() - start
        self.kernels = {k.function_name: k for k in self.program.all_kernels()}
        self.max_group = int(self.device.max_work_group_size)
        scopes = plan.constant_scopes or ["global"] * len(plan.constants)
        self._constants = [self._upload(np.ascontiguousarray(c)) if scope == "global"
                           else self._image(tuple(c.shape), c.dtype.name, scope, np.ascontiguousarray(c))
                           for c, scope in zip(plan.constants, scopes)]

    def _upload(self, array: np.ndarray) -> _Tensor:
        import pyopencl as cl

        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
        host = array if array.nbytes else np.zeros(1, np.uint8)
        return _Tensor(cl.Buffer(self.context, flags, hostbuf=host), tuple(array.shape), array.dtype.name)

    def _image(self, shape: tuple[int, ...], dtype: str, scope: str, host: np.ndarray | None = None) -> _Tensor:
        """A tensor in a texture scope: an image as TVM's OpenCL runtime makes it (adreno_texture)."""
        from sculpt.backends.tvm.adreno_texture import make_image

        return _Tensor(make_image(self.context, self.queue, tuple(shape), dtype, scope, host), tuple(shape), dtype,
                       scope)

    def _copy(self, source: _Tensor, step: Step) -> _Tensor:
        """vm.builtin.to_device: ``source`` copied into a new tensor in ``step.scope`` (buffer or image)."""
        from sculpt.backends.tvm.adreno_texture import copy_tensor

        if step.scope == "global":
            nbytes = int(np.prod(step.shape, dtype=np.int64)) * np.dtype(step.dtype).itemsize
            target = _Tensor(self._buffer(nbytes), step.shape, step.dtype)
        else:
            target = self._image(step.shape, step.dtype, step.scope)
        copy_tensor(self.queue, (source.buffer, source.shape, source.scope), (target.buffer, target.shape, target.scope))
        return target

    def _buffer(self, nbytes: int):
        """A new device buffer filled with 0xFF bytes (NaN as floats, -1 as integers): a kernel that leaves
        part of its output unwritten shows as NaN, never as what a previous run left in reused memory."""
        import pyopencl as cl

        buffer = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, size=max(int(nbytes), 1))
        cl.enqueue_fill_buffer(self.queue, buffer, np.uint8(0xFF), 0, max(int(nbytes), 1))
        return buffer

    def run(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> OpenCLRun:
        import pyopencl as cl

        plan = self.plan
        values: dict[int, object] = {}
        ordered = _ordered_feeds(plan, feeds)
        for i, array in enumerate(ordered):
            values[i] = self._upload(array)
        launched = 0
        start = time.perf_counter()
        for step in plan.steps:
            if step.op == "storage":
                values[step.var] = self._buffer(step.nbytes)
            elif step.op == "copy":
                values[step.var] = self._copy(values[step.source], step)
            elif step.op == "tensor" and step.scope != "global":
                values[step.var] = self._image(step.shape, step.dtype, step.scope)
            elif step.op == "tensor":
                values[step.var] = _Tensor(self._view(values[step.source], step), step.shape, step.dtype)
            elif step.op == "reshape":
                source = values[step.source]
                values[step.var] = _Tensor(source.buffer, step.shape, step.dtype)
            elif step.op == "call":
                tensors = [self._constants[o.index] if o.kind == "const" else values.get(o.index)
                           for o in step.operands]
                launched += self._call(step, tensors)
        self.queue.finish()
        seconds = time.perf_counter() - start
        outputs = []
        for var, (shape, dtype) in zip(plan.results, plan.result_specs):
            out = np.empty(shape, dtype)
            if values[var].scope != "global":  # an image (adreno_texture)
                from sculpt.backends.tvm.adreno_texture import copy_tensor

                copy_tensor(self.queue, (values[var].buffer, shape, values[var].scope), (out, shape, "host"))
            else:
                cl.enqueue_copy(self.queue, out, values[var].buffer)
            outputs.append(out)
        self.queue.finish()
        return OpenCLRun(outputs, self.device.platform.name, self.device.name, launched, self.build_seconds, seconds)

    def _view(self, storage, step: Step):
        if step.offset == 0:
            return storage
        align = int(self.device.mem_base_addr_align) // 8
        if step.offset % align:
            raise OpenCLRunError(f"a tensor at byte offset {step.offset} of its storage is not aligned to the "
                                 f"device's {align} bytes")
        nbytes = int(np.prod(step.shape, dtype=np.int64)) * np.dtype(step.dtype).itemsize
        return storage.get_sub_region(step.offset, nbytes)

    def _call(self, step: Step, tensors: list) -> int:
        import pyopencl as cl

        workspaces = [self._buffer(n) for n in step.workspaces]
        for launch in step.launches:
            kernel = self.kernels.get(launch.kernel)
            if kernel is None:
                raise OpenCLRunError(f"kernel {launch.kernel} is not in the built program")
            args = []
            for a in launch.args:
                if a.kind == "operand":
                    args.append(tensors[a.index].buffer)
                elif a.kind == "workspace":
                    args.append(workspaces[a.index])
                else:
                    args.append(np.array(a.value, dtype=a.dtype)[()])
            if int(np.prod(launch.local_size)) > self.max_group:
                raise OpenCLRunError(f"kernel {launch.kernel}: work-group {launch.local_size} exceeds the device's "
                                     f"maximum of {self.max_group} work-items")
            kernel.set_args(*args)
            try:
                cl.enqueue_nd_range_kernel(self.queue, kernel, launch.global_size, launch.local_size)
            except cl.Error as e:
                raise OpenCLRunError(f"launching kernel {launch.kernel} (global {launch.global_size}, local "
                                     f"{launch.local_size}) failed: {one_line(e, 200)}") from None
        return len(step.launches)


def _ordered_feeds(plan: OpenCLPlan, feeds) -> list[np.ndarray]:
    if not isinstance(feeds, Mapping):
        feeds = {name: value for (name, _, _), value in zip(plan.inputs, feeds)}
    ordered = []
    for name, shape, dtype in plan.inputs:
        if name not in feeds:
            raise ShapeError(f"no value for input '{name}' of the OpenCL program")
        value = np.asarray(feeds[name])
        if tuple(value.shape) != shape or value.dtype != np.dtype(dtype):
            raise ShapeError(f"input '{name}' is {value.dtype}{list(value.shape)}; the OpenCL program was built for "
                             f"{dtype}{list(shape)}")
        ordered.append(np.ascontiguousarray(value))
    return ordered


# ------------------------------------------------------------------ models and artifacts
def plan_model(model, target, *, input_shapes=None, canonicalize: bool = True,
               recurrent: str | None = None) -> OpenCLPlan:
    """The OpenCL plan of a sculpt Model for an OpenCL target (a name like "mali", a dict or a
    NamedTarget), prepared and imported as ``sculpt compile`` does (canonicalize, static shapes);
    ``recurrent``: how LSTM/GRU are imported (``import_to_relax``'s option; default a loop)."""
    from sculpt.backends.tvm.artifact import prepare_model
    from sculpt.backends.tvm.relax_import import import_to_relax
    from sculpt.backends.tvm.targets import get_target

    target = get_target(target)
    if not target.is_opencl:
        raise OpenCLRunError(f"target '{target.name}' is not an OpenCL target")
    work, _ = prepare_model(model, input_shapes, canonicalize=canonicalize)
    _, plan = plan_build(import_to_relax(work, recurrent=recurrent), target.tvm_target())
    return plan


def run_artifact_kernels(artifact, model_path, ordered_inputs: Sequence[np.ndarray], *,
                         progress=None) -> OpenCLRun:
    """Run an exported Mali/Adreno artifact's kernels on PoCL.

    The launch plan is not in the artifact (its host code is aarch64 machine code), so the model it was
    compiled from is built again the same way and the plan read from that build; its OpenCL C must be
    byte-identical to the artifact's ``.cl``, so the kernels launched are the artifact's own."""
    from sculpt.backends.tvm.artifact import ArtifactError

    manifest = artifact.manifest
    source_path = artifact.opencl_source_path
    if source_path is None or not source_path.is_file():
        raise ArtifactError(f"{artifact.library.name}: the OpenCL source beside it is missing ({source_path})")
    options = manifest.get("options") or {}
    if manifest.get("tuning") or (options.get("sparse") or {}).get("mode", "off") != "off":
        raise OpenCLRunError(f"{artifact.library.name} was compiled with tuning or sparse kernels; running its "
                             "kernels on PoCL supports plain compiles only (use --compile-only)")
    model = Model.load(model_path)
    shapes = {s.name: s.shape for s in artifact.inputs if s.name in model.input_names}
    if progress:
        progress(f"rebuilding {Path(model_path).name} for {artifact.target.name} to read the kernel launch order")
    plan = plan_model(model, artifact.target, input_shapes=shapes,
                      canonicalize="canonicalize" in (manifest.get("passes") or []))
    if plan.source != source_path.read_text():
        raise OpenCLRunError(f"the kernels built from {model_path} differ from {source_path.name}: the artifact "
                             "was compiled from another model, other options or another TVM")
    if progress:
        progress(f"running {plan.launches} kernel launches of {artifact.library.name} on PoCL")
    return OpenCLRunner(plan).run(list(ordered_inputs))
