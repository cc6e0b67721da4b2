"""`sculpt optimize`: the search end to end on a small CNN (files, reproduction by `sculpt run`, the cache,
the held-out measure, refusals), the strategy's allocation and back-off on given measurements, the
report in a real headless browser, and the TVM runtime measured on two RPC devices on loopback."""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from sculpt.cli import main
from sculpt.examples import tiny_convnet
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.model import Model
from sculpt.optimizer import optimize
from sculpt.optimizer.latency import OnnxruntimeLatency
from sculpt.optimizer.metric import Metric, proxy_metric
from sculpt.optimizer.search import MIN_SPEEDUP, NOISE_FLOOR, Candidate, Search
from sculpt.optimizer.space import Knob, SearchSpace, plan_pipeline, search_space
from sculpt.runtime import output_error, run

SIZE = 64


@pytest.fixture(scope="module")
def convnet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "convnet.onnx"
    tiny_convnet(seed=3, batch=1, size=SIZE).save(path)
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("cal") / "cal.npz"
    np.savez(path, input=rng.normal(0, 1, (16, 3, SIZE, SIZE)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def searched(convnet, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "out"
    result = optimize(convnet, str(calibration), out, proxy="error", max_drop=0.2, techniques=["prune", "low-rank"],
                      max_knobs=3, latency_rounds=2, latency_runs=10)
    return result, out


def test_writes_every_file_and_a_checked_model(searched):
    result, out = searched
    for name in ("model.onnx", "pipeline.yaml", "candidates.json", "candidates.csv", "report.html"):
        assert (out / name).is_file(), name
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    data = json.loads((out / "candidates.json").read_text())
    assert len(data["candidates"]) == len(result.candidates) >= 4
    assert {c["stage"] for c in data["candidates"]} >= {"input", "sensitivity"}
    assert data["metric"]["kind"] == "error" and data["metric"]["max_drop"] == 0.2
    rows = (out / "candidates.csv").read_text().splitlines()
    assert len(rows) == len(result.candidates) + 1 and rows[0].startswith("stage,plan,metric,drop")


def test_never_slower_and_within_the_budget(searched):
    result, _ = searched
    if result.nothing_helped:
        assert result.chosen is result.input and result.passes == []
    else:
        assert result.chosen.latency_ratio <= 1 - MIN_SPEEDUP
        assert result.chosen.drop <= result.max_drop
        assert result.passes[0] == {"canonicalize": {}}
    measured = [c for c in result.candidates if c.stage != "input" and c.failed is None]
    assert all(c.latency_ms > 0 and c.drop is not None for c in measured)


def test_the_pipeline_file_reproduces_the_model(searched, convnet, tmp_path):
    result, out = searched
    spec = yaml.safe_load((out / "pipeline.yaml").read_text())
    assert spec["held_out"] == 4 and spec["calibration"].endswith("cal.npz")
    again = tmp_path / "again.onnx"
    assert main(["run", str(convnet), "--pipeline", str(out / "pipeline.yaml"), "-o", str(again),
                 "--latency-runs", "0"]) == 0
    a, b = Model.load(out / "model.onnx"), Model.load(again)
    feeds = {"input": np.random.default_rng(1).normal(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)}
    ya, yb = run(a, feeds), run(b, feeds)
    assert ya.keys() == yb.keys()
    for name in ya:
        np.testing.assert_array_equal(ya[name], yb[name])


def test_the_reported_drop_is_the_held_out_error(searched, convnet, calibration):
    """The proxy's drop of the chosen model, measured again by hand on the held-out samples."""
    result, out = searched
    cal = CalibrationSet.from_npz(calibration)
    held = list(cal.split(4).held_out)
    fitted = list(cal.split(4).fitting)
    reference, chosen = Model.load(convnet), Model.load(out / "model.onnx")
    errors = [output_error("probs", run(chosen, f)["probs"], run(reference, f)["probs"]).max_rel for f in held]
    assert result.chosen.drop == pytest.approx(max(errors), rel=1e-6, abs=1e-9)
    assert not any(np.array_equal(h["input"], f["input"]) for h in held for f in fitted)


def test_an_interrupted_search_resumes_from_the_cache(searched, convnet, calibration):
    result, out = searched
    again = optimize(convnet, str(calibration), out, proxy="error", max_drop=0.2, techniques=["prune", "low-rank"],
                     max_knobs=3, latency_rounds=2, latency_runs=10)
    evaluated = [c for c in again.candidates if c.stage != "input"]
    assert evaluated and all(c.cached for c in evaluated), [(c.stage, c.plan, c.cached) for c in evaluated if not c.cached]
    assert again.chosen.plan == result.chosen.plan


def test_the_report_embeds_its_plots(searched):
    _, out = searched
    text = (out / "report.html").read_text()
    images = text.count("data:image/png;base64,")
    assert images >= 2
    first = text.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Decisions" in text and "Pareto" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_report_renders_in_a_headless_browser(searched):
    _, out = searched
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", (out / "report.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    images = dom.count("<img")
    assert images >= 2
    assert f"plots rendered: {images} of {images}" in dom


# ---------------------------------------------------------------------------------------------- strategy
def _search_with(measured: dict[str, dict], max_drop: float, base_ms: float = 10.0) -> Search:
    """A Search whose candidates are given, not measured: ``measured`` maps a plan key to (drop, ms)."""
    knobs = [Knob("a", "prune", "a", (0.25, 0.5), 100), Knob("b", "prune", "b", (0.25, 0.5), 100),
             Knob("c", "low-rank", "c", (2.0,), 100)]
    search = Search.__new__(Search)
    search.space, search.max_drop, search.recovery, search.confirm = SearchSpace(knobs), max_drop, [], None
    search.candidates, search.decisions, search.out_of_time, search.budget_s = [], [], False, None
    search.input_candidate = Candidate({}, "input", 100.0, 0.0, base_ms, 1.0)
    search.base_ratio = 1.0

    def evaluate(plan, stage, *, recover=False):
        key = json.dumps(plan, sort_keys=True)
        drop, ms = measured.get(key, (math.inf, base_ms))
        cand = Candidate(dict(plan), stage, 100 - drop, drop, ms, ms / base_ms)
        search.candidates.append(cand)
        return cand

    search.evaluate = evaluate
    search.evaluate_many = lambda plans, stage, recover=False: [evaluate(p, stage) for p in plans]
    search.meter = type("OneDevice", (), {"workers": 1})()
    return search


def _sens(search, rows):
    return {name: [Candidate({name: lv}, "sensitivity", 100 - d, d, ms, ms / 10) for lv, d, ms in levels]
            for name, levels in rows.items()}


def test_allocation_takes_the_most_time_per_drop_within_the_budget():
    search = _search_with({}, 1.0)
    sens = _sens(search, {"a": [(0.25, 0.1, 9.0), (0.5, 0.9, 7.0)],  # 1 ms for 0.1, then 2 more for 0.8
                          "b": [(0.25, 0.5, 8.0), (0.5, 3.0, 6.0)],  # 2 ms for 0.5; 0.5 is over the budget
                          "c": [(2.0, 0.0, 9.95)]})  # saves less than the noise floor
    steps = search.allocate(sens, 1.0)
    assert steps[0] == ("a", 0.25)  # 10 ms per point, the best ratio
    assert ("b", 0.25) in steps and ("b", 0.5) not in steps
    assert ("c", 2.0) not in steps  # 0.05 ms < NOISE_FLOOR of 10 ms
    assert 0.05 < NOISE_FLOOR * 10
    drops = {(name, c.plan[name]): c.drop for name, cands in sens.items() for c in cands}
    plan = Search.plan_of(steps)
    assert sum(drops[(name, level)] for name, level in plan.items()) <= 1.0


def test_validation_backs_off_to_the_longest_prefix_that_holds():
    steps = [("a", 0.25), ("b", 0.25), ("a", 0.5)]
    key = lambda steps_: json.dumps(Search.plan_of(steps_), sort_keys=True)  # noqa: E731
    measured = {key(steps): (1.5, 6.0), key(steps[:2]): (0.7, 7.5), key(steps[:1]): (0.1, 9.0)}
    search = _search_with(measured, 1.0)
    best = search.validate(steps, {})
    assert best.plan == {"a": 0.25, "b": 0.25}
    assert [c.stage for c in search.candidates] == ["combination", "back-off", "back-off"]  # prefixes 1, 2
    assert any("backed off to the first 2" in d.what for d in search.decisions)


def test_nothing_helps_returns_the_input_model():
    search = _search_with({json.dumps({"a": 0.25}): (0.0, 9.9)}, 1.0)
    search.input_model = "the input"
    search.start = 0.0
    best = search.validate([("a", 0.25)], {})
    result = search._result(search.input_candidate, best)
    assert result.nothing_helped and result.model == "the input" and result.passes == []
    assert "not at least 3% less" in search.decisions[-1].why


def test_plan_pipeline_names_each_technique_once(convnet):
    base = Model.load(convnet)
    base.fix_input_shapes({"input": [1, 3, SIZE, SIZE]})
    base.infer_shapes()
    space = search_space(base, ("prune", "low-rank", "int8"), max_knobs=10, min_share=0.0)
    prune = [k for k in space if k.technique == "prune"]
    low = [k for k in space if k.technique == "low-rank"]
    passes = plan_pipeline({prune[0].name: 0.5, low[0].name: 2.0, "int8": 0}, space)
    names = [next(iter(p)) for p in passes]
    assert names == ["channel-pruning", "low-rank", "qdq"]
    pruning = passes[0]["channel-pruning"]
    assert list(pruning["layer_ratios"].values()) == [0.5]
    assert prune[0].sources[0] not in pruning["ignore"]
    assert set(pruning["ignore"]) == {s for k in prune[1:] for s in k.sources}


# ---------------------------------------------------------------------------------------------- refusals
def _metric_file(tmp_path, body: str) -> Path:
    path = tmp_path / "my_metric.py"
    path.write_text(body)
    return path


@pytest.mark.parametrize("spec, message", [
    ("nowhere.py:score", "no such file"),
    ("{file}:missing", "has no function 'missing'"),
    ("{file}", "give FILE.py:FUNC"),
])
def test_bad_metrics_are_one_line_errors_and_nothing_is_written(spec, message, convnet, calibration, tmp_path,
                                                                capsys):
    metric = _metric_file(tmp_path, "def score(path):\n    return 1.0\n")
    out = tmp_path / "out"
    code = main(["optimize", str(convnet), "--calibration", str(calibration), "-o", str(out),
                 "--metric", spec.format(file=metric), "--max-drop", "1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_metric_returning_nan_is_refused(convnet, calibration, tmp_path, capsys):
    metric = _metric_file(tmp_path, "def score(path):\n    return float('nan')\n")
    out = tmp_path / "out"
    code = main(["optimize", str(convnet), "--calibration", str(calibration), "-o", str(out),
                 "--metric", f"{metric}:score", "--max-drop", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "a metric must be a finite number" in err and err.count("\n") == 1
    assert not (out / "model.onnx").exists()


@pytest.mark.parametrize("extra, message", [
    (["--max-drop", "nan"], "--max-drop must be a finite number"),
    (["--metric", "{metric}:score"], "--max-drop is needed with --metric"),
    (["--techniques", "prune,sparsify"], "give --runtime tvm"),
    (["--techniques", "prune,pruning"], "unknown 'pruning'"),
    (["--rpc", "127.0.0.1:9"], "give --runtime tvm"),
    (["--budget-minutes", "0"], "--budget-minutes must be a finite number > 0"),
])
def test_bad_options_are_one_line_errors(extra, message, convnet, calibration, tmp_path, capsys):
    metric = _metric_file(tmp_path, "def score(path):\n    return 1.0\n")
    out = tmp_path / "out"
    code = main(["optimize", str(convnet), "--calibration", str(calibration), "-o", str(out)]
                + [e.format(metric=metric) for e in extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (out / "model.onnx").exists()


def test_a_user_metric_decides(convnet, calibration, tmp_path, capsys):
    """The user's function is what the budget applies to: a metric that punishes any change of the output
    lets nothing through, and the input model comes back."""
    reference = tmp_path / "reference.npz"
    feeds = {"input": np.random.default_rng(3).normal(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)}
    np.savez(reference, probs=run(Model.load(convnet), feeds)["probs"], input=feeds["input"])
    metric = _metric_file(tmp_path, (
        "import numpy as np, onnxruntime as ort\n"
        f"REF = np.load({str(reference)!r})\n"
        "CALLS = []\n"
        "def fidelity(path):\n"
        "    CALLS.append(path)\n"
        "    s = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
        "    y = s.run(None, {'input': REF['input']})[0]\n"
        "    return -1000.0 * float(np.abs(y - REF['probs']).max())\n"))
    out = tmp_path / "out"
    assert main(["optimize", str(convnet), "--calibration", str(calibration), "-o", str(out), "--metric",
                 f"{metric}:fidelity", "--max-drop", "1e-6", "--techniques", "prune", "--max-knobs", "2",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metric"].startswith("the user's metric my_metric.py:fidelity")
    assert summary["nothing_helped"] is True
    assert Model.load(out / "model.onnx").sha256() == Model.load(convnet).sha256()


# ---------------------------------------------------------------------------------------------- RPC
@pytest.mark.slow
def test_tvm_latency_on_two_rpc_devices_in_parallel(convnet):
    from rpc_loopback import KEY, loopback_tracker

    from sculpt.backends.tvm.tune import RemoteDevice
    from sculpt.optimizer.latency import TvmLatency

    base = Model.load(convnet)
    feeds = {"input": np.zeros((1, 3, SIZE, SIZE), np.float32)}
    with loopback_tracker(servers=2) as address:
        meter = TvmLatency({"input": feeds["input"]}, target="host", device=RemoteDevice.parse(address, KEY),
                           rounds=2, runs=3)
        assert meter.workers == 2
        cands = [base, base.clone()]
        timings = meter.measure(base, cands)
        assert len(meter._sessions) == 2  # one session held per device
    assert all(t.ms > 0 and 0.5 < t.ratio < 2.0 for t in timings)  # the same model against itself


def test_ort_meter_measures(convnet):
    """A model against itself measures about 1; a model doing a quarter of the work measures faster (a
    margin the shared host's noise cannot flip)."""
    big = tiny_convnet(seed=3, batch=1, size=128)
    meter = OnnxruntimeLatency({"input": np.zeros((1, 3, 128, 128), np.float32)}, rounds=3, runs=10)
    assert meter.measure(big, [big.clone()])[0].ratio == pytest.approx(1.0, abs=0.25)
    small = OnnxruntimeLatency({"input": np.zeros((1, 3, 64, 64), np.float32)}, rounds=3, runs=10)
    assert small.measure_base(tiny_convnet(seed=3, batch=1, size=64)) < meter.measure_base(big)


def test_proxy_agreement_counts_positions():
    model = tiny_convnet(seed=1, batch=1, size=32)
    samples = [{"input": np.random.default_rng(k).normal(0, 1, (1, 3, 32, 32)).astype(np.float32)} for k in range(5)]
    metric = proxy_metric(model, samples)
    assert metric.kind == "agreement" and metric.resolution == pytest.approx(20.0)
    assert metric.evaluate(model, Path("unused")) == 100.0


def test_tvm_runtime_here_and_the_artifact(convnet, calibration, tmp_path):
    """Latency measured on the TVM build (sculpt's kernels) on this machine; --target also writes the
    compiled artifact of the chosen model."""
    out = tmp_path / "out"
    result = optimize(convnet, str(calibration), out, proxy="error", max_drop=0.2, techniques=["prune"],
                      max_knobs=1, runtime="tvm", target="host", latency_rounds=2, latency_runs=5)
    assert "TVM build for host" in result.runtime
    assert (out / "model.so").is_file() and (out / "model.so").stat().st_size > 0
    measured = [c for c in result.candidates if c.stage not in ("input",) and c.failed is None]
    assert measured and all(c.latency_ms > 0 for c in measured)


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is None, reason="the train extra is not installed")
def test_distillation_recovers_the_combination(convnet, calibration, tmp_path):
    out = tmp_path / "out"
    result = optimize(convnet, str(calibration), out, proxy="error", max_drop=0.5, techniques=["prune"],
                      max_knobs=2, distill_steps=5, latency_rounds=2, latency_runs=5)
    stages = {c.stage for c in result.candidates}
    assert stages & {"combination recovered", "back-off recovered"}
    if not result.nothing_helped and result.chosen.stage.endswith("recovered"):
        assert any("distill" in p for p in result.passes)


def test_an_exhausted_time_budget_still_measures_the_combination():
    steps = [("a", 0.25), ("b", 0.25)]
    key = lambda steps_: json.dumps(Search.plan_of(steps_), sort_keys=True)  # noqa: E731
    search = _search_with({key(steps): (2.0, 7.0), key(steps[:1]): (0.1, 9.0)}, 1.0)
    search.budget_s, search.start = 1.0, -100.0  # 100 s spent of 1
    assert all(v == [] for v in search.sensitivity().values())  # stops before the first knob, saying why
    assert "stopped the sensitivity pass" in search.decisions[-1].what
    best = search.validate(steps, {})
    assert [c.stage for c in search.candidates] == ["combination"]  # no back-off past the budget
    assert best is None and search.out_of_time
    assert search.decisions[-1].what == "stopped backing off"


def test_sensitivity_tries_every_knob_mildest_first_and_stops_a_knob_over_the_budget():
    k = lambda plan: json.dumps(plan, sort_keys=True)  # noqa: E731
    search = _search_with({k({"a": 0.25}): (0.1, 9.0), k({"b": 0.25}): (2.0, 8.0), k({"c": 2.0}): (0.0, 9.5),
                           k({"a": 0.5}): (0.5, 8.5)}, 1.0)
    sens = search.sensitivity()
    assert [c.plan for c in search.candidates] == [{"a": 0.25}, {"b": 0.25}, {"c": 2.0}, {"a": 0.5}]
    assert [len(sens[n]) for n in "abc"] == [2, 1, 1]  # b's 50% is never tried: 25% already lost too much


def test_refinement_adds_left_out_steps_measured_in_combination():
    """The allocation's sums misjudged the combination (bisected to one step); refinement adds the other
    steps one at a time, keeps the one that holds the budget and saves time, and rejects the rest."""
    k = lambda plan: json.dumps(plan, sort_keys=True)  # noqa: E731
    measured = {k({"a": 0.25}): (0.2, 9.0),
                k({"a": 0.25, "b": 0.25}): (0.6, 8.0),  # holds: kept
                k({"a": 0.25, "b": 0.25, "c": 2.0}): (1.4, 7.0),  # over the budget: rejected
                k({"a": 0.5, "b": 0.25}): (0.9, 7.95)}  # holds but saves less than the floor (0.1 ms): rejected
    search = _search_with(measured, 1.0)
    search.start = 0.0
    # most time per drop first: b 25% (10 ms per point), a 50% (4.7), c (2.5); b 50% is over the whole budget
    sens = _sens(search, {"a": [(0.25, 0.2, 9.0), (0.5, 0.3, 8.6)], "b": [(0.25, 0.1, 9.0), (0.5, 1.5, 7.0)],
                          "c": [(2.0, 0.2, 9.5)]})
    start = Candidate({"a": 0.25}, "back-off", 99.8, 0.2, 9.0, 0.9)
    best = search.refine(start, sens)
    assert best.plan == {"a": 0.25, "b": 0.25} and best.stage == "refinement"
    assert [c.plan for c in search.candidates] == [{"a": 0.25, "b": 0.25}, {"a": 0.5, "b": 0.25},
                                                   {"a": 0.25, "b": 0.25, "c": 2.0}]
    whats = [d.what for d in search.decisions]
    assert sum(w.startswith("added") for w in whats) == 1 and sum(w.startswith("did not add") for w in whats) == 2
    assert any("noise floor" in d.why for d in search.decisions)


def test_refinement_stops_when_the_time_budget_is_spent():
    search = _search_with({}, 1.0)
    search.budget_s, search.start = 1.0, -100.0
    sens = _sens(search, {"a": [(0.25, 0.2, 9.0)]})
    start = Candidate({}, "canonicalized", 100.0, 0.0, 10.0, 1.0)
    assert search.refine(start, sens) is start and search.candidates == []
    assert search.out_of_time and search.decisions[-1].what == "stopped refining"


def test_confirmation_rejects_a_pick_the_search_samples_flattered():
    """The fastest candidate within the budget on the search's samples loses too much on the confirmation
    samples: the next fastest that holds there is chosen, and the decisions say why."""
    k = lambda plan: json.dumps(plan, sort_keys=True)  # noqa: E731
    search = _search_with({}, 1.0)
    search.input_model = "the input"
    fast = Candidate({"a": 0.5}, "refinement", 99.5, 0.5, 6.0, 0.6)
    slower = Candidate({"a": 0.25}, "sensitivity", 99.8, 0.2, 8.0, 0.8)
    too_slow = Candidate({"b": 0.25}, "sensitivity", 100.0, 0.0, 9.9, 0.99)
    search.candidates += [search.input_candidate, fast, slower, too_slow]
    confirm_drops = {k({"a": 0.5}): 3.0, k({"a": 0.25}): 0.6, k({"b": 0.25}): 0.0}

    class Saved:
        def __init__(self, plan):
            self.plan = plan

        def save(self, path):
            pass

    search.model_of = lambda cand: Saved(cand.plan)
    search.confirm = Metric("top-1 agreement", True, "percent", "confirm",
                            lambda model, path: 100.0 - confirm_drops.get(k(getattr(model, "plan", {})), 0.0)
                            if model != "the input" else 100.0, "agreement")
    search.input_model = type("Input", (), {"save": lambda self, path: None})()
    search.start = 0.0
    result = search._result(search.input_candidate, fast)
    assert result.chosen is slower and not result.nothing_helped
    assert fast.confirm_drop == 3.0 and slower.confirm_drop == pytest.approx(0.6) and too_slow.confirm_drop is None
    whats = [d.what for d in search.decisions]
    assert any(w.startswith("rejected the candidate at 6.000") for w in whats)
    assert any(w.startswith("confirmed the candidate at 8.000") for w in whats)


def test_optimize_keeps_confirmation_samples_from_the_search(convnet, calibration, tmp_path):
    """With 8 or more held-out samples a third of them confirms the result: the search's proxy is built on
    the other two thirds (its identity names their count), and the chosen candidate carries its
    confirmation drop within the budget."""
    result = optimize(convnet, str(calibration), tmp_path / "out", proxy="error", max_drop=0.2,
                      techniques=["prune"], max_knobs=2, held_out=9, latency_rounds=2, latency_runs=10)
    assert result.metric.identity.startswith("proxy:error:6:")
    if not result.nothing_helped:
        assert result.chosen.confirm_drop is not None and result.chosen.confirm_drop <= 0.2
        assert any(d.what.startswith("confirmed") for d in result.decisions)
