"""Unit-by-unit verification of a QDQ build: each quantized unit checked on the same int8 inputs.

A QDQ model's end-to-end output is not a fair test of a compiled build. Each quantizer rounds
``x / scale`` to an integer; where ``x`` lands within float rounding of a rounding boundary (a .5
tie), two correct evaluations (TVM's and onnxruntime's, which sum float products in different
orders, or TVM's integer lowering, which sums exactly) round to neighbouring integers. Such a
one-step flip is then an input difference for every later unit, and flips propagate: on PP-OCRv4 det
a handful of flips in early layers move the output by 0.8 of its scale although every unit of the
build is right.

So the check is made per unit. A *unit* is the part of the graph between quantized tensors: from the
quantized tensors (QuantizeLinear outputs) and graph inputs it reads, through DequantizeLinear and
float ops, to the one quantized tensor it produces (a *tail* ends at a float graph output instead).
A verification build of the same model with the same options exposes every quantized tensor as an
extra output; onnxruntime (graph optimizations off: the graph as written) runs a *cut* model where
every quantized tensor is a graph input, fed with the build's own values. Every unit thus sees the
same int8 inputs on both sides, and:

- a unit's quantized output must equal onnxruntime's within one quantization step everywhere, and
  be one step off only where onnxruntime's own ``x / scale`` lies within ``TIE_TOLERANCE`` (0.01) of a
  step of a rounding tie ``k + 0.5``. Why: both sides compute the same real number up to float32
  rounding (relative 1e-7 per operation; TVM's float kernels reorder sums, its integer lowering sums
  exactly), so they can round to different integers only where that number lies within that rounding
  of a tie: one step, and there only (the flips measured on the zoo lie within 1.9e-4 step of a tie;
  the chance that an element lies within 0.01 of one is 2%). A wrong requantization scale or zero
  point moves elements far from ties (a shifted zero point: all of them), a wrong weight or layout
  moves many by many steps. (A quantizer whose scale is not a constant falls back to a count: one
  step off on at most max(2, 0.1%) of the elements.)
- a tail's float outputs must be within the verification's rtol/atol of onnxruntime's;
- the artifact's own outputs must equal the verification build's (the same compile, only the
  quantized tensors exposed), so what was checked is what ships.

The end-to-end error (artifact vs onnxruntime on the whole graph) is reported beside it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from sculpt.ir.model import Model
from sculpt.runtime import make_session, output_error
from sculpt.runtime.compare import ROUNDING_TIE_TOLERANCE, rounding_tie_distance

# an element may be one step from onnxruntime's where onnxruntime's x / scale lies this close to a
# rounding tie (k + 0.5), in steps (sculpt.runtime.compare)
TIE_TOLERANCE = ROUNDING_TIE_TOLERANCE
# where the tie distance cannot be computed (a quantizer whose scale is not a constant): a unit may
# differ by one step on this fraction of its elements, or on this many, whichever is more
FLIP_FRACTION = 1e-3
FLIP_ALLOWANCE = 2
UNIT_SUFFIX = "__unit"


@dataclass
class UnitResult:
    """One quantized unit: its output tensor, the op that computes it, and how far it is."""

    tensor: str
    op: str  # "Conv conv_12" (the op feeding the quantizer)
    elements: int
    off_by_one: int  # elements one step from onnxruntime's
    worst_steps: int  # largest |build - onnxruntime| in quantization steps
    allowed: int  # without tie distances: off_by_one may be at most this
    # of the elements off by one: the largest distance of onnxruntime's x / scale from a rounding tie
    # (k + 0.5), in steps, and how many are farther than TIE_TOLERANCE (nan, -1: scale not a constant)
    flip_tie_distance: float = 0.0
    flips_off_tie: int = 0

    @property
    def ok(self) -> bool:
        if self.worst_steps > 1:
            return False
        if self.flips_off_tie < 0:  # no tie distances: the count bound
            return self.off_by_one <= self.allowed
        return self.flips_off_tie == 0

    def why(self) -> str:
        if self.worst_steps > 1:
            return f"{self.worst_steps} steps off"
        if self.flips_off_tie < 0:
            return f"{self.off_by_one} of {self.elements} elements one step off (allowed {self.allowed})"
        return (f"{self.flips_off_tie} of {self.elements} elements one step off away from a rounding tie "
                f"(up to {self.flip_tie_distance:.2g} steps from it)")

    def as_dict(self) -> dict:
        return {"tensor": self.tensor, "op": self.op, "elements": self.elements, "off_by_one": self.off_by_one,
                "worst_steps": self.worst_steps, "flip_tie_distance": self.flip_tie_distance,
                "flips_off_tie": self.flips_off_tie, "ok": self.ok}


@dataclass
class UnitVerification:
    """The unit-by-unit check of a QDQ build (see the module docstring)."""

    units: list[UnitResult]
    tails: list  # OutputError of each float graph output, on the build's quantized inputs
    consistency: list  # OutputError of the artifact's outputs against the verification build's
    rtol: float
    atol: float
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    flip_fraction: float = FLIP_FRACTION
    flip_allowance: int = FLIP_ALLOWANCE

    @property
    def failing_units(self) -> list[UnitResult]:
        return [u for u in self.units if not u.ok]

    @property
    def tails_ok(self) -> bool:
        return all(o.shape_match and (o.max_rel <= self.rtol or o.max_abs <= self.atol) for o in self.tails)

    @property
    def consistent(self) -> bool:
        return all(o.shape_match and o.max_abs == 0 for o in self.consistency)

    @property
    def ok(self) -> bool:
        return bool(self.units) and not self.failing_units and self.tails_ok and self.consistent

    @property
    def off_by_one(self) -> int:
        return sum(u.off_by_one for u in self.units)

    @property
    def elements(self) -> int:
        return sum(u.elements for u in self.units)

    def bound(self) -> str:
        """The per-unit bound, in words."""
        return (f"each quantized unit within 1 step of onnxruntime, and one step off only where onnxruntime's "
                f"x / scale is within {TIE_TOLERANCE:g} step of a rounding tie")

    def summary(self) -> str:
        """One line: what was compared and the verdict."""
        near = max((u.flip_tie_distance for u in self.units if u.off_by_one and u.flips_off_tie == 0), default=0.0)
        units = (f"{len(self.units)} quantized units on the build's own int8 inputs: "
                 f"{sum(1 for u in self.units if u.off_by_one)} with one-step flips "
                 f"({self.off_by_one} of {self.elements} elements"
                 + (f", each within {near:.2g} step of a rounding tie" if self.off_by_one and not self.failing_units
                    else "") + f"), worst {max((u.worst_steps for u in self.units), default=0)} step(s)")
        tail = max((o.max_rel for o in self.tails), default=0.0)
        text = units + f"; float tails {tail:.3g} relative"
        if self.failing_units:
            bad = self.failing_units[0]
            text += (f"; FAILS at {bad.tensor} ({bad.op}): {bad.why()}"
                     + (f" and {len(self.failing_units) - 1} more unit(s)" if len(self.failing_units) > 1 else ""))
        elif not self.tails_ok:
            text += f" beyond rtol={self.rtol:g}"
        if not self.consistent:
            worst = max(self.consistency, key=lambda o: o.max_abs)
            text += (f"; the artifact's output '{worst.name}' differs from the verification build's by "
                     f"{worst.max_abs:.3g} (not the same build)")
        return text

    def as_dict(self) -> dict:
        return {"ok": self.ok, "units": len(self.units), "units_with_flips": sum(1 for u in self.units if u.off_by_one),
                "off_by_one_elements": self.off_by_one, "elements": self.elements,
                "worst_steps": max((u.worst_steps for u in self.units), default=0),
                "tie_tolerance": TIE_TOLERANCE,
                "largest_flip_tie_distance": max((u.flip_tie_distance for u in self.units if u.off_by_one),
                                                 default=0.0),
                "failing_units": [u.as_dict() for u in self.failing_units],
                "tails": [o.as_dict() for o in self.tails], "consistency": [o.as_dict() for o in self.consistency],
                "seconds": round(self.seconds, 2), "summary": self.summary()}


def allowed_flips(elements: int, flip_fraction: float = FLIP_FRACTION, flip_allowance: int = FLIP_ALLOWANCE) -> int:
    return max(flip_allowance, math.floor(flip_fraction * elements))


def quantized_tensors(model: Model | onnx.ModelProto) -> list[str]:
    """Outputs of the main graph's QuantizeLinear nodes whose input is computed (activations, not
    weights), in graph order."""
    proto = model.proto if isinstance(model, Model) else model
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.output[0] for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx") and n.input[0] not in constants]


def with_outputs(model: Model, names: list[str]) -> Model:
    """A copy of ``model`` with ``names`` appended to its graph outputs (typed by shape inference)."""
    work = model.clone()
    existing = {o.name for o in work.graph.output}
    typed = model.clone()
    try:
        typed.infer_shapes()
    except Exception:  # untyped outputs then: TVM's importer warns, and infers them itself
        pass
    infos = typed.value_infos()
    for name in names:
        if name in existing:
            continue
        vi = infos.get(name)
        work.graph.output.append(onnx.ValueInfoProto(name=name) if vi is None else _copy(vi))
        existing.add(name)
    return work


def _copy(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    return out


def cut_model(model: Model, build_values: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model where every quantized tensor in ``build_values`` is a graph input (its consumers read
    the value fed) and its QuantizeLinear writes ``<name>__unit`` instead, a graph output: one run gives
    every unit's output on the fed inputs. Returns (proto, {quantized tensor: unit output name})."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    unit_outputs = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in build_values:
            name = node.output[0]
            node.output[0] = name + UNIT_SUFFIX
            unit_outputs[name] = node.output[0]
    kept_outputs = [o for o in graph.output if o.name not in unit_outputs]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    for name, unit_name in unit_outputs.items():
        value = build_values[name]
        elem = helper.np_dtype_to_tensor_dtype(value.dtype)
        graph.input.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
        graph.output.append(helper.make_tensor_value_info(unit_name, elem, list(value.shape)))
    # stale shape annotations of the renamed tensors would only confuse onnxruntime
    keep = [vi for vi in graph.value_info if vi.name not in unit_outputs]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return proto, unit_outputs


def unit_ops(model: Model) -> dict[str, str]:
    """For each quantized tensor, the op feeding its quantizer ('Conv conv_12')."""
    producers = model.producers()
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            src = producers.get(node.input[0])
            out[node.output[0]] = f"{src.op_type} {src.name}".strip() if src is not None else "graph input"
    return out


def compare_units(model: Model, build_values: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray],
                  build_outputs: Mapping[str, np.ndarray], *, flip_fraction: float = FLIP_FRACTION,
                  flip_allowance: int = FLIP_ALLOWANCE, tie_tolerance: float = TIE_TOLERANCE
                  ) -> tuple[list[UnitResult], list]:
    """Every unit of ``model`` run by onnxruntime (the graph as written) on the build's quantized tensors
    ``build_values`` (and the float ``feeds``), compared with the build's: (unit results in graph order,
    OutputError of each float output against ``build_outputs``)."""
    proto, unit_outputs = cut_model(model, build_values)
    quantizers = {n.output[0]: n for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    unit_quantizer = {name: quantizers[unit] for name, unit in unit_outputs.items()}
    pre_rounding = sorted({q.input[0] for q in unit_quantizer.values()} - {i.name for i in proto.graph.input})
    session = make_session(proto, optimize=False, extra_outputs=pre_rounding)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    run_feeds = {k: np.asarray(v) for k, v in {**feeds, **build_values}.items() if k in wanted}
    values = dict(zip(names, session.run(names, run_feeds)))
    ops = unit_ops(model)
    units = []
    for name, unit_name in unit_outputs.items():
        got = np.asarray(build_values[name]).astype(np.int32)
        ref = np.asarray(values[unit_name]).astype(np.int32)
        steps = np.abs(got - ref) if got.shape == ref.shape else np.full(1, np.iinfo(np.int32).max)
        flips = steps == 1
        distances = _tie_distances(model, unit_quantizer[name], {**run_feeds, **values}, flips) \
            if flips.any() and got.shape == ref.shape else np.zeros(0)
        unknown = distances.size and np.isnan(distances).any()
        units.append(UnitResult(name, ops.get(name, "?"), int(ref.size), int(np.count_nonzero(flips)),
                                int(steps.max()) if steps.size else 0,
                                allowed_flips(int(ref.size), flip_fraction, flip_allowance),
                                float("nan") if unknown else float(distances.max(initial=0.0)),
                                -1 if unknown else int(np.count_nonzero(distances > tie_tolerance))))
    tails = [output_error(o.name, np.asarray(build_outputs[o.name]), np.asarray(values[o.name]))
             for o in model.graph.output if o.name in build_outputs and o.name in values]
    return units, tails


def _tie_distances(model: Model, quantizer, values: Mapping[str, np.ndarray], where: np.ndarray) -> np.ndarray:
    """The distances from a rounding tie (k + 0.5), in steps, of onnxruntime's x / scale at the elements
    ``where`` of a quantizer's output (nan: its input or scale unknown)."""
    x = values.get(quantizer.input[0])
    scale = model.get_constant(quantizer.input[1])
    if x is None or scale is None or np.shape(x) != where.shape:
        return np.full(1, np.nan)
    axis = next((a.i for a in quantizer.attribute if a.name == "axis"), 1)
    return rounding_tie_distance(x, scale, axis)[where]


def propagated_differences(model: Model, build_values: Mapping[str, np.ndarray],
                           feeds: Mapping[str, np.ndarray]) -> list[dict]:
    """Diagnosis, not a check: every quantized tensor of the build against onnxruntime's on the whole
    graph (flips propagate), in graph order: tensor, op, elements, differing elements, worst steps."""
    names = list(build_values)
    session = make_session(model, optimize=False, extra_outputs=names)
    values = dict(zip(names, session.run(names, dict(feeds))))
    ops = unit_ops(model)
    rows = []
    for name in names:
        steps = np.abs(np.asarray(build_values[name]).astype(np.int32) - values[name].astype(np.int32))
        rows.append({"tensor": name, "op": ops.get(name, "?"), "elements": int(steps.size),
                     "differ": int(np.count_nonzero(steps)), "worst_steps": int(steps.max()) if steps.size else 0})
    return rows


def manifest_compile_options(manifest: Mapping) -> dict:
    """compile_model's keyword arguments that rebuild the artifact of ``manifest`` (target aside)."""
    options = dict(manifest.get("options") or {})
    int8 = options.get("int8") or {}
    sparse = options.get("sparse") or {}
    out = {"canonicalize": "canonicalize" in (manifest.get("passes") or []),
           "int8": int8.get("mode", "off") if isinstance(int8, dict) else "off",
           "sparse": sparse.get("mode", "off") if isinstance(sparse, dict) else "off"}
    if options.get("kernels") in ("sculpt", "default"):
        out["build_options"] = {"kernels": options["kernels"]}
    if out["int8"] != "off":
        out["canonicalize"] = True  # compile_model leaves canonicalize out for a QDQ model itself
    return out


def verification_build(artifact, model: Model, tensors: list[str], feeds: Mapping[str, np.ndarray], *,
                       timeout: float | None = None, progress: Callable[[str], None] | None = None):
    """Compile ``model`` with ``tensors`` as extra outputs, with the options in ``artifact``'s manifest,
    for its target, export it to a temporary folder and run it in the deploy runner (under qemu for
    ARM) on ``feeds``. Returns {output name: value}."""
    from sculpt.backends.tvm.artifact import ArtifactError, compile_model, export_artifact
    from sculpt.backends.tvm.deploy import run_artifact

    if artifact.manifest.get("tuning"):
        raise ArtifactError(f"{artifact.library.name} is a tuned build: the unit-by-unit check rebuilds it and "
                            "cannot reproduce MetaSchedule's schedules")
    probe = with_outputs(model, tensors)
    shapes = {s.name: s.shape for s in artifact.inputs}
    if progress:
        progress(f"compiling a verification build of {artifact.library.name} with {len(tensors)} quantized "
                 "tensors as outputs")
    compiled = compile_model(probe, artifact.target, input_shapes=shapes, **manifest_compile_options(artifact.manifest))
    work = Path(tempfile.mkdtemp(prefix="sculpt-qdq-verify-"))
    try:
        probe_path = work / "probe.onnx"
        probe.save(probe_path)
        built = export_artifact(compiled, work / "probe.so", source_model=probe_path,
                                thread_policy=artifact.thread_policy)
        if progress:
            progress("running the verification build")
        return run_artifact(built, feeds, timeout=timeout).outputs
    finally:
        shutil.rmtree(work, ignore_errors=True)


def verify_units(artifact, model_path, feeds: Mapping[str, np.ndarray], artifact_outputs: Mapping[str, np.ndarray], *,
                 rtol: float = 1e-4, atol: float = 1e-6, timeout: float | None = None,
                 flip_fraction: float = FLIP_FRACTION, flip_allowance: int = FLIP_ALLOWANCE,
                 progress: Callable[[str], None] | None = None) -> UnitVerification:
    """The unit-by-unit check of a QDQ artifact (module docstring); ``artifact_outputs`` are the
    artifact's own outputs on ``feeds``."""
    start = time.perf_counter()
    model = Model.load(model_path).clone()
    model.fix_input_shapes({s.name: s.shape for s in artifact.inputs if s.name in model.input_names})
    tensors = quantized_tensors(model)
    outputs = verification_build(artifact, model, tensors, feeds, timeout=timeout, progress=progress)
    missing = [t for t in tensors if t not in outputs]
    notes = []
    if missing:  # a quantizer the build's passes removed (canonicalize folding a constant unit)
        notes.append(f"{len(missing)} quantized tensors are not in the verification build (folded away): "
                     + ", ".join(missing[:3]) + ("..." if len(missing) > 3 else ""))
    build_values = {t: outputs[t] for t in tensors if t in outputs}
    final = {o.name: outputs[o.name] for o in model.graph.output if o.name in outputs}
    if progress:
        progress(f"comparing {len(build_values)} quantized units with onnxruntime on the build's int8 inputs")
    units, tails = compare_units(model, build_values, feeds, final, flip_fraction=flip_fraction,
                                 flip_allowance=flip_allowance)
    consistency = [output_error(name, np.asarray(artifact_outputs[name]), np.asarray(value))
                   for name, value in final.items() if name in artifact_outputs]
    return UnitVerification(units, tails, consistency, rtol, atol, time.perf_counter() - start, notes,
                            flip_fraction, flip_allowance)
