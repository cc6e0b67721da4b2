"""GPU builds that do not fail on one function: TVM's own GPU pipeline, with its default schedules
applied rule by rule and function by function.

TVM's GPU pipelines (the generic one Mali uses, Adreno's) schedule every fused TIR function with a
list of dlight rules (matmul, GEMV, reductions, then a fallback that binds the spatial loops to
blocks and threads). When a rule raises on a function (Mali, PP-OCRv6 rec: the matmul rule on a
conv2d+add+relu+pad, "There are some consumers of the cache-write stage that are not properly
inlined") the whole build fails. :func:`fail_safe_gpu_pipeline` is the same pipeline with each
ApplyDefaultSchedule step replaced by one where a rule that raises is skipped for that function:
the next rule is tried, down to dlight's plain thread-bound loop nest (``dlight.gpu.Fallback``),
which is always legal. Each such function is reported (:class:`ScheduleFallback`)."""

from __future__ import annotations

from dataclasses import dataclass

from sculpt.common import one_line


@dataclass
class ScheduleFallback:
    """A function on which a dlight rule raised: the rule, TVM's message, the rule that scheduled it."""

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
            passes = (relax.pipeline.library_dispatch_passes(target) + relax.pipeline.legalize_passes(target)
                      + relax.pipeline.dataflow_lower_passes(target) + relax.pipeline.finalize_passes(target))
            safe, shortened = [], False
            for p in passes:
                if hasattr(p, "rules") and not shortened:  # the functions are fused by now
                    safe += [_shorten_long_names(), relax.transform.NormalizeGlobalVar()]
                    shortened = True
                safe.append(_FailSafeSchedule(p.rules, fallbacks) if hasattr(p, "rules") else p)
            return tvm.transform.Sequential(safe)(mod)

    return _pipeline


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

            for rule in self.rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception as e:  # noqa: BLE001 (TVMError, ValueError, AssertionError, ...)
                    failure = failure or (type(rule).__name__, _last_line(e))
                    continue
                if space is not None:
                    if failure is not None:
                        self.fallbacks.append(ScheduleFallback(name, *failure, type(rule).__name__))
                    return first(space)
            if failure is None:
                return None
            # a rule raised and the others declined: the plain thread-bound loop nest
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
