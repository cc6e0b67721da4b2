"""GPU builds that do not fail on one function: TVM's own GPU pipeline, with its default schedules
applied rule by rule and function by function.

TVM's GPU pipelines (the generic one Mali uses, Adreno's) schedule every fused TIR function with a
list of dlight rules (matmul, GEMV, reductions, then a fallback that binds the spatial loops to
blocks and threads). When a rule raises on a function (Mali, PP-OCRv6 rec: the matmul rule on a
conv2d+add+relu+pad, "There are some consumers of the cache-write stage that are not properly
inlined") the whole build fails. :func:`fail_safe_gpu_pipeline` is the same pipeline with each
ApplyDefaultSchedule step replaced by one where a rule that raises is skipped for that function:
the next rule is tried, down to dlight's plain thread-bound loop nest (``dlight.gpu.Fallback``),
which is always legal. A rule whose schedule allocates more shared (work-group local) memory than
the target's ``max_shared_memory_per_block`` is skipped the same way: dlight does not check it, and
GeneralReduction on a conv keeps the conv's whole output in shared memory, one work-group for the
tensor (6.5 MB on PP-OCRv6 det small; Adreno and Mali give 16-32 KiB, PoCL's CPU device 1 MiB).
Each such function is reported (:class:`ScheduleFallback`).

Two more steps make the OpenCL C legal where TVM's would not be: parameters of Relax functions whose
names are not C identifiers (ONNX input names like ``gpu_0/data_0``: TVM's ONNX importer only replaces
dots) are renamed first, since the TIR functions legalized from them name their buffers, and so the
OpenCL kernel parameters, after them; and TIR function names over MAX_FUNCTION_NAME characters are
shortened."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sculpt.common import one_line


@dataclass
class ScheduleFallback:
    """A function on which a dlight rule raised (or went over the shared memory limit): the rule, the
    reason, the rule that scheduled it."""

    function: str
    failed_rule: str
    reason: str
    scheduled_by: str

    def describe(self) -> str:
        return f"{self.function} ({self.failed_rule} failed: {self.reason}; scheduled by {self.scheduled_by})"


def fail_safe_gpu_pipeline(target, fallbacks: list[ScheduleFallback]):
    """TVM's default Relax pipeline for the GPU ``target`` with fail-safe scheduling steps; the
    functions that fell back are appended to ``fallbacks``."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="SculptFailSafeGPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            legalize = relax.pipeline.legalize_passes(target)
            if "texture" in target.keys:  # Adreno's texture lowering, made to build (adreno_texture)
                from sculpt.backends.tvm.adreno_texture import legalize_passes as legalize_textures

                legalize = legalize_textures(target)
            passes = (relax.pipeline.library_dispatch_passes(target) + legalize
                      + relax.pipeline.dataflow_lower_passes(target) + relax.pipeline.finalize_passes(target))
            safe, shortened = [], False
            for p in passes:
                if hasattr(p, "rules") and not shortened:  # the functions are fused by now
                    safe += [_shorten_long_names(), relax.transform.NormalizeGlobalVar()]
                    shortened = True
                safe.append(_FailSafeSchedule(p.rules, fallbacks) if hasattr(p, "rules") else p)
            return tvm.transform.Sequential([_c_identifier_params(), _gpu_recurrent_loops(target)] + safe)(mod)

    return _pipeline


def _gpu_recurrent_loops(target):
    """A pass giving every LSTM loop function (recurrent_loop: written for the CPU, marked scheduled)
    its GPU form: one work-group, threads over the gates, state and gates in shared memory."""
    import tvm

    from sculpt.backends.tvm.recurrent_loop import replace_loops_for_gpu

    threads = int(target.attrs.get("max_num_threads", 256) or 256)

    @tvm.transform.module_pass(opt_level=0, name="SculptGPURecurrentLoops")
    def swap(mod, _ctx):
        try:
            return replace_loops_for_gpu(mod, min(threads, 256), _shared_memory_limit(target))[0]
        except ValueError as e:
            from sculpt.backends.tvm.relax_import import TVMImportError

            raise TVMImportError(str(e)) from None

    return swap


_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def c_identifier(name: str) -> str:
    """``name`` with every character that cannot be in a C identifier replaced by '_' (and a leading
    '_' when it starts with a digit)."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name) or "_"
    return out if not out[0].isdigit() else "_" + out


def _c_identifier_params():
    """A pass renaming the parameters of Relax functions whose names are not C identifiers (the
    parameters keep their order, types and uses; only the names change)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="CIdentifierParameterNames")
    def rename(mod, _ctx):
        mod = mod.clone()  # the caller's module keeps its names (plan_build reads the inputs' names from it)
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or all(_C_IDENTIFIER.fullmatch(p.name) for p in func.params):
                continue
            taken = {p.name for p in func.params}
            new_params, renamed = [], {}
            for p in func.params:
                if _C_IDENTIFIER.fullmatch(p.name):
                    new_params.append(p)
                    continue
                name = base = c_identifier(p.name)
                count = 1
                while name in taken:
                    name, count = f"{base}_{count}", count + 1
                taken.add(name)
                renamed[p] = relax.Var(name, p.ty)
                new_params.append(renamed[p])
            bound = func.bind_params(renamed)  # replaces the uses, drops the renamed parameters
            mod[gvar] = relax.Function(new_params, bound.body, bound.ret_ty, bound.is_pure, bound.attrs, bound.span)
        return mod

    return rename


# a fused function is named after every op it holds (an unrolled LSTM cell: 600+ characters), and its
# kernel after it; PoCL's kernel cache cannot make a file name that long (an assertion ends the process)
MAX_FUNCTION_NAME = 96


def _shorten_long_names():
    """A pass giving each TIR function whose name is over MAX_FUNCTION_NAME characters a short global
    symbol (its start and a hash of the whole name); NormalizeGlobalVar then renames it to that."""
    import hashlib

    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="ShortenLongFunctionNames")
    def shorten(mod, _ctx):
        taken = {gv.name_hint for gv in mod.get_global_vars()}
        for gvar, func in list(mod.functions_items()):
            name = gvar.name_hint
            if isinstance(func, tirx.PrimFunc) and len(name) > MAX_FUNCTION_NAME and "global_symbol" not in func.attrs:
                short = f"{name[:MAX_FUNCTION_NAME - 17]}_{hashlib.sha1(name.encode()).hexdigest()[:16]}"
                assert short not in taken
                taken.add(short)
                mod[gvar] = func.with_attr("global_symbol", short)
        return mod

    return shorten


def _fail_safe_schedule_class():
    import tvm
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight

    @tvm.transform.module_pass(opt_level=0, name="FailSafeApplyDefaultSchedule")
    class FailSafeSchedule:
        """dlight's ApplyDefaultSchedule, where a rule that raises on a function is skipped for it."""

        def __init__(self, rules, fallbacks: list[ScheduleFallback]):
            self.rules = list(rules)
            self.fallbacks = fallbacks

        def transform_module(self, mod, _ctx):
            updated = {}
            for gvar, func in mod.functions_items():
                if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", 0) == 1:
                    continue
                target = func.attrs.get("target") or tvm.target.Target.current(allow_none=False)
                scheduled = self.schedule(gvar.name_hint, func, target, s_tir, dlight)
                if scheduled is not None:
                    updated[gvar] = scheduled.mod["main"].with_attr("tirx.is_scheduled", True)
            for gvar, func in updated.items():
                mod[gvar] = func
            return mod

        def schedule(self, name, func, target, s_tir, dlight):
            """The first schedule a rule gives, skipping rules that raise; None when every rule
            declines without an error (as TVM leaves such a function)."""
            failure = None

            def first(space):
                return space if isinstance(space, s_tir.Schedule) else space[0]

            limit = _shared_memory_limit(target)
            for rule in self.rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception as e:  # noqa: BLE001 (TVMError, ValueError, AssertionError, ...)
                    failure = failure or (type(rule).__name__, _last_line(e))
                    continue
                if space is not None:
                    used = shared_memory_bytes(first(space))
                    if limit is not None and used > limit:
                        failure = failure or (type(rule).__name__, f"{used} bytes of shared memory per block, over "
                                                                   f"the target's max_shared_memory_per_block {limit}")
                        continue
                    if failure is not None:
                        self.fallbacks.append(ScheduleFallback(name, *failure, type(rule).__name__))
                    return first(space)
            if failure is None:
                return None
            # a rule raised (or went over the shared memory) and the others declined: the plain
            # thread-bound loop nest, which uses no shared memory
            try:
                space = dlight.gpu.Fallback().apply(func, target, False)
            except Exception as e:  # noqa: BLE001
                space, failure = None, (failure[0], f"{failure[1]}; the fallback: {_last_line(e)}")
            if space is None:
                from sculpt.backends.tvm.relax_import import TVMImportError

                raise TVMImportError(f"no GPU schedule for {name}: {failure[0]} failed ({failure[1]})")
            self.fallbacks.append(ScheduleFallback(name, *failure, "Fallback"))
            return first(space)

    return FailSafeSchedule


def _shared_memory_limit(target) -> int | None:
    limit = target.attrs.get("max_shared_memory_per_block") if target is not None else None
    return int(limit) if limit is not None and int(limit) > 0 else None


def shared_memory_bytes(schedule) -> int:
    """Bytes of shared (work-group local) memory the scheduled function allocates: the buffers of
    scope shared or shared.dyn its blocks allocate (the cross-thread reductions lowered later add a
    work-group-sized buffer, 1 KiB at 256 threads, not counted)."""
    from tvm import tirx

    func = schedule.mod["main"]
    total = 0

    def visit(block_rv):
        nonlocal total
        for buf in schedule.get(block_rv).alloc_buffers:
            if buf.scope().startswith("shared"):
                count = 1
                for dim in buf.shape:  # a symbolic size cannot be a static OpenCL __local array: over any limit
                    count *= int(dim.value) if isinstance(dim, tirx.IntImm) else 1 << 40
                total += count * buf.dtype.itemsize
        for child in schedule.get_child_blocks(block_rv):
            visit(child)

    visit(schedule.get_sblock(func.body.block.name_hint))
    return total


_CLASS = None


def _FailSafeSchedule(rules, fallbacks):
    global _CLASS
    if _CLASS is None:
        _CLASS = _fail_safe_schedule_class()
    return _CLASS(rules, fallbacks)


def _last_line(error: Exception) -> str:
    """The last line of TVM's message (its tracebacks come first)."""
    text = str(error).strip()
    return one_line(text.splitlines()[-1] if text else type(error).__name__)
