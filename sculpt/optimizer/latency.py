"""Latency measured, not estimated, on the runtime a model will run on: onnxruntime on this machine, the
TVM build on this machine, or the TVM build on devices behind a TVM RPC tracker.

Every candidate is timed *against the input model* on the same runtime: the two alternate run by run
(``rounds`` × ``runs`` pairs, after a warm-up), and the candidate's latency is the ratio of the two
series' low quantiles (``QUANTILE``) times the input model's own median. Other processes only ever add
time to a run: alternating puts a busy spell on both series alike, and the low quantile keeps the runs
it spared, which matters when a candidate saves 3% and a loaded host moves single runs by 50%.
With several devices registered under the key, candidates are measured in parallel, one per device.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from sculpt.errors import OptionError
from sculpt.ir.model import Model

# onnxruntime's and TVM's worker threads keep spinning a moment after a run: a short pause before each
# timed batch keeps one runtime's spinning out of the other's numbers
SETTLE_S = 0.05

WARMUP_RUNS = 2
QUANTILE = 0.2


def low_quantile(values: list[float]) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), QUANTILE))
Timer = Callable[[], float]  # one timed run (ms)


@dataclass
class Timing:
    """A candidate's latency against the input model measured in the same rounds."""

    ms: float  # the candidate's median in these runs
    ratio: float  # candidate / reference (low quantiles of alternating runs)
    pairs: int

    def as_dict(self) -> dict:
        return {"ms": round(self.ms, 4), "ratio": round(self.ratio, 4), "pairs": self.pairs}


class LatencyMeter:
    """Times models on one runtime. Subclasses give ``build(model)`` (whatever the runtime loads: run in the
    calling thread, one at a time) and ``load(built, slot)``: a function timing one round on the device of
    ``slot`` (slots run in parallel threads when the meter has several devices)."""

    runtime = ""
    workers = 1  # candidates measured at once (devices of an RPC key)

    def __init__(self, feeds: Mapping[str, np.ndarray], *, threads: int = 1, runs: int = 10, rounds: int = 5):
        if threads < 1 or runs < 1 or rounds < 1:
            raise OptionError("threads, runs and rounds of the latency measurement must be ≥ 1")
        self.feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        self.threads = threads
        self.runs = runs
        self.rounds = rounds
        self._base: dict[int, tuple[Model, Timer]] = {}
        self._base_built: tuple[Model, object] | None = None
        self.base_ms: float | None = None

    @property
    def identity(self) -> str:
        shapes = {k: list(v.shape) for k, v in sorted(self.feeds.items())}
        return f"{self.describe()}|{shapes}"

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, model: Model):  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, built, slot: int) -> Timer:  # pragma: no cover - abstract
        raise NotImplementedError

    def _base_timer(self, base: Model, slot: int) -> Timer:
        if slot not in self._base or self._base[slot][0] is not base:
            if self._base_built is None or self._base_built[0] is not base:
                self._base_built = (base, self.build(base))
            self._base[slot] = (base, self.load(self._base_built[1], slot))
        return self._base[slot][1]

    def measure_base(self, base: Model) -> float:
        """The input model's median latency (ms): ``rounds`` rounds of ``runs`` runs, twice over."""
        timer = self._base_timer(base, 0)
        times = []
        for _ in range(2 * self.rounds):
            time.sleep(SETTLE_S)
            times += [timer() for _ in range(self.runs)]
        self.base_ms = statistics.median(times)
        return self.base_ms

    def _against_base(self, base: Model, built, slot: int) -> Timing:
        base_timer = self._base_timer(base, slot)
        timer = self.load(built, slot)
        for _ in range(WARMUP_RUNS):
            base_timer(), timer()
        base_times, times = [], []
        for _ in range(self.rounds):
            time.sleep(SETTLE_S)
            for _ in range(self.runs):
                base_times.append(base_timer())
                times.append(timer())
        ratio = low_quantile(times) / low_quantile(base_times)
        return Timing(statistics.median(times), ratio, len(times))

    def measure(self, base: Model, models: Sequence[Model]) -> list[Timing]:
        """Each model's latency against ``base`` (the reference, timed in the same alternating runs); in
        parallel over the meter's devices."""
        if self.workers <= 1 or len(models) <= 1:
            return [self._against_base(base, self.build(m), 0) for m in models]
        built = [self.build(m) for m in models]  # builds use every core: one at a time, here
        for slot in range(self.workers):  # each device loads the input model once, before the threads start
            self._base_timer(base, slot)
        chunks = [list(range(k, len(built), self.workers)) for k in range(self.workers)]
        results: dict[int, Timing] = {}

        def work(slot: int) -> None:  # one thread per device: its candidates one after another
            for index in chunks[slot]:
                results[index] = self._against_base(base, built[index], slot)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for future in [pool.submit(work, slot) for slot in range(self.workers)]:
                future.result()
        return [results[k] for k in range(len(built))]


class OnnxruntimeLatency(LatencyMeter):
    runtime = "ort"

    def describe(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}, {self.threads} thread(s), this machine"

    def build(self, model: Model):
        return model

    def load(self, built, slot: int) -> Timer:
        from sculpt.runtime import make_session

        session = make_session(built, threads=self.threads)
        feeds = dict(self.feeds)
        session.run(None, feeds)  # the first run allocates

        def one_run() -> float:
            start = time.perf_counter()
            session.run(None, feeds)
            return (time.perf_counter() - start) * 1e3

        return one_run


class TvmLatency(LatencyMeter):
    """The TVM build of each candidate (sculpt's kernels) for ``target``: on this machine, or on the
    devices registered under ``device`` (a tune.RemoteDevice) at an RPC tracker, one candidate per
    free device at a time."""

    runtime = "tvm"

    def __init__(self, feeds, *, target: str = "host", device=None, threads: int = 1, runs: int = 10,
                 rounds: int = 5):
        super().__init__(feeds, threads=threads, runs=runs, rounds=rounds)
        from sculpt.backends.tvm.targets import get_target

        self.target = get_target(target)
        self.device = device
        self._sessions: dict[int, object] = {}
        if device is not None:
            from sculpt.backends.tvm.rpc import free_devices

            self.workers = max(1, free_devices(device))
        elif self.target.is_cross or self.target.is_opencl:
            raise OptionError(f"--target {self.target.name} does not run on this machine: measuring its builds "
                              "needs the device, through --rpc HOST:PORT --device-key KEY")
        else:
            from sculpt.backends.tvm import thread_policy

            thread_policy.apply(thread_policy.DEFAULT_POLICY, threads)

    def describe(self) -> str:
        where = f"rpc:{self.device}" if self.device is not None else "this machine"
        return f"TVM build for {self.target.name} (sculpt kernels), {self.threads} thread(s), {where}"

    def build(self, model: Model):
        from sculpt.backends.tvm.bench import compile_for_timing

        return compile_for_timing(model, self.target)

    def load(self, built, slot: int) -> Timer:
        from sculpt.backends.tvm.bench import load_timer

        if self.device is not None and slot not in self._sessions:  # a slot keeps its device for good
            from sculpt.backends.tvm.rpc import request_session

            self._sessions[slot] = request_session(self.device, timeout_sec=0)  # held for the whole search
        return load_timer(built, self.feeds, device=self.device, session=self._sessions.get(slot), runs=1,
                          warmup=1, threads=self.threads)


def make_meter(runtime: str, feeds: Mapping[str, np.ndarray], *, target: str | None = None, device=None,
               threads: int = 1, runs: int = 10, rounds: int = 5) -> LatencyMeter:
    """The meter for ``--runtime ort|tvm`` (``--target``, ``--rpc``/``--device-key`` for tvm)."""
    if runtime == "ort":
        if device is not None or target not in (None, "host"):
            raise OptionError("--runtime ort measures onnxruntime on this machine: --target and --rpc are for "
                              "--runtime tvm")
        return OnnxruntimeLatency(feeds, threads=threads, runs=runs, rounds=rounds)
    if runtime == "tvm":
        return TvmLatency(feeds, target=target or "host", device=device, threads=threads, runs=runs, rounds=rounds)
    raise OptionError(f"--runtime '{runtime}': ort or tvm")
