"""Import a sculpt model into TVM Relax, build it for a target, run it in the Relax VM."""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from sculpt.errors import SculptError, SculptWarning, ShapeError
from sculpt.common import one_line
from sculpt.ir.model import Model


class TVMImportError(SculptError):
    """TVM's Relax ONNX importer or build rejected the model."""


def import_to_relax(model: Model, input_shapes: Mapping[str, Sequence[int | str]] | None = None, *,
                    canonicalized: bool = False, symbolic: bool = False, recurrent: str | None = None):
    """Relax IRModule of the model, with static input shapes and weights bound as constants.

    ``symbolic``: named dynamic dimensions stay symbolic in Relax (``input_shapes`` may name them:
    ``{"x": ["N", 3, 48, "W"]}``); an unnamed one is a ShapeError naming it. Run ``canonicalize``
    first (and say so with ``canonicalized``: an import error then does not suggest it): the importer
    rejects shape computations it cannot resolve. LSTM, GRU and RNN nodes, which TVM's importer lacks,
    are unrolled over their static sequence length first, or (LSTM, ``recurrent="loop"``) become a TIR
    loop over time (:mod:`sculpt.backends.tvm.recurrent_import`; ``recurrent``: its RECURRENT_MODES)."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from sculpt.backends.tvm.recurrent_import import has_recurrent_nodes, lower_recurrent
    from sculpt.backends.tvm.recurrent_loop import loop_converters

    work = model.clone()
    if input_shapes:
        work.fix_input_shapes(input_shapes)
    if symbolic:
        work.require_named_dims("a symbolic TVM import")
    else:
        work.require_static_inputs("the TVM import")
    if has_recurrent_nodes(work):
        work.infer_shapes()
        lower_recurrent(work, recurrent)
    # the importer reads symbolic dimensions from the model; shape_dict carries the static inputs only
    shapes = {k: [int(d) for d in v] for k, v in work.input_shapes().items()
              if all(isinstance(d, int) for d in v)}
    try:
        with loop_converters():
            return from_onnx(work.proto, shape_dict=shapes, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as e:  # no converter: canonicalize would not help
        raise TVMImportError(f"TVM Relax import failed: {one_line(e)}") from None
    except Exception as e:
        hint = "" if canonicalized else " (did you run 'canonicalize'?)"
        raise TVMImportError(f"TVM Relax import failed: {one_line(e)}{hint}") from None


KERNEL_CHOICES = ("sculpt", "default")


def build(mod, target: str | dict = "llvm", *, kernels: str = "sculpt", decisions: list | None = None):
    """Compile a Relax module to a VM executable for ``target`` (a kind name or a TVM target dict).

    ``kernels="sculpt"`` (CPU targets) schedules every operator with sculpt's kernel library
    (sculpt.backends.tvm.kernels: register-tiled conv2d/depthwise/matmul/pooling, parallel and
    vectorized elementwise ops); a host target without ``mcpu``/``mattr`` is compiled for the host
    CPU. ``kernels="default"`` is TVM's own pipeline (naive loops on CPU). Non-CPU targets (OpenCL)
    always use TVM's pipeline. ``decisions`` (a list) receives the sculpt kernels' KernelDecisions."""
    import tvm

    if kernels not in KERNEL_CHOICES:
        raise SculptError(f"unknown kernels '{kernels}' (choose from {', '.join(KERNEL_CHOICES)})")
    target_dict = {"kind": target} if isinstance(target, str) else target
    try:
        tgt = tvm.target.Target(target_dict)
    except Exception as e:
        raise TVMImportError(f"bad TVM target {target}: {one_line(e)}") from None
    names = symbolic_input_dims(mod)
    if kernels == "sculpt" and tgt.kind.name == "llvm" and names:
        warnings.warn(SymbolicShapesWarning(
            f"sculpt's CPU kernels need static shapes; {', '.join(names)} symbolic: built with TVM's own "
            "loops instead (slower; fix the shapes for sculpt's kernels)"), stacklevel=2)
        kernels = "default"
    try:
        if kernels == "sculpt" and tgt.kind.name == "llvm":
            from sculpt.backends.tvm.kernels import compile_with_kernels, host_target

            return compile_with_kernels(mod, tvm.target.Target(host_target(target_dict)), decisions=decisions)
        if "gpu" in tgt.keys:
            return build_gpu(mod, tgt)
        return tvm.compile(mod, target=tgt)
    except TVMImportError:
        raise
    except Exception as e:
        raise TVMImportError(f"TVM build for {target} failed: {one_line(e)}") from None


class SymbolicShapesWarning(SculptWarning):
    """A module with symbolic input dimensions was built with TVM's own CPU loops, not sculpt's kernels."""


def symbolic_input_dims(mod) -> list[str]:
    """The names of the symbolic dimensions of ``main``'s parameters, in order of appearance."""
    from tvm import relax, tirx

    names: list[str] = []
    for param in mod["main"].params:
        ty = param.ty
        if isinstance(ty, relax.TensorType) and getattr(ty, "shape", None) is not None:
            for d in getattr(ty.shape, "values", None) or []:
                if not isinstance(d, tirx.IntImm) and str(d) not in names:
                    names.append(str(d))
    return names


class GPUScheduleFallbackWarning(SculptWarning):
    """A GPU schedule rule of TVM failed on some functions; later rules (down to a plain thread-bound
    loop nest) scheduled them."""


def build_gpu(mod, target):
    """TVM's GPU pipeline, where a schedule rule that fails on a function passes it on to the next rule
    (down to dlight's plain thread-bound loop nest) instead of failing the build
    (sculpt.backends.tvm.gpu_schedule); one warning names those functions."""
    import tvm

    from sculpt.backends.tvm.gpu_schedule import fail_safe_gpu_pipeline

    fallbacks: list = []
    executable = tvm.compile(mod, target=target, relax_pipeline=fail_safe_gpu_pipeline(target, fallbacks))
    if fallbacks:
        device = target.attrs.get("device", target.kind.name)
        warnings.warn(GPUScheduleFallbackWarning(
            f"{device}: a GPU schedule rule of TVM failed on {len(fallbacks)} function(s), scheduled by the "
            f"next rule that applies instead: " + "; ".join(f.describe() for f in fallbacks)), stacklevel=3)
    return executable


def run_relax(executable, feeds: Mapping[str, np.ndarray], input_order: Sequence[str]) -> list[np.ndarray]:
    """Run a host-built executable in the Relax VM; returns the outputs as numpy arrays."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    args = []
    for name in input_order:
        if name not in feeds:
            raise ShapeError(f"no value for input '{name}'")
        args.append(tvm.runtime.tensor(np.ascontiguousarray(feeds[name]), dev))
    out = vm["main"](*args)
    return _flatten(out)


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out = []
    for v in value:
        out.extend(_flatten(v))
    return out
