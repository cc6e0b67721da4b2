"""Pipeline: passes run in order, with instruments (timing, IR dumps, verify-each, statistics).

A pipeline can be written as YAML or JSON::

    input_shapes: {x: [1, 3, 224, 224]}
    calibration: {source: images/, count: 64}
    verify_each: true
    passes:
      - canonicalize
      - constant-folding: {max_tensor_mb: 64}
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from sculpt.errors import OptionError, PipelineError, SculptError, ShapeError, VerificationError
from sculpt.ir.calibration import CalibrationSplit
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, create_pass, parse_pass_spec
from sculpt.passes.working_shapes import working_shapes_for

EXACT_RTOL = 1e-5  # exact passes: max |a-b| / max |b| per output
EXACT_ATOL = 1e-6
# a lossy pass (or a pipeline) that moves an output by more than this, relative to the output's scale
# (max |a-b| / max |b| on the held-out samples), gets a warning; ``max_error`` turns it into a failure
DEFAULT_WARN_ERROR = 0.1
RANDOM_SAMPLES = 2  # random inputs an error is measured on when there is no calibration data


class ErrorBudgetExceeded(PipelineError):
    """A lossy pass, or the whole pipeline, moved the outputs beyond the error budget (``max_error``)."""


@dataclass
class PassRecord:
    """What happened in one pass of a pipeline."""

    index: int
    name: str
    exact: bool
    modified: bool
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    cost_before: dict[str, int] | None = None
    cost_after: dict[str, int] | None = None
    error: dict[str, Any] | None = None  # measured output error vs the pass's input (see ``error["on"]``)
    dump: str | None = None
    warning: str | None = None  # the error is above the warning threshold

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class PipelineResult:
    model: Model
    records: list[PassRecord]
    split: CalibrationSplit | None = None  # the fitting and held-out samples the passes were given

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    @property
    def warnings(self) -> list[str]:
        return [r.warning for r in self.records if r.warning]


class ErrorSamples:
    """The inputs every error is measured on: the held-out calibration samples (no pass saw them), or
    random inputs when there is no calibration data; with a single calibration sample (nothing can be
    held out) the sample the passes fitted to, and the words say so."""

    def __init__(self, split: CalibrationSplit | None, seed: int = 0, count: int = RANDOM_SAMPLES,
                 shapes: Mapping[str, Sequence[int]] | None = None):
        self.split = split
        self.seed = seed
        self.count = count
        self.shapes = dict(shapes or {})  # random inputs: the shapes of dynamic inputs
        self._samples: list[dict] | None = None

    @property
    def kind(self) -> str:
        if self.split is None:
            return "random"
        return "held-out" if self.split.held_out is not None else "fitted"

    def samples(self, model: Model, *, none_if_dynamic: bool = False) -> list[dict]:
        """The samples; random inputs for a model with a dynamic (or too large) input raise ShapeError,
        or give [] with ``none_if_dynamic``."""
        if self._samples is None:
            if self.split is None:
                from sculpt.runtime import random_inputs

                try:
                    self._samples = [random_inputs(model, seed=self.seed + k, shapes=self.shapes)
                                     for k in range(self.count)]
                except ShapeError:
                    if none_if_dynamic:
                        return []
                    raise
            else:
                self._samples = list(self.split.held_out if self.split.held_out is not None else self.split.fitting)
        return self._samples

    def describe(self, count: int | None = None) -> str:
        """'8 held-out samples' and the like, for a measurement on ``count`` of them."""
        if self.split is None:
            return f"{count if count is not None else self.count} random input(s)"
        if self.split.held_out is None:
            return self.split.describe()
        n = self.split.held_out.count if count is None else count
        return f"{n} held-out sample(s)"


def _shapes_entry(spec: Mapping[str, Any], key: str, source: str) -> dict:
    """A pipeline file's ``input_shapes`` or ``sample_shapes``: input names to lists of positive integers."""
    shapes = spec.get(key) or {}
    if not isinstance(shapes, Mapping):
        raise OptionError(f"{source}: '{key}' must map input names to lists of positive integers")
    for name, dims in shapes.items():
        if not isinstance(dims, list) or not dims or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise OptionError(f"{source}: {key} of '{name}' must be a list of positive integers, got {dims!r}")
    return dict(shapes)


def check_error(what: str, error: float, where: str, *, warn_error: float | None, max_error: float | None,
                passes_run: Sequence[str] = ()) -> str | None:
    """The warning for an output error above the threshold (``max_error`` if given, else ``warn_error``),
    None below it; above ``max_error`` an ErrorBudgetExceeded instead."""
    limit = max_error if max_error is not None else warn_error
    if limit is None or not error > limit:
        return None
    text = f"{what} moves the outputs by {error:.3g} (max |a-b| / max |b|) on {where}"
    if max_error is not None:
        raise ErrorBudgetExceeded(f"{text}, above the error budget {max_error:g} (--max-error)", list(passes_run))
    return f"{text}, above {limit:g}"


class Instrument:
    """Hooks around each pass. ``after_pass`` receives the model before the pass (a copy the pass did
    not touch) and the PassResult."""

    def before_pipeline(self, pipeline: "Pipeline", model: Model) -> None: ...

    def before_pass(self, index: int, pass_: Pass, model: Model, record: PassRecord) -> None: ...

    def after_pass(self, index: int, pass_: Pass, before: Model, result: PassResult, record: PassRecord) -> None: ...

    def after_pipeline(self, result: PipelineResult) -> None: ...


class StatisticsInstrument(Instrument):
    """Params, MACs and bytes before and after each pass (needs shapes: uses the pipeline's)."""

    def __init__(self, input_shapes: Mapping[str, Sequence[int]] | None = None):
        self.input_shapes = dict(input_shapes or {})
        self._last_cost: dict[str, int] | None = None

    def _cost(self, model: Model) -> dict[str, int]:
        rep = cost_of(model, self.input_shapes or None)
        return {"params": rep.params, "macs": rep.macs, "weight_bytes": rep.weight_bytes,
                "model_bytes": rep.model_bytes, "nodes": len(model.graph.node)}

    def before_pass(self, index, pass_, model, record):
        record.cost_before = dict(self._last_cost) if self._last_cost else self._cost(model)

    def after_pass(self, index, pass_, before, result, record):
        record.cost_after = self._cost(result.model) if result.modified else dict(record.cost_before)
        self._last_cost = record.cost_after


class DumpInstrument(Instrument):
    """Write the IR after each pass as ``NNN_<pass>.onnx`` in a folder."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def before_pipeline(self, pipeline, model):
        self.directory.mkdir(parents=True, exist_ok=True)

    def after_pass(self, index, pass_, before, result, record):
        path = self.directory / f"{index:03d}_{pass_.name}.onnx"
        result.model.save(path)
        record.dump = str(path)


class VerifyInstrument(Instrument):
    """Run the model before and after each exact pass through onnxruntime on the same inputs (``samples``,
    else ``count`` random inputs): it must stay within ``rtol`` (relative to each output's scale) or
    fail. Lossy passes are measured by :class:`LossyErrorInstrument`, unless ``lossy`` is set."""

    def __init__(self, samples: list[dict] | None = None, *, rtol: float = EXACT_RTOL, atol: float = EXACT_ATOL,
                 count: int = 2, seed: int = 0, lossy: bool = False, on: str | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None):
        self.samples = samples
        self.shapes = dict(shapes or {})  # random inputs: the shapes of dynamic inputs
        self.rtol, self.atol, self.count, self.seed = rtol, atol, count, seed
        self.lossy = lossy
        self.on = on

    def after_pass(self, index, pass_, before, result, record):
        from sculpt.runtime import compare_models

        if not pass_.exact and not self.lossy:
            return
        if not result.modified:
            record.error = {"max_abs": 0.0, "max_rel": 0.0, "samples": 0}
            return
        samples = self.samples
        if samples is None:
            from sculpt.runtime import random_inputs

            samples = [random_inputs(before, seed=self.seed + k, shapes=self.shapes) for k in range(self.count)]
            self.samples = samples
        cmp = compare_models(before, result.model, samples)
        record.error = cmp.as_dict()
        if self.on:
            record.error["on"] = self.on
        if pass_.exact and not cmp.within(self.rtol, self.atol):
            worst = max(cmp.outputs, key=lambda o: o.max_rel)
            raise VerificationError(
                f"exact pass '{pass_.name}' changed output '{worst.name}': max abs error {worst.max_abs:.3g}, "
                f"relative {worst.max_rel:.3g} > {self.rtol:g}")


class LossyErrorInstrument(Instrument):
    """The output error of every lossy pass that changed the model, against the pass's input, on the
    held-out samples (:class:`ErrorSamples`). Recorded as ``record.error`` (``on``: held-out, random
    or fitted); non-finite outputs where the input's are finite fail the pass; an error above the
    threshold sets ``record.warning``, or fails with ErrorBudgetExceeded when ``max_error`` is set."""

    def __init__(self, samples: ErrorSamples, *, warn_error: float | None = DEFAULT_WARN_ERROR,
                 max_error: float | None = None):
        self.error_samples = samples
        self.warn_error = warn_error
        self.max_error = max_error
        self.passes_run: list[str] = []

    def after_pass(self, index, pass_, before, result, record):
        from sculpt.runtime import compare_models

        if pass_.exact or not result.modified:
            if not pass_.exact:  # nothing changed: nothing to measure
                record.error = {"max_abs": 0.0, "max_rel": 0.0, "samples": 0, "on": self.error_samples.kind}
            self.passes_run.append(pass_.name)
            return
        samples = self.error_samples.samples(before, none_if_dynamic=True)
        if not samples:  # dynamic inputs without calibration data: the error cannot be measured
            self.passes_run.append(pass_.name)
            return
        cmp = compare_models(before, result.model, samples)
        where = self.error_samples.describe(cmp.samples)
        record.error = dict(cmp.as_dict(), on=self.error_samples.kind)
        if cmp.nonfinite_outputs:
            raise SculptError(f"pass '{pass_.name}' makes output '{cmp.nonfinite_outputs[0]}' NaN or Inf on "
                              f"{where} (the input model's values are finite there); nothing is kept")
        record.warning = check_error(f"pass {index} '{pass_.name}'", cmp.max_rel, where, warn_error=self.warn_error,
                                     max_error=self.max_error, passes_run=self.passes_run)
        self.passes_run.append(pass_.name)


def nonfinite_weights(model: Model) -> list[str]:
    """Names of the float initializers and Constant tensors holding NaN or Inf."""
    bad = []
    for t in model.graph.initializer:
        if _nonfinite_tensor(t):
            bad.append(t.name)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and _nonfinite_tensor(a.t):
                    bad.append(node.output[0])
    return bad


def _nonfinite_tensor(t: onnx.TensorProto) -> bool:
    if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                           onnx.TensorProto.BFLOAT16):
        return False
    if t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data:
        return False  # not loaded: nothing to check
    value = onnx.numpy_helper.to_array(t)
    return not bool(np.isfinite(value.astype(np.float32, copy=False)).all())


class FiniteWeightsInstrument(Instrument):
    """A pass that puts NaN or Inf into a weight fails, naming the tensor. Checked only when the input
    model's weights are all finite (a model may carry an Inf on purpose, a mask say)."""

    def __init__(self):
        self.active = True

    def before_pipeline(self, pipeline, model):
        self.active = not nonfinite_weights(model)

    def after_pass(self, index, pass_, before, result, record):
        if not self.active or not result.modified:
            return
        bad = nonfinite_weights(result.model)
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise SculptError(f"pass '{pass_.name}' put NaN or Inf into weight '{bad[0]}'{more}; nothing is kept")


class TimingInstrument(Instrument):
    """Records wall time per pass (always on; kept as an instrument for custom reporting)."""


def read_pipeline_file(path: str | os.PathLike) -> Any:
    """The data of a YAML or JSON pipeline file (JSON when the name ends in .json), or an OptionError
    naming the file. YAML anchors and aliases are refused before anything is built (a few hundred bytes
    of nested aliases expand to gigabytes), and so is a key given twice in one mapping (YAML and JSON
    would otherwise keep the last one silently)."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"{path}: no such pipeline file")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        return _load_yaml(text, path)
    except OptionError:
        raise
    except Exception as e:  # yaml.YAMLError, ValueError (JSON, bad UTF-8), RecursionError (absurd nesting)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OptionError(f"{path}: cannot parse the pipeline ({first})") from None


def _unique_keys(pairs, path: Path) -> dict:
    """A JSON object as a dict, refusing a key given twice."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise OptionError(f"{path}: key '{key}' is given twice in the same object")
        out[key] = value
    return out


def _load_yaml(text: str, path: Path) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise OptionError(f"{path}: line {event.start_mark.line + 1}: YAML anchors and aliases "
                                  "('&name', '*name') are not allowed in a pipeline file")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
                seen = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        again = key in seen
                    except TypeError:  # an unhashable key: the base class says so
                        continue
                    if again:
                        raise OptionError(f"{path}: line {key_node.start_mark.line + 1}: key '{key}' is given "
                                          "twice in the same mapping")
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)


def _relative_to(cal: Any, folder: Path) -> Any:
    """A relative calibration source in a pipeline file names a path beside that file."""
    def resolve(src: str) -> str:
        if src == "random" or src.startswith("random:") or os.path.isabs(src):
            return src
        candidate = folder / src
        return str(candidate) if candidate.exists() or not Path(src).exists() else src

    if isinstance(cal, str):
        return resolve(cal)
    if isinstance(cal, Mapping) and isinstance(cal.get("source"), str):
        return {**cal, "source": resolve(cal["source"])}
    return cal


class Pipeline:
    """Passes in order. ``run`` returns the final model and one PassRecord per pass; a failure is
    raised as PipelineError naming the passes that had already run."""

    def __init__(self, passes: Sequence[Pass], *, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 calibration: Any = None, verify_each: bool = False, dump_dir: str | None = None,
                 statistics: bool = True, instruments: Sequence[Instrument] = (), seed: int = 0,
                 held_out: int | None = None, max_error: float | None = None,
                 warn_error: float | None = DEFAULT_WARN_ERROR,
                 sample_shapes: Mapping[str, Sequence[int]] | None = None):
        self.passes = list(passes)
        # input_shapes fix the model's inputs (the output model keeps them); sample_shapes are only where the
        # passes that need static shapes work and random samples are drawn (the output keeps dynamic dims)
        self.input_shapes = {k: [int(d) for d in v] for k, v in (input_shapes or {}).items()}
        self.sample_shapes = {k: [int(d) for d in v] for k, v in (sample_shapes or {}).items()}
        self.calibration = calibration  # split by ``calibration_split``: passes see only the fitting part
        self.verify_each = verify_each
        self.dump_dir = dump_dir
        self.statistics = statistics
        self.extra_instruments = list(instruments)
        self.seed = seed
        self.held_out = held_out  # samples held out of the calibration data (None: a quarter)
        self.max_error = max_error  # a lossy pass or the pipeline above this fails (ErrorBudgetExceeded)
        self.warn_error = warn_error
        self._split: tuple[Any, int | None, CalibrationSplit] | None = None

    def calibration_split(self) -> CalibrationSplit | None:
        """The calibration data split into the samples passes fit to and the held-out ones every error
        is measured on (``CalibrationSet.split``); None without calibration data."""
        if self.calibration is None:
            return None
        if self._split is None or self._split[0] is not self.calibration or self._split[1] != self.held_out:
            self._split = (self.calibration, self.held_out, self.calibration.split(self.held_out))
        return self._split[2]

    def error_samples(self) -> ErrorSamples:
        """Where errors are measured: the held-out samples, else random inputs (at the sample shapes)."""
        return ErrorSamples(self.calibration_split(), self.seed, shapes=self.sample_shapes)

    def working_shapes(self, model: Model) -> dict[str, list[int]]:
        """The shapes of ``model``'s dynamic inputs at which the passes that need static shapes run:
        ``sample_shapes``, else the first calibration sample's (``sculpt.passes.working_shapes``)."""
        sample: dict = {}
        if self.calibration is not None and model.dynamic_inputs():
            first = next(iter(self.calibration), None)
            sample = {k: list(np.shape(v)) for k, v in (first or {}).items()}
        return working_shapes_for(model, self.sample_shapes, sample)

    @classmethod
    def from_specs(cls, specs: Sequence[str], **kwargs) -> "Pipeline":
        """From CLI specs ``NAME[:KEY=VALUE,...]``."""
        passes = [create_pass(*parse_pass_spec(s)) for s in specs]
        return cls(passes, **kwargs)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], *, source: str = "pipeline", **overrides) -> "Pipeline":
        if not isinstance(spec, Mapping):
            raise OptionError(f"{source}: a pipeline is a mapping with a 'passes' list")
        known = {"passes", "input_shapes", "sample_shapes", "calibration", "verify_each", "seed", "held_out",
                 "max_error"}
        unknown = set(spec) - known
        if unknown:
            raise OptionError(f"{source}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(known))})")
        items = spec.get("passes")
        if not isinstance(items, list) or not items:
            raise OptionError(f"{source}: 'passes' must be a non-empty list")
        passes = []
        for item in items:
            if isinstance(item, str):
                passes.append(create_pass(*parse_pass_spec(item)))
            elif isinstance(item, Mapping) and len(item) == 1:
                (name, opts), = item.items()
                if opts is not None and not isinstance(opts, Mapping):
                    raise OptionError(f"{source}: options of pass '{name}' must be a mapping")
                passes.append(create_pass(str(name), opts or {}))
            else:
                raise OptionError(f"{source}: each pass is a name or a one-key mapping {{name: {{options}}}}, "
                                  f"got {item!r}")
        shapes, sample_shapes = (_shapes_entry(spec, key, source) for key in ("input_shapes", "sample_shapes"))
        verify = spec.get("verify_each", False)
        if not isinstance(verify, bool):
            raise OptionError(f"{source}: 'verify_each' must be true or false, got {verify!r}")
        seed = spec.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise OptionError(f"{source}: 'seed' must be an integer, got {seed!r}")
        kwargs = {"input_shapes": shapes, "sample_shapes": sample_shapes, "verify_each": verify, "seed": seed}
        held_out = spec.get("held_out")
        if held_out is not None:
            if not isinstance(held_out, int) or isinstance(held_out, bool) or held_out < 1:
                raise OptionError(f"{source}: 'held_out' must be a positive integer (samples), got {held_out!r}")
            kwargs["held_out"] = held_out
        max_error = spec.get("max_error")
        if max_error is not None:
            if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not np.isfinite(max_error) \
                    or max_error < 0:
                raise OptionError(f"{source}: 'max_error' must be a finite number ≥ 0, got {max_error!r}")
            kwargs["max_error"] = float(max_error)
        kwargs.update(overrides)
        pipe = cls(passes, **kwargs)
        pipe.calibration_spec = spec.get("calibration")
        return pipe

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "Pipeline":
        path = Path(path)
        spec = read_pipeline_file(path)
        pipe = cls.from_dict(spec, source=str(path), **overrides)
        pipe.calibration_spec = _relative_to(pipe.calibration_spec, path.parent)
        return pipe

    calibration_spec: Any = None

    def instruments(self, working_shapes: Mapping[str, Sequence[int]] | None = None) -> list[Instrument]:
        inst: list[Instrument] = [FiniteWeightsInstrument()]
        if self.statistics:
            inst.append(StatisticsInstrument({**self.input_shapes, **dict(working_shapes or {})}))
        errors = self.error_samples()
        if self.verify_each:
            samples = None
            split = self.calibration_split()
            if split is not None:
                source = split.held_out if split.held_out is not None else split.fitting
                samples = [s for _, s in zip(range(2), source)]
            inst.append(VerifyInstrument(samples, seed=self.seed, on=errors.kind, shapes=self.sample_shapes))
        inst.append(LossyErrorInstrument(errors, warn_error=self.warn_error, max_error=self.max_error))
        if self.dump_dir:
            inst.append(DumpInstrument(self.dump_dir))
        return inst + self.extra_instruments

    def run(self, model: Model) -> PipelineResult:
        model = Model.load(model) if not isinstance(model, Model) else model.clone()
        if self.input_shapes:
            model.fix_input_shapes(self.input_shapes)
            model.infer_shapes()
        split = self.calibration_split()
        working = self.working_shapes(model)
        ctx = PassContext(calibration=split.fitting if split is not None else None, input_shapes=self.input_shapes,
                          seed=self.seed, held_out=split.held_out if split is not None else None,
                          teacher=model,  # the model before the first pass (passes edit copies: it stays as it is)
                          working_shapes=working)
        instruments = self.instruments(working)
        for inst in instruments:
            inst.before_pipeline(self, model)
        records: list[PassRecord] = []
        done: list[str] = []
        for index, pass_ in enumerate(self.passes, start=1):
            record = PassRecord(index, pass_.name, pass_.exact, False, 0.0)
            try:
                for inst in instruments:
                    inst.before_pass(index, pass_, model, record)
                start = time.perf_counter()
                result = pass_(model, ctx)  # works on a copy: `model` is still the pass's input
                record.seconds = time.perf_counter() - start
                record.modified = result.modified
                record.stats = result.stats
                for inst in instruments:
                    inst.after_pass(index, pass_, model, result, record)
            except ErrorBudgetExceeded:
                raise
            except SculptError as e:
                raise PipelineError(f"pass {index} '{pass_.name}' failed: {e}", done, e) from e
            records.append(record)
            done.append(pass_.name)
            model = result.model
        final = PipelineResult(model, records, split)
        for inst in instruments:
            inst.after_pipeline(final)
        return final
