"""Run the GPU program of a Mali/Adreno build on a real OpenCL implementation (PoCL, through pyopencl),
in the order TVM's host code runs it, and compare it with onnxruntime.

The apache-tvm wheel has no OpenCL runtime, so TVM's VM cannot run these builds here. This module
reads what the VM would do from the build itself:

* the Relax ``main`` after TVM's lowering pipeline: a straight line of storage and tensor
  allocations (the static memory plan, with its buffer reuse), calls of TIR functions, reshapes;
* each TIR function right before ``MakePackedAPI``: its device-kernel launches in order, each with
  its kernel name, arguments (the function's buffers, or constants) and launch extents.

Both are captured by a pass instrument while ``tvm.compile`` builds the executable, so the plan and
the OpenCL C source (``opencl.opencl_source`` of that same executable) come from one build. Launching
follows TVM's OpenCL runtime: work dimension = highest thread axis used + 1, local size = the
``threadIdx`` extents, global size = ``blockIdx`` extents x local size.

PoCL is a CPU implementation of OpenCL: a match shows that the kernels TVM generated, launched the way
TVM launches them, compute the model. It does not show how a Mali/Adreno driver compiles them, their
speed, or anything about float precision modes specific to those GPUs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sculpt.backends.tvm.opencl import OpenCLError, opencl_device

_THREAD_AXES = {"blockIdx.x": (0, 0), "blockIdx.y": (0, 1), "blockIdx.z": (0, 2),
                "threadIdx.x": (1, 0), "threadIdx.y": (1, 1), "threadIdx.z": (1, 2)}
_CHECKS_ONLY = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")  # input checks: done on the feeds


class OpenCLRunError(OpenCLError):
    """The build does something the PoCL launcher does not handle, or a launch failed."""


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class KernelArg:
    """One argument of a kernel launch: a buffer parameter of the TIR function (``param``), a
    workspace the function allocates (``workspace``), or a scalar (``value`` with ``dtype``)."""

    kind: str  # "param" | "workspace" | "scalar"
    index: int = -1
    value: int | float = 0
    dtype: str = ""


@dataclass(frozen=True)
class KernelLaunch:
    kernel: str
    args: tuple[KernelArg, ...]
    global_size: tuple[int, ...]
    local_size: tuple[int, ...]


@dataclass
class TIRFunction:
    """A TIR function of the build as its host code runs it: kernel launches in order."""

    name: str
    num_params: int
    launches: list[KernelLaunch]
    workspaces: list[int] = field(default_factory=list)  # bytes of each global workspace it allocates


@dataclass(frozen=True)
class Operand:
    """A value of ``main``: a variable (``var``), a constant tensor (``const``) or nothing (``null``)."""

    kind: str  # "var" | "const" | "null"
    index: int = -1


@dataclass(frozen=True)
class Step:
    """One instruction of ``main``.

    ``storage``: var <- a buffer of ``nbytes``; ``tensor``: var <- a view at ``offset`` into storage
    ``source``; ``reshape``: var <- ``source`` with ``shape``; ``call``: TIR function ``function`` on
    ``operands`` (outputs included, as TVM passes them)."""

    op: str
    var: int = -1
    source: int = -1
    nbytes: int = 0
    offset: int = 0
    shape: tuple[int, ...] = ()
    dtype: str = ""
    function: str = ""
    operands: tuple[Operand, ...] = ()


@dataclass
class OpenCLPlan:
    """Everything needed to run a build's GPU program without TVM's runtime."""

    source: str  # the OpenCL C of the build (all kernels)
    inputs: list[tuple[str, tuple[int, ...], str]]  # main's parameters: name, shape, dtype (vars 0..n-1)
    steps: list[Step]
    results: list[int]  # vars main returns, flattened
    result_specs: list[tuple[tuple[int, ...], str]]
    constants: list[np.ndarray]
    functions: dict[str, TIRFunction]

    @property
    def launches(self) -> int:
        """How many kernel launches one run makes."""
        return sum(len(self.functions[s.function].launches) for s in self.steps if s.op == "call")


def plan_build(mod, target) -> tuple[object, OpenCLPlan]:
    """Build the Relax module ``mod`` for an OpenCL ``target`` (a tvm.target.Target) with ``tvm.compile``,
    exactly as sculpt compiles it, and read the launch plan from the same build.

    Returns (executable, plan); ``plan.source`` is ``opencl.opencl_source(executable)``."""
    import tvm
    from tvm import relax

    from sculpt.backends.tvm.opencl import opencl_source

    captured: dict = {}

    @tvm.instrument.pass_instrument
    class _Capture:
        def run_after_pass(self, module, info):
            if any(gv.name_hint == "main" and isinstance(f, relax.Function) for gv, f in module.functions.items()):
                captured["relax"] = module  # the last one is the output of the Relax pipeline

        def run_before_pass(self, module, info):
            if info.name == "tirx.MakePackedAPI":
                captured["tir"] = module

    current = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=current.opt_level, config=dict(current.config),
                                   required_pass=list(current.required_pass),
                                   disabled_pass=list(current.disabled_pass), instruments=[_Capture()]):
        executable = tvm.compile(mod, target=target)
    if "relax" not in captured or "tir" not in captured:
        raise OpenCLRunError("could not observe TVM's lowering of the build (the Relax pipeline or "
                             "MakePackedAPI did not run)")
    source = opencl_source(executable)
    functions = _tir_functions(captured["tir"])
    plan = _main_plan(captured["relax"], functions)
    plan.source = source
    kernels = set(_defined_kernels(source))
    missing = sorted({launch.kernel for f in functions.values() for launch in f.launches} - kernels)
    if missing:
        raise OpenCLRunError(f"kernels launched by the host code but not in the OpenCL source: {', '.join(missing)}")
    return executable, plan


def _key(node) -> int:
    """Identity of a TVM node (its handle), for dictionaries: ``==`` on TIR variables builds an expression."""
    return node.__chandle__()


def _defined_kernels(source: str) -> list[str]:
    from sculpt.backends.tvm.opencl import kernel_definitions

    return list(kernel_definitions(source))


# ------------------------------------------------------------------ TIR host code -> launches
def _tir_functions(module) -> dict[str, TIRFunction]:
    functions = {}
    for gv, func in module.functions.items():
        if int(func.attrs.get("calling_conv", 0)) == 2:  # a device kernel
            continue
        functions[gv.name_hint] = _read_host_function(gv.name_hint, func)
    return functions


def _read_host_function(name: str, func) -> TIRFunction:
    import tvm
    from tvm import tirx

    params = {_key(p): i for i, p in enumerate(func.params)}
    aliases: dict = {}  # a buffer declared over another buffer's data -> that buffer
    workspaces: dict = {}  # buffer var -> workspace index
    sizes: list[int] = []
    launches: list[KernelLaunch] = []

    def origin(var) -> KernelArg:
        seen = 0
        while _key(var) in aliases and seen < 64:
            var, seen = aliases[_key(var)], seen + 1
        if _key(var) in params:
            return KernelArg("param", params[_key(var)])
        if _key(var) in workspaces:
            return KernelArg("workspace", workspaces[_key(var)])
        raise OpenCLRunError(f"{name}: a kernel argument ({var}) is neither a parameter nor a workspace")

    def argument(expr) -> KernelArg:
        if isinstance(expr, tvm.ir.expr.Call) and expr.op.name == "tirx.buffer_data":
            return origin(expr.args[0])
        if isinstance(expr, (tirx.IntImm, tirx.FloatImm)):
            return KernelArg("scalar", value=expr.value, dtype=str(expr.dtype))
        raise OpenCLRunError(f"{name}: a kernel argument computed on the host ({expr}) is not supported")

    def launch(call) -> KernelLaunch:
        tags = [str(t) for t in call.attrs.launch_params]
        kernel = str(call.args[0].value)
        values = list(call.args[1:])
        args, extents = values[: len(values) - len(tags)], values[len(values) - len(tags):]
        grid, block = [1, 1, 1], [1, 1, 1]
        dims = 0
        for tag, extent in zip(tags, extents):
            if tag not in _THREAD_AXES:
                raise OpenCLRunError(f"{name}: kernel {kernel} has launch parameter '{tag}' (dynamic shared "
                                     "memory or another axis the PoCL launcher does not handle)")
            if not isinstance(extent, tirx.IntImm):
                raise OpenCLRunError(f"{name}: kernel {kernel} has a dynamic launch extent {tag}={extent}")
            level, axis = _THREAD_AXES[tag]
            (grid if level == 0 else block)[axis] = int(extent.value)
            dims = max(dims, axis + 1)
        return KernelLaunch(kernel, tuple(argument(a) for a in args),
                            tuple(grid[d] * block[d] for d in range(dims)), tuple(block[:dims]))

    def visit(stmt) -> None:
        if isinstance(stmt, tirx.SeqStmt):
            for s in stmt:
                visit(s)
        elif isinstance(stmt, tirx.DeclBuffer):
            data = stmt.data
            if isinstance(data, tvm.ir.expr.Call) and data.op.name == "tirx.buffer_data":
                aliases[_key(stmt.buffer)] = data.args[0]
            else:
                raise OpenCLRunError(f"{name}: buffer {stmt.buffer} is declared over {data}, not a buffer")
        elif isinstance(stmt, tirx.AllocBuffer):
            buffer = stmt.buffer
            scope = str(buffer.scope() if callable(getattr(buffer, "scope", None)) else "global")
            if scope not in ("global", ""):
                raise OpenCLRunError(f"{name}: host code allocates {buffer} in scope '{scope}'")
            count = 1
            for d in buffer.shape:
                if not isinstance(d, tirx.IntImm):
                    raise OpenCLRunError(f"{name}: workspace {buffer} has a dynamic size")
                count *= int(d.value)
            workspaces[_key(buffer)] = len(sizes)
            sizes.append(count * np.dtype(str(buffer.dtype)).itemsize)
        elif isinstance(stmt, tirx.AttrStmt):
            visit(stmt.body)
        elif isinstance(stmt, tirx.Evaluate):
            call = stmt.value
            if isinstance(call, tvm.ir.expr.Call) and call.op.name == "tirx.call_ffi_kernel":
                launches.append(launch(call))
            elif isinstance(call, tvm.ir.expr.Call) and _is_set_device(call):
                pass
            else:
                raise OpenCLRunError(f"{name}: host code evaluates {_short(call)}; the PoCL launcher only "
                                     "follows kernel launches")
        else:
            raise OpenCLRunError(f"{name}: host code has a {type(stmt).__name__} "
                                 f"({_short(stmt)}); the PoCL launcher only follows straight-line kernel launches")

    visit(func.body)
    return TIRFunction(name, len(func.params), launches, sizes)


def _is_set_device(call) -> bool:
    from tvm import tirx

    return (call.op.name in ("tirx.tvm_call_packed", "tirx.call_packed") and call.args
            and isinstance(call.args[0], tirx.StringImm) and call.args[0].value == "__tvm_set_device")


def _short(node) -> str:
    return " ".join(str(node).split())[:120]


# ------------------------------------------------------------------ Relax main -> steps
def _main_plan(module, functions: dict[str, TIRFunction]) -> OpenCLPlan:
    import tvm
    from tvm import relax

    main = module["main"]
    variables: dict = {}
    constants: list[np.ndarray] = []
    constant_index: dict[int, int] = {}
    tuples: dict[int, list[int]] = {}  # a tuple variable -> the tensor variables it holds
    inputs = []
    for p in main.params:
        shape, dtype = _static_tensor(p.ty, f"input '{p.name}'")
        variables[_key(p)] = len(variables)
        inputs.append((p.name, shape, dtype))

    def operand(expr) -> Operand:
        if isinstance(expr, relax.Var):
            if _key(expr) not in variables:
                raise OpenCLRunError(f"main: {expr.name} is used before it is defined")
            return Operand("var", variables[_key(expr)])
        if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
            if _key(expr) not in constant_index:
                constant_index[_key(expr)] = len(constants)
                constants.append(expr.value.numpy())
            return Operand("const", constant_index[_key(expr)])
        raise OpenCLRunError(f"main: an argument {_short(expr)} is not a tensor")

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

    def define(var) -> int:
        variables[_key(var)] = len(variables)
        return variables[_key(var)]

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
                if op.name_hint not in functions:
                    raise OpenCLRunError(f"main calls {op.name_hint}, which is not a TIR function of the build")
                operands = tuple(operand(a) for a in value.args)
                if len(operands) != functions[op.name_hint].num_params:
                    raise OpenCLRunError(f"main calls {op.name_hint} with {len(operands)} arguments, it takes "
                                         f"{functions[op.name_hint].num_params}")
                steps.append(Step("call", function=op.name_hint, operands=operands))
                define(var)
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.vm.alloc_storage":
                size = value.args[0]
                steps.append(Step("storage", var=define(var), nbytes=int(size.values[0].value)))
                scope = str(value.args[3].value) if len(value.args) > 3 else "global"
                if scope != "global":
                    raise OpenCLRunError(f"main allocates storage in scope '{scope}' (textures are not handled)")
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.vm.alloc_tensor":
                storage = operand(value.args[0])
                shape = tuple(int(d.value) for d in value.args[2].values)
                steps.append(Step("tensor", var=define(var), source=storage.index,
                                  offset=int(value.args[1].value), shape=shape, dtype=str(value.args[3].value)))
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.vm.kill_object":
                define(var)  # drops a reference; the object lives on while a tuple or view holds it
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.null_value":
                define(var)
            elif isinstance(op, relax.ExternFunc) and op.global_symbol == "vm.builtin.reshape":
                source = operand(value.args[0])
                shape, dtype = _static_tensor(var.ty, f"main: {var.name}")
                if source.kind != "var":
                    raise OpenCLRunError(f"main reshapes a constant ({var.name})")
                steps.append(Step("reshape", var=define(var), source=source.index, shape=shape, dtype=dtype))
            elif isinstance(op, relax.ExternFunc) and op.global_symbol in _CHECKS_ONLY:
                define(var)
            else:
                what = op.global_symbol if isinstance(op, relax.ExternFunc) else getattr(op, "name", str(op))
                raise OpenCLRunError(f"main calls {what}, which the PoCL launcher does not handle")
    results = tensors(body.body)
    specs = [_static_tensor(ty, "main's result") for ty in _flatten_type(main.ret_ty)]
    if len(specs) != len(results):
        raise OpenCLRunError(f"main returns {len(results)} tensors, its type lists {len(specs)}")
    return OpenCLPlan("", inputs, steps, results, specs, constants, functions)


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
    buffer: object  # pyopencl Buffer
    shape: tuple[int, ...]
    dtype: str


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
                                 f"{' '.join(str(e).split())[:300]}") from None
        self.build_seconds = time.perf_counter() - start
        self.kernels = {k.function_name: k for k in self.program.all_kernels()}
        self.max_group = int(self.device.max_work_group_size)
        self._constants = [self._upload(np.ascontiguousarray(c)) for c in plan.constants]

    def _upload(self, array: np.ndarray) -> _Tensor:
        import pyopencl as cl

        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
        host = array if array.nbytes else np.zeros(1, np.uint8)
        return _Tensor(cl.Buffer(self.context, flags, hostbuf=host), tuple(array.shape), array.dtype.name)

    def _buffer(self, nbytes: int):
        import pyopencl as cl

        return cl.Buffer(self.context, cl.mem_flags.READ_WRITE, size=max(int(nbytes), 1))

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
            elif step.op == "tensor":
                values[step.var] = _Tensor(self._view(values[step.source], step), step.shape, step.dtype)
            elif step.op == "reshape":
                source = values[step.source]
                values[step.var] = _Tensor(source.buffer, step.shape, step.dtype)
            elif step.op == "call":
                tensors = [self._constants[o.index] if o.kind == "const" else values[o.index] for o in step.operands]
                launched += self._call(plan.functions[step.function], tensors)
        self.queue.finish()
        seconds = time.perf_counter() - start
        outputs = []
        for var, (shape, dtype) in zip(plan.results, plan.result_specs):
            out = np.empty(shape, dtype)
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

    def _call(self, function: TIRFunction, tensors: list[_Tensor]) -> int:
        workspaces = [self._buffer(n) for n in function.workspaces]
        for launch in function.launches:
            kernel = self.kernels.get(launch.kernel)
            if kernel is None:
                raise OpenCLRunError(f"kernel {launch.kernel} is not in the built program")
            args = []
            for a in launch.args:
                if a.kind == "param":
                    args.append(tensors[a.index].buffer)
                elif a.kind == "workspace":
                    args.append(workspaces[a.index])
                else:
                    args.append(np.array(a.value, dtype=a.dtype)[()])
            if int(np.prod(launch.local_size)) > self.max_group:
                raise OpenCLRunError(f"kernel {launch.kernel}: work-group {launch.local_size} exceeds the device's "
                                     f"maximum of {self.max_group} work-items")
            kernel.set_args(*args)
            import pyopencl as cl

            try:
                cl.enqueue_nd_range_kernel(self.queue, kernel, launch.global_size, launch.local_size)
            except cl.Error as e:
                raise OpenCLRunError(f"launching kernel {launch.kernel} (global {launch.global_size}, local "
                                     f"{launch.local_size}) failed: {' '.join(str(e).split())[:200]}") from None
        return len(function.launches)


def _ordered_feeds(plan: OpenCLPlan, feeds) -> list[np.ndarray]:
    from sculpt.errors import ShapeError

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
def plan_model(model, target, *, input_shapes=None, canonicalize: bool = True) -> OpenCLPlan:
    """The OpenCL plan of a sculpt Model for an OpenCL target (a name like "mali", a dict or a
    NamedTarget), prepared and imported as ``sculpt compile`` does (canonicalize, static shapes)."""
    from sculpt.backends.tvm.artifact import prepare_model
    from sculpt.backends.tvm.relax_import import import_to_relax
    from sculpt.backends.tvm.targets import get_target

    target = get_target(target)
    if not target.is_opencl:
        raise OpenCLRunError(f"target '{target.name}' is not an OpenCL target")
    work, _ = prepare_model(model, input_shapes, canonicalize=canonicalize)
    _, plan = plan_build(import_to_relax(work), target.tvm_target())
    return plan


def run_model(model, target, feeds: Mapping[str, np.ndarray], *, input_shapes=None) -> OpenCLRun:
    """Build ``model`` for an OpenCL target and run its kernels on PoCL on ``feeds`` (by input name)."""
    plan = plan_model(model, target, input_shapes=input_shapes)
    return OpenCLRunner(plan).run([feeds[name] for name in model.input_names if name in feeds])


def run_artifact_kernels(artifact, model_path, ordered_inputs: Sequence[np.ndarray], *,
                         progress=None) -> OpenCLRun:
    """Run an exported Mali/Adreno artifact's kernels on PoCL.

    The launch plan is not in the artifact (its host code is aarch64 machine code), so the model it was
    compiled from is built again the same way and the plan read from that build; its OpenCL C must be
    byte-identical to the artifact's ``.cl``, so the kernels launched are the artifact's own."""
    from sculpt.backends.tvm.artifact import ArtifactError
    from sculpt.ir.model import Model

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
