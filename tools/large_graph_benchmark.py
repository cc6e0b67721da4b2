"""How long `sculpt inspect` and `sculpt run --pass canonicalize` take on large graphs.

Builds synthetic models of 2,000 / 4,000 / 50,000 nodes and times both commands, each in a fresh
process (start-up and model loading included):

    python tools/large_graph_benchmark.py                       # chain and branchy, 2000,4000,50000
    python tools/large_graph_benchmark.py --sizes 2000 --kinds chain --timeout 120

- chain: ``Conv(1x1) → BatchNormalization → Relu → Identity`` repeated (every canonicalize pass has
  work: identities to drop, batch norms to fold);
- branchy: residual blocks ``x → Conv → BatchNormalization → Relu → Conv → Dropout → Add(x, ·) →
  Identity``, the block input read by two nodes.

Tensors are tiny (4 channels, 4x4 pixels), so the times are the graph algorithms, not arithmetic.
A command that exceeds ``--timeout`` seconds is reported as ``>TIMEOUT``. Columns: the node count
before and after canonicalize, the wall time of ``inspect``, of ``run`` and, within ``run``, of the
pass pipeline alone (the seconds ``run`` prints; the rest is loading, the cost reports, the final
check and the error measurement, whose onnxruntime sessions dominate on large graphs)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C, H, W = 4, 4, 4


def _conv(nodes, inits, rng, x: str, out: str, name: str, scale: float = 0.5) -> None:
    w = numpy_helper.from_array((rng.standard_normal((C, C, 1, 1)) * scale).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array(rng.standard_normal(C).astype(np.float32) * 0.1, f"{name}_b")
    inits += [w, b]
    nodes.append(helper.make_node("Conv", [x, w.name, b.name], [out], name=name))


def _bn(nodes, inits, rng, x: str, out: str, name: str) -> None:
    params = [rng.uniform(0.5, 1.5, C), rng.standard_normal(C) * 0.1, rng.standard_normal(C) * 0.1,
              rng.uniform(0.5, 1.5, C)]
    names = []
    for suffix, value in zip(("scale", "bias", "mean", "var"), params):
        t = numpy_helper.from_array(value.astype(np.float32), f"{name}_{suffix}")
        inits.append(t)
        names.append(t.name)
    nodes.append(helper.make_node("BatchNormalization", [x] + names, [out], name=name, epsilon=1e-5))


def build(kind: str, n_nodes: int, seed: int = 0) -> onnx.ModelProto:
    """A model of ``kind`` ('chain' or 'branchy') with (about) ``n_nodes`` nodes."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    k = 0
    while len(nodes) < n_nodes:
        p = f"b{k}"
        if kind == "chain":
            _conv(nodes, inits, rng, x, f"{p}_c", f"{p}_conv")
            _bn(nodes, inits, rng, f"{p}_c", f"{p}_n", f"{p}_bn")
            nodes.append(helper.make_node("Relu", [f"{p}_n"], [f"{p}_r"], name=f"{p}_relu"))
            nodes.append(helper.make_node("Identity", [f"{p}_r"], [f"{p}_y"], name=f"{p}_id"))
        elif kind == "branchy":
            _conv(nodes, inits, rng, x, f"{p}_c1", f"{p}_conv1")
            _bn(nodes, inits, rng, f"{p}_c1", f"{p}_n", f"{p}_bn")
            nodes.append(helper.make_node("Relu", [f"{p}_n"], [f"{p}_r"], name=f"{p}_relu"))
            # a small residual branch: 10,000 blocks of x + f(x) stay finite
            _conv(nodes, inits, rng, f"{p}_r", f"{p}_c2", f"{p}_conv2", scale=1e-4)
            nodes.append(helper.make_node("Dropout", [f"{p}_c2"], [f"{p}_d"], name=f"{p}_drop"))
            nodes.append(helper.make_node("Add", [x, f"{p}_d"], [f"{p}_a"], name=f"{p}_add"))
            nodes.append(helper.make_node("Identity", [f"{p}_a"], [f"{p}_y"], name=f"{p}_id"))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        x = f"{p}_y"
        k += 1
    graph = helper.make_graph(nodes, f"{kind}{n_nodes}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, H, W])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def timed(cmd: list[str], timeout: float) -> tuple[float | None, str]:
    """Wall seconds of ``cmd`` (None on timeout) and its output; raises when it fails."""
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-400:]}")
    return elapsed, out.stdout


_PIPELINE_SECONDS = re.compile(r"^max error vs input model .*; ([\d.]+) s$", re.MULTILINE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,4000,50000", help="comma-separated node counts")
    p.add_argument("--kinds", default="chain,branchy", help="chain, branchy or both")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per command before giving up")
    p.add_argument("--commands", default="inspect,run", help="inspect, run or both")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    sculpt = [sys.executable, "-m", "sculpt"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} cores, load average {load:.2f} at start; timeout {args.timeout:.0f} s")
    print(f"{'graph':10} {'nodes':>7} {'after':>7} {'inspect s':>10} {'run s':>10} {'passes s':>9}")
    with tempfile.TemporaryDirectory(prefix="sculpt-large-") as tmp:
        for kind in kinds:
            for n in sizes:
                proto = build(kind, n)
                path = Path(tmp) / f"{kind}{n}.onnx"
                onnx.save(proto, path)
                out = Path(tmp) / f"{kind}{n}_out.onnx"
                cells = {}
                if "inspect" in commands:
                    cells["inspect"], _ = timed(sculpt + ["inspect", str(path)], args.timeout)
                if "run" in commands:
                    cells["run"], text = timed(sculpt + ["run", str(path), "--pass", "canonicalize", "-o", str(out)],
                                               args.timeout)
                    m = _PIPELINE_SECONDS.search(text)
                    if m:
                        cells["passes"] = float(m.group(1))
                after = len(onnx.load(out).graph.node) if out.exists() else None

                def fmt(c):
                    if c not in cells:
                        return "-"
                    return f">{args.timeout:.0f}" if cells[c] is None else f"{cells[c]:.1f}"

                print(f"{kind:10} {len(proto.graph.node):7d} {after if after is not None else '-':>7} "
                      f"{fmt('inspect'):>10} {fmt('run'):>10} {fmt('passes'):>9}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
