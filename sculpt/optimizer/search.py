"""The strategy of `optimize`: the fastest model within an accuracy budget, latency measured on the runtime.

1. *Sensitivity.* Every knob of the search space (space.py) is tried alone at each of its levels, mildest
   first: the metric's drop against the input model and the latency saved, both measured. A level whose
   drop is already over the budget ends that knob (harsher levels only lose more).
2. *Allocation.* A greedy multiple-choice knapsack in the spirit of NetAdapt and AMC: starting from the
   input model, take the step (a knob to one of its harsher levels) with the most latency saved per unit
   of drop added, as long as the sum of the chosen steps' drops stays within the budget. Steps that save
   less than the measurement's noise floor are never taken. The steps' order is kept.
3. *Validation and back-off.* Drops do not add up exactly, so the combined model is built and measured.
   Over the budget: the longest prefix of the steps that holds is found by bisection (the first steps
   are the most efficient). Well within it: the allocation is repeated with a larger share of the budget
   while that keeps holding, so the budget is used rather than guessed.
4. *Refinement.* Summed drops misjudge how knobs interact (on PP-OCR cls, steps whose drops summed to
   one point lost 7.5 together), so the budget's remaining time is spent NetAdapt-style on measured
   combinations: from the fastest candidate within the budget, each step not yet in it (most time saved
   per drop first, alone within what is left of the budget) is added and measured; it stays when the
   combination holds the budget and saves at least the noise floor.
5. *Confirmation* (proxy metric): the search picks among many candidates on the same held-out samples,
   which flatters the pick, so a third of them is never scored by it; the fastest candidate within the
   budget must hold there too, else the next fastest is tried.
6. *Never slower.* The result is the fastest measured candidate within the budget; unless it is at least
   ``MIN_SPEEDUP`` faster than the input model on the runtime, the input model itself is returned and
   the result says nothing helped.

Every evaluation is cached on disk (``Cache``), keyed by the input model, the metric, the runtime and
the plan, so an interrupted search continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sculpt.common import atomic_write_bytes, one_line
from sculpt.errors import SculptError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.optimizer.latency import LatencyMeter
from sculpt.optimizer.metric import Metric
from sculpt.optimizer.space import Knob, SearchSpace, plan_key, plan_pipeline
from sculpt.passes import Pipeline

# a candidate must be this much faster than the input model (median ratio of interleaved rounds) to be
# returned instead of it: the shared host's run-to-run noise is a few percent
MIN_SPEEDUP = 0.03
# a sensitivity step saving less than this fraction of the input model's time is noise, never chosen
NOISE_FLOOR = 0.01
# the allocation's share of the budget is raised by this factor while the combined model holds
SCALE_UP = 1.6
MAX_SCALE_UPS = 2
# with a proxy metric, a third of the held-out samples (at least CONFIRM_MIN_SAMPLES held out) is kept
# from the search and confirms its result; at most MAX_CONFIRMATIONS candidates are tried there
CONFIRM_MIN_SAMPLES = 8
MAX_CONFIRMATIONS = 6
# the share of --budget-minutes the sensitivity pass may use; allocation and validation have the rest
SENSITIVITY_SHARE = 0.7


def evaluate_saved(metric: Metric, model: Model) -> float:
    """``metric`` of ``model``, saved to a temporary file first: a user metric reads the model from disk."""
    with tempfile.TemporaryDirectory(prefix="sculpt-optimize-") as tmp:
        path = Path(tmp) / "model.onnx"
        model.save(path)
        return metric.evaluate(model, path)


@dataclass
class Candidate:
    """One evaluated model: a plan of knob levels and what it measured."""

    plan: dict
    stage: str  # input | canonicalized | sensitivity | combination | back-off | refinement
    metric: float | None = None
    drop: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    macs: int | None = None
    params: int | None = None
    bytes: int | None = None
    seconds: float = 0.0
    failed: str | None = None  # why a pass refused the plan
    cached: bool = False
    confirm_drop: float | None = None  # the drop on the confirmation samples the search never scored

    @property
    def key(self) -> str:
        return plan_key(self.plan)

    def within(self, max_drop: float) -> bool:
        return self.failed is None and self.drop is not None and self.drop <= max_drop

    def as_dict(self) -> dict:
        return {"plan": dict(self.plan), "stage": self.stage, "metric": self.metric, "drop": self.drop,
                "latency_ms": self.latency_ms, "latency_ratio": self.latency_ratio, "macs": self.macs,
                "params": self.params, "bytes": self.bytes, "seconds": round(self.seconds, 2),
                "failed": self.failed, "cached": self.cached, "confirm_drop": self.confirm_drop}


@dataclass
class Decision:
    """One line of the search's reasoning, for the report."""

    what: str
    why: str

    def as_dict(self) -> dict:
        return {"what": self.what, "why": self.why}


@dataclass
class SearchResult:
    model: Model  # the chosen model (the input model itself when nothing helped)
    chosen: Candidate
    input: Candidate
    candidates: list[Candidate]
    decisions: list[Decision]
    passes: list[dict]  # the chosen plan's pipeline, canonicalize first ([] when nothing helped)
    space: SearchSpace
    nothing_helped: bool
    seconds: float
    interrupted_by_budget: bool = False
    input_model: Model | None = None


class Cache:
    """Measurements on disk, one JSON line per evaluated candidate, keyed by everything they depend on."""

    def __init__(self, folder: str | os.PathLike | None, context: str):
        self.path = Path(folder) / "measurements.jsonl" if folder else None
        self.context = hashlib.sha256(context.encode()).hexdigest()[:20]
        self.entries: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interruption
                    continue
                if isinstance(entry, dict) and entry.get("context") == self.context:
                    self.entries[entry.get("key", "")] = entry

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, values: dict) -> None:
        entry = dict(values, key=key, context=self.context)
        self.entries[key] = entry
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # appended and flushed: an interruption loses at most this line
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


Progress = Callable[[str, Candidate | None], None]


class Search:
    def __init__(self, input_model: Model, base: Model, calibration: CalibrationSet, metric: Metric,
                 max_drop: float, meter: LatencyMeter, space: SearchSpace, *, held_out: int | None = None,
                 seed: int = 0, budget_s: float | None = None, cache: Cache | None = None,
                 progress: Progress | None = None, recovery: Sequence[dict] = (), confirm: Metric | None = None):
        self.input_model = input_model  # what the user gave: latency and metric are relative to it
        self.base = base  # canonicalized, static shapes: every plan's passes run on it
        self.calibration = calibration
        self.metric = metric
        self.max_drop = max_drop
        self.meter = meter
        self.space = space
        self.held_out = held_out
        self.seed = seed
        self.budget_s = budget_s
        self.cache = cache or Cache(None, "")
        self.progress = progress or (lambda text, cand: None)
        self.recovery = list(recovery)  # passes run after a combination's float passes (distillation)
        self.confirm = confirm  # the proxy on held-out samples the search never scores (None: no confirmation)
        self.candidates: list[Candidate] = []
        self.decisions: list[Decision] = []
        self.start = time.perf_counter()
        self.input_candidate: Candidate | None = None
        self.out_of_time = False
        self.base_ratio = 1.0  # the canonicalized model's time over the input model's
        self._models: dict[str, Model] = {}
        self._kept_ms: float | None = None

    # ------------------------------------------------------------------ evaluation
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_left(self, share: float = 1.0) -> bool:
        """Whether ``share`` of the time budget is still unused (the sensitivity pass stops at
        ``SENSITIVITY_SHARE`` so that the combination is always built and measured)."""
        return self.budget_s is None or self.elapsed() <= share * self.budget_s

    def out_of_budget(self, what: str) -> bool:
        """True (and the decision said) when the time budget has run out before ``what``."""
        if self.time_left():
            return False
        self.out_of_time = True
        self.decisions.append(Decision(what, "the time budget (--budget-minutes) ran out"))
        return True

    def passes_for(self, plan: dict, *, recover: bool = False) -> list[dict]:
        passes = plan_pipeline(plan, self.space)
        if recover and self.recovery and passes:
            float_passes = [p for p in passes if "qdq" not in p]
            passes = float_passes + self.recovery + [p for p in passes if "qdq" in p]
        return passes

    def build(self, plan: dict, *, recover: bool = False) -> Model:
        """The model of ``plan``: its passes run on the canonicalized input model."""
        passes = self.passes_for(plan, recover=recover)
        if not passes:
            return self.base
        pipeline = Pipeline.from_dict({"passes": passes}, source="optimize", seed=self.seed,
                                      held_out=self.held_out, warn_error=None)
        pipeline.calibration = self.calibration
        return pipeline.run(self.base).model

    def evaluate(self, plan: dict, stage: str, *, recover: bool = False) -> Candidate:
        return self.evaluate_many([plan], stage, recover=recover)[0]

    def evaluate_many(self, plans: Sequence[dict], stage: str, *, recover: bool = False) -> list[Candidate]:
        """Each plan's candidate: from the cache, or built and measured. The builds and metrics run here one
        after another; the latencies are measured together, in parallel over the meter's devices."""
        done: list[Candidate | None] = []
        pending: list[tuple[int, str, Candidate, Model, float]] = []
        for plan in plans:
            key = plan_key(plan) + ("|recovered" if recover else "")
            cached = self.cache.get(key)
            if cached is not None:
                cand = Candidate(plan=dict(plan), stage=stage, cached=True,
                                 **{k: cached.get(k) for k in ("metric", "drop", "latency_ratio", "macs", "params",
                                                               "bytes", "seconds", "failed")})
                if cand.latency_ratio is not None:  # the ratio is what was measured; this run's input sets the ms
                    cand.latency_ms = cand.latency_ratio * self.input_candidate.latency_ms
                done.append(cand)
                continue
            start = time.perf_counter()
            cand = Candidate(plan=dict(plan), stage=stage)
            try:
                model = self.build(plan, recover=recover)
            except SculptError as e:
                cand.failed = one_line(e, 300)
                cand.seconds = time.perf_counter() - start
                self.cache.put(key, cand.as_dict())
                done.append(cand)
                continue
            self._score(cand, model)
            pending.append((len(done), key, cand, model, time.perf_counter() - start))
            done.append(None)
        if pending:
            # against the canonicalized model (what every plan starts from), then scaled to the input model
            start = time.perf_counter()
            timings = self.meter.measure(self.base, [model for _, _, _, model, _ in pending])
            share = (time.perf_counter() - start) / len(pending)
            for (index, key, cand, model, seconds), timing in zip(pending, timings):
                cand.latency_ratio = timing.ratio * self.base_ratio
                cand.latency_ms = cand.latency_ratio * self.input_candidate.latency_ms
                cand.seconds = seconds + share
                self.cache.put(key, cand.as_dict())
                self._keep_if_best(key, cand, model)
                done[index] = cand
        for cand in done:
            self._record(cand)
        return done

    def _score(self, cand: Candidate, model: Model) -> None:
        """The metric, MACs, parameters and size of a candidate's model."""
        cand.metric, cand.bytes = evaluate_saved(self.metric, model), model.byte_size()
        cand.drop = self.metric.drop(self.input_candidate.metric, cand.metric) if self.input_candidate else 0.0
        report = cost_of(model)
        cand.macs, cand.params = int(report.macs), int(report.params)

    def _keep_if_best(self, key: str, cand: Candidate, model: Model) -> None:
        """Only the fastest model within the budget stays in memory (a search measures dozens of copies of
        the model); any other is rebuilt from its plan if chosen (the passes are deterministic)."""
        if cand.within(self.max_drop) and (self._kept_ms is None or cand.latency_ms < self._kept_ms):
            self._models, self._kept_ms = {key: model}, cand.latency_ms

    def _record(self, cand: Candidate) -> None:
        self.candidates.append(cand)
        self.progress(self._describe(cand), cand)

    def _describe(self, cand: Candidate) -> str:
        if cand.failed:
            return f"{cand.stage}: failed ({cand.failed[:60]})"
        return (f"{cand.stage}: drop {cand.drop:.3g}, {cand.latency_ms:.3g} ms"
                if cand.drop is not None and cand.latency_ms is not None else cand.stage)

    def model_of(self, cand: Candidate) -> Model:
        key = cand.key + ("|recovered" if cand.stage.endswith("recovered") else "")
        if key not in self._models:  # measured in an earlier, interrupted run: rebuilt (deterministic)
            self._models[key] = self.build(cand.plan, recover=cand.stage.endswith("recovered"))
        return self._models[key]

    # ------------------------------------------------------------------ the strategy
    def run(self) -> SearchResult:
        input_cand = self._evaluate_input()
        sens = self.sensitivity()
        steps = self.allocate(sens, self.max_drop)
        best = self.validate(steps, sens)
        best = self.refine(best, sens)
        return self._result(input_cand, best)

    def _evaluate_input(self) -> Candidate:
        key = "input"
        start = time.perf_counter()
        cand = Candidate(plan={}, stage="input")
        cached = self.cache.get(key)
        base_ms = self.meter.measure_base(self.input_model)
        if cached is not None and cached.get("metric") is not None:
            cand.metric = cached["metric"]
            cand.cached = True
        else:
            cand.metric = evaluate_saved(self.metric, self.input_model)
        cand.drop, cand.latency_ms, cand.latency_ratio = 0.0, base_ms, 1.0
        report = cost_of(self.base)
        cand.macs, cand.params = int(report.macs), int(report.params)
        cand.bytes = self.input_model.byte_size()
        cand.seconds = time.perf_counter() - start
        self.cache.put(key, cand.as_dict())
        self.input_candidate = cand
        self._record(cand)
        self.decisions.append(Decision(
            "measured the input model", f"{self.metric.name} {cand.metric:.4g}; {base_ms:.3f} ms on "
                                        f"{self.meter.describe()}"))
        self._evaluate_canonicalized()
        step = self.metric.resolution
        if step is not None and step > self.max_drop / 2:
            self.decisions.append(Decision(
                f"warning: the proxy moves in steps of {step:.3g} {self.metric.units}",
                f"it is measured on too few held-out samples to tell drops within the budget {self.max_drop:g} "
                "apart: give more calibration samples (or --held-out N)"))
        return cand

    def _evaluate_canonicalized(self) -> None:
        """The canonicalized model (static shapes, exact rewrites) against the input model: every plan's
        starting point, so knobs are credited only with what they save beyond it."""
        cached = self.cache.get("canonicalized")
        if cached is not None and cached.get("latency_ratio") is not None:
            # every cached candidate's ratio was scaled by this one: measuring it again would shift them all
            ratio = cached["latency_ratio"]
        else:
            ratio = self.meter.measure(self.input_model, [self.base])[0].ratio
        self.base_ratio = ratio
        cand = Candidate(plan={}, stage="canonicalized")
        if cached is not None and cached.get("metric") is not None:
            cand.metric, cand.cached = cached["metric"], True
        else:
            cand.metric = evaluate_saved(self.metric, self.base)
        cand.drop = self.metric.drop(self.input_candidate.metric, cand.metric)
        cand.latency_ratio = ratio
        cand.latency_ms = ratio * self.input_candidate.latency_ms
        report = cost_of(self.base)
        cand.macs, cand.params, cand.bytes = int(report.macs), int(report.params), self.base.byte_size()
        self.cache.put("canonicalized", cand.as_dict())
        self._record(cand)
        self.decisions.append(Decision(
            "measured the canonicalized model (static shapes, exact rewrites)",
            f"{ratio:.3f}× the input model's time{' (cached)' if cand.cached else ''}: the plans start from it, and each knob is credited "
            "with the time it saves beyond it"))

    def sensitivity(self) -> dict[str, list[Candidate]]:
        """Each knob alone at each level: every knob's mildest level first, then the next levels of the
        knobs still within the budget (a level over it ends the knob: harsher ones only lose more), in
        batches of as many candidates as the meter has devices."""
        sens: dict[str, list[Candidate]] = {knob.name: [] for knob in self.space}
        active = list(self.space)
        depth = 0
        batch = max(1, self.meter.workers)
        while active:
            todo = [(knob, knob.levels[depth]) for knob in active if depth < len(knob.levels)]
            for first in range(0, len(todo), batch):
                if not self.time_left(SENSITIVITY_SHARE):
                    self.decisions.append(Decision(
                        f"stopped the sensitivity pass at {todo[first][0].name} (level {todo[first][1]:g})",
                        f"{SENSITIVITY_SHARE:.0%} of the time budget (--budget-minutes) is used; the rest is "
                        "for the combination"))
                    self.out_of_time = True
                    return sens
                chunk = todo[first:first + batch]
                cands = self.evaluate_many([{knob.name: level} for knob, level in chunk], "sensitivity")
                for (knob, _), cand in zip(chunk, cands):
                    sens[knob.name].append(cand)
                    if cand.failed:
                        self.decisions.append(Decision(f"left {knob.name} out",
                                                       f"the pass refused it: {cand.failed}"))
            active = [k for k in active if depth + 1 < len(k.levels) and sens[k.name]
                      and sens[k.name][-1].failed is None and sens[k.name][-1].drop <= self.max_drop]
            depth += 1
        return sens

    def allocate(self, sens: dict[str, list[Candidate]], budget: float) -> list[tuple[str, object]]:
        """The greedy steps (knob, level) within ``budget`` of summed drops, most efficient first."""
        base_ms = self.base_ratio * self.input_candidate.latency_ms  # the canonicalized model's
        floor = NOISE_FLOOR * base_ms
        options: dict[str, list[tuple[object, float, float]]] = {}
        for name, cands in sens.items():
            rows = []
            for c in cands:
                if c.failed or c.drop is None or c.latency_ms is None:
                    continue
                rows.append((c.plan[name], max(c.drop, 0.0), base_ms - c.latency_ms))
            options[name] = rows
        eps = max(budget, 1e-12) * 1e-3
        current: dict[str, tuple[float, float]] = {}  # knob -> (drop, saved) of its chosen level
        total_drop = 0.0
        steps: list[tuple[str, object]] = []
        while True:
            best = None
            for name, rows in options.items():
                cur_drop, cur_saved = current.get(name, (0.0, 0.0))
                for level, drop, saved in rows:
                    added, gained = max(drop - cur_drop, 0.0), saved - cur_saved
                    if saved < floor or gained <= 0 or total_drop + added > budget + 1e-12:
                        continue
                    score = (gained / max(added, eps), gained)
                    if best is None or score > best[0]:
                        best = (score, name, level, drop, saved)
            if best is None:
                return steps
            _, name, level, drop, saved = best
            total_drop += max(drop - current.get(name, (0.0, 0.0))[0], 0.0)
            current[name] = (drop, saved)
            steps.append((name, level))

    @staticmethod
    def plan_of(steps: Sequence[tuple[str, object]]) -> dict:
        plan: dict = {}
        for name, level in steps:
            plan[name] = level
        return plan

    def validate(self, steps: list[tuple[str, object]], sens: dict[str, list[Candidate]]) -> Candidate | None:
        """Build and measure the allocation; bisect its prefix when over the budget, raise the budget share
        while it holds. Returns the fastest candidate within the budget (None: none)."""
        if not steps:
            self.decisions.append(Decision("chose no knob", "no step saved measurable time within the budget"))
            return None
        recover = bool(self.recovery)
        stage = "combination" + (" recovered" if recover else "")
        scale, tried = 1.0, 0
        holding: Candidate | None = None
        while True:  # the first combination is measured whatever the clock says
            cand = self.evaluate(self.plan_of(steps), stage, recover=recover)
            self.decisions.append(Decision(
                f"combined {len(steps)} step(s) (budget share {scale:g})",
                self._verdict(cand)))
            if not cand.within(self.max_drop):
                holding = self._bisect(steps, stage, recover) or holding
                break
            holding = cand if holding is None or cand.latency_ms < holding.latency_ms else holding
            if tried >= MAX_SCALE_UPS or cand.drop > self.max_drop / SCALE_UP:
                break
            if not self.time_left():
                self.out_of_time = True
                break
            bigger = self.allocate(sens, self.max_drop * scale * SCALE_UP)
            if len(bigger) <= len(steps) and self.plan_of(bigger) == self.plan_of(steps):
                break  # nothing more fits however the budget is shared
            scale, tried, steps = scale * SCALE_UP, tried + 1, bigger
        return holding

    def refine(self, best: Candidate | None, sens: dict[str, list[Candidate]]) -> Candidate | None:
        """Add the steps the allocation left out one at a time to the fastest candidate within the budget,
        each measured in combination; keep one when the budget holds and it saves at least the noise floor.
        Runs while the time budget lasts. Returns the fastest candidate within the budget (None: none)."""
        current = best or next((c for c in self.candidates if c.stage == "canonicalized"
                                and c.within(self.max_drop)), None)
        if current is None or current.latency_ms is None:
            return best
        base_ms = self.base_ratio * self.input_candidate.latency_ms
        floor = NOISE_FLOOR * base_ms
        steps = []
        for name, cands in sens.items():
            for c in cands:
                if c.failed or c.drop is None or c.latency_ms is None or c.drop > self.max_drop:
                    continue
                saved = base_ms - c.latency_ms
                if saved >= floor:
                    steps.append((saved / max(c.drop, self.max_drop * 1e-3), saved, name, c.plan[name], c.drop))
        steps.sort(key=lambda s: (-s[0], -s[1]))
        recover = bool(self.recovery)
        stage = "refinement" + (" recovered" if recover else "")
        tried = 0
        for _, _, name, level, drop in steps:
            levels = list(self.space.knob(name).levels)
            if name in current.plan and levels.index(current.plan[name]) >= levels.index(level):
                continue  # the knob already holds this level or a harsher one
            if drop > self.max_drop - max(current.drop or 0.0, 0.0):
                continue  # alone it already needs more than what is left of the budget
            if self.out_of_budget("stopped refining"):
                break
            cand = self.evaluate(dict(current.plan, **{name: level}), stage, recover=recover)
            tried += 1
            kept = (cand.failed is None and cand.within(self.max_drop)
                    and cand.latency_ms <= current.latency_ms - floor)
            self.decisions.append(Decision(
                f"{'added' if kept else 'did not add'} {self.space.knob(name).describe(level)}",
                self._verdict(cand) + ("" if kept or not cand.within(self.max_drop) or cand.failed else
                                       f"; saves less than the noise floor ({floor:.3g} ms)")))
            if kept:
                current = cand
        if not tried and not self.out_of_time:
            self.decisions.append(Decision("refined nothing", "no step left fits what remains of the budget"))
        return current if best is None or current.latency_ms < best.latency_ms else best

    def _bisect(self, steps, stage: str, recover: bool) -> Candidate | None:
        lo, hi = 0, len(steps)  # prefix length lo holds (0: the input model), hi does not
        best = None
        while hi - lo > 1:
            if self.out_of_budget("stopped backing off"):
                break
            mid = (lo + hi) // 2
            cand = self.evaluate(self.plan_of(steps[:mid]), "back-off" + (" recovered" if recover else ""),
                                 recover=recover)
            self.decisions.append(Decision(f"backed off to the first {mid} step(s)", self._verdict(cand)))
            if cand.within(self.max_drop):
                lo, best = mid, cand
            else:
                hi = mid
        return best

    def _confirmed(self, feasible: list[Candidate]) -> Candidate | None:
        """The fastest of ``feasible`` whose drop on the confirmation samples also holds the budget: the
        search picked among many candidates on its own samples, which flatters the pick. At most
        ``MAX_CONFIRMATIONS`` are tried (each is rebuilt and evaluated), only those faster than the
        input model by ``MIN_SPEEDUP``."""
        reference = evaluate_saved(self.confirm, self.input_model)
        tried = 0
        for cand in feasible:
            if cand.latency_ratio > 1 - MIN_SPEEDUP or tried >= MAX_CONFIRMATIONS:
                break
            cand.confirm_drop = self.confirm.drop(reference, evaluate_saved(self.confirm, self.model_of(cand)))
            tried += 1
            holds = cand.confirm_drop <= self.max_drop
            self.decisions.append(Decision(
                f"{'confirmed' if holds else 'rejected'} the candidate at {cand.latency_ms:.3f} ms",
                f"drop {cand.confirm_drop:.4g} on the confirmation samples (budget {self.max_drop:g}; "
                f"{cand.drop:.4g} on the search's own)"))
            if holds:
                return cand
        return None

    def _verdict(self, cand: Candidate) -> str:
        if cand.failed:
            return f"failed: {cand.failed}"
        holds = "within" if cand.within(self.max_drop) else "over"
        return (f"drop {cand.drop:.4g} ({holds} the budget {self.max_drop:g}), {cand.latency_ms:.3f} ms "
                f"({cand.latency_ratio:.3f}× the input model)")

    def _result(self, input_cand: Candidate, best: Candidate | None) -> SearchResult:
        feasible = [c for c in self.candidates if c.stage != "input" and c.within(self.max_drop)
                    and c.latency_ratio is not None]
        if best is None or (feasible and min(c.latency_ms for c in feasible) < best.latency_ms):
            best = min(feasible, key=lambda c: c.latency_ms, default=None)
        if best is not None and self.confirm is not None:
            best = self._confirmed(sorted(feasible, key=lambda c: c.latency_ms))
        nothing = best is None or best.latency_ratio > 1 - MIN_SPEEDUP
        if nothing:
            why = (("no candidate faster than the input model held the budget on the confirmation samples"
                    if self.confirm is not None and feasible else "no candidate held the budget") if best is None else
                   f"the fastest candidate within the budget took {best.latency_ratio:.3f}× the input model's "
                   f"time, not at least {MIN_SPEEDUP:.0%} less")
            self.decisions.append(Decision("returned the input model unchanged", why))
            return SearchResult(self.input_model, input_cand, input_cand, self.candidates, self.decisions, [],
                                self.space, True, self.elapsed(), self.out_of_time, self.input_model)
        chosen = "; ".join(self.space.knob(n).describe(v) for n, v in sorted(best.plan.items()))
        self.decisions.append(Decision(
            f"chose {len(best.plan)} knob level(s): {chosen}" if best.plan else
            "chose the canonicalized model alone (no knob)",
            f"the fastest candidate within the budget: {self._verdict(best)}"))
        passes = [{"canonicalize": {}}] + self.passes_for(best.plan, recover=best.stage.endswith("recovered"))
        return SearchResult(self.model_of(best), best, input_cand, self.candidates, self.decisions, passes,
                            self.space, False, self.elapsed(), self.out_of_time, self.input_model)


def knob_rows(space: SearchSpace, candidates: Sequence[Candidate]) -> list[dict]:
    """Per knob and level: the sensitivity measured (drop, latency saved), for the report."""
    rows = []
    base = next((c for c in candidates if c.stage == "canonicalized"), None) or \
        next((c for c in candidates if c.stage == "input"), None)
    for knob in space:
        for c in candidates:
            if c.stage == "sensitivity" and list(c.plan) == [knob.name]:
                rows.append({"knob": knob.name, "technique": knob.technique, "level": c.plan[knob.name],
                             "drop": c.drop, "latency_ms": c.latency_ms,
                             "saved_ms": (base.latency_ms - c.latency_ms) if base and c.latency_ms else None,
                             "failed": c.failed, "describe": knob.describe(c.plan[knob.name])})
    return rows


def write_atomically(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


__all__ = ["Cache", "Candidate", "Decision", "Knob", "Search", "SearchResult", "knob_rows"]
