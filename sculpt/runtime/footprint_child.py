"""Run by :mod:`sculpt.runtime.footprint` as a script in a fresh Python process (it imports nothing of
sculpt): load one ONNX model in onnxruntime, time it, and print what it cost as one JSON line.

Arguments: MODEL.onnx FEEDS.npz RUNS WARMUP THREADS (0: onnxruntime's default). Peak memory is the
peak resident set of the process while the session is created and run, less the resident set just
before: the model's weights as onnxruntime holds them, its arena and the activations. Linux keeps the
peak in /proc/self/status (VmHWM) and resets it when 5 is written to /proc/self/clear_refs, so the
peak left by the imports does not hide the model's."""

import json
import resource
import statistics
import sys
import time


def _status_kb(key):
    """A kB figure of /proc/self/status (VmRSS, VmHWM), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak():
    """Reset the peak resident set to the current one; returns the resident set (kB) it starts from.
    Without /proc (not Linux) the peak so far (``ru_maxrss``) is the baseline."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _status_kb("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv):
    model_path, feeds_path, runs, warmup, threads = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    import numpy as np
    import onnxruntime as ort

    with np.load(feeds_path, allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    baseline_kb = _reset_peak()
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    for _ in range(max(warmup, 1)):  # at least one: the arena is sized by the first run
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    peak_kb = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"latency_ms": statistics.median(times) if times else None,
                      "latency_runs": len(times), "peak_bytes": max(0, peak_kb - baseline_kb) * 1024}))


if __name__ == "__main__":
    main(sys.argv[1:])
