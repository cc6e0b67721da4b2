"""Passes that need static shapes, run on a model whose inputs are dynamic, without freezing it.

Such a pass (channel-pruning, low-rank, ...: ``Pass.needs_static_shapes``) runs on a copy whose
dynamic inputs are fixed to the *working shapes* (``PassContext.working_shapes``: the calibration
samples' shapes, or ``--sample-shape``). Its result then declares the input dimensions the model
declared before (``Model.restore_declared_shapes``) and must still run at *probe shapes*, where each
dynamic dimension differs from its working value (``probe_shapes``; the input model runs there), with
the same output shapes as the pass's input (and, for an exact pass, the same values). A result that
does not, because the pass baked a working dimension into a constant, keeps the working shapes:
one :class:`FrozenShapesWarning` names the pass and the inputs it froze.

Only ``--input-shape`` (``Pipeline(input_shapes=...)``) freezes a model's dimensions on purpose.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from sculpt.common import one_line
from sculpt.errors import SculptWarning
from sculpt.ir.model import Model

if TYPE_CHECKING:
    from sculpt.passes.base import Pass, PassContext, PassResult

EXACT_PROBE_RTOL = 1e-4  # an exact pass's output at the probe shapes, relative to each output's scale


class FrozenShapesWarning(SculptWarning):
    """A pass's result did not run at other input shapes: it keeps the working shapes."""


def working_shapes_for(model: Model, *sources: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Concrete shapes of ``model``'s dynamic inputs, from the first source that names each one
    (``--sample-shape``, then a calibration sample's shapes, say); inputs none names are left out."""
    out: dict[str, list[int]] = {}
    for name in model.dynamic_inputs():
        for source in sources:
            if source and name in source:
                out[name] = [int(d) for d in source[name]]
                break
    return out


def _other_value(d: int) -> int:
    """A different size for a dynamic dimension that keeps its largest power-of-two factor (a width
    that must be a multiple of 32 stays one): 1 -> 2, 320 -> 384, 48 -> 64."""
    return d + (d & -d)


def probe_shapes(model: Model, working: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Shapes where every dynamic dimension the model really runs at differs from ``working``: all of
    them changed at once when the model runs so in onnxruntime, else each one alone that does (a
    dimension declared dynamic that the model cannot change keeps its working value). {} when none."""
    from sculpt.runtime import random_inputs, run

    dynamic = model.declared_shapes().dynamic_dims()
    candidates = [(name, i) for name, dims in dynamic.items() if name in working for i in dims]

    def runs(shapes) -> bool:
        try:
            run(model, random_inputs(model, seed=0, shapes=shapes))
            return True
        except Exception:  # noqa: BLE001 - onnxruntime raises many kinds; the model just does not run there
            return False

    def changed(dims) -> dict[str, list[int]]:
        shapes = {k: list(v) for k, v in working.items()}
        for name, i in dims:
            shapes[name][i] = _other_value(shapes[name][i])
        return shapes

    if not candidates:
        return {}
    if runs(changed(candidates)):
        return changed(candidates)
    ok = [c for c in candidates if runs(changed([c]))] if len(candidates) > 1 else []
    return changed(ok) if ok and (len(ok) == 1 or runs(changed(ok))) else {}


def _outputs_at(model: Model, feeds: dict) -> dict[str, np.ndarray]:
    from sculpt.runtime import run

    return run(model, feeds)


def _still_dynamic(before: Model, after: Model, probe: Mapping[str, Sequence[int]], exact: bool) -> str | None:
    """None when ``after`` runs at ``probe`` like ``before`` (same output shapes; same values for an
    exact pass), else why not."""
    from sculpt.runtime import random_inputs

    feeds = random_inputs(before, seed=1, shapes=probe)
    want = _outputs_at(before, feeds)
    try:
        got = _outputs_at(after, feeds)
    except Exception as e:  # noqa: BLE001 - whatever onnxruntime says is the reason
        return one_line(e)
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape:
            return f"output '{name}' has shape {None if g is None else list(g.shape)}, not {list(w.shape)}"
        if exact and w.size and np.issubdtype(w.dtype, np.floating):
            scale = float(np.max(np.abs(w))) or 1.0
            err = float(np.max(np.abs(g.astype(np.float64) - w))) / scale
            if not err <= EXACT_PROBE_RTOL:
                return f"output '{name}' differs by {err:.3g} (relative)"
    return None


def run_at_working_shapes(pass_: "Pass", model: Model, ctx: "PassContext") -> "PassResult":
    """``pass_`` on ``model`` (a private copy, edited) at ``ctx.working_shapes``; the result declares
    the model's dynamic dimensions again when it runs at the probe shapes (see the module)."""
    from sculpt.passes.base import PassResult

    declared = model.declared_shapes()
    before = model.clone()
    fixed = {name: list(ctx.working_shapes[name]) for name in model.dynamic_inputs() if name in ctx.working_shapes}
    model.fix_input_shapes(fixed)
    model.infer_shapes()
    inner = dataclasses.replace(ctx, input_shapes={**ctx.input_shapes, **fixed})
    result = pass_.run_checked(model, inner)
    if not result.modified:
        return PassResult(before, False, result.stats)
    if ctx.probe_shapes is None:
        ctx.probe_shapes = probe_shapes(before, ctx.working_shapes)
    dynamic = result.model.clone().restore_declared_shapes(declared).infer_shapes()
    reason = "it does not declare them again" if dynamic.dynamic_inputs().keys() != before.dynamic_inputs().keys() \
        else (_still_dynamic(before, dynamic, ctx.probe_shapes, pass_.exact) if ctx.probe_shapes else None)
    if reason is None:
        return PassResult(dynamic, True, result.stats)
    shown = ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in fixed.items())
    probe = ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in (ctx.probe_shapes or {}).items())
    warnings.warn(FrozenShapesWarning(
        f"pass '{pass_.name}': its result does not run at other input shapes ({probe}: {reason}); it keeps the "
        f"working shapes {shown}"), stacklevel=3)
    return result
