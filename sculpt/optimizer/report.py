"""What `optimize` leaves in its output folder besides the model: every candidate as JSON and CSV, and
``report.html``, one self-contained page (plots embedded as PNG) with the accuracy-vs-latency Pareto
front, the per-knob sensitivity, the per-layer latency before and after (onnxruntime's profiler) and
each decision with its reason."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Mapping, Sequence

from sculpt.common import atomic_write_bytes, to_plain_json
from sculpt.ir.model import Model


def candidates_json(result, metric, meter, max_drop: float) -> dict:
    from sculpt.optimizer.search import knob_rows

    return {"metric": {"name": metric.name, "kind": metric.kind, "higher_is_better": metric.higher_is_better,
                       "describe": metric.describe(), "max_drop": max_drop},
            "runtime": meter.describe(), "seconds": round(result.seconds, 1),
            "nothing_helped": result.nothing_helped, "out_of_time": result.interrupted_by_budget,
            "input": result.input.as_dict(), "chosen": result.chosen.as_dict(), "passes": result.passes,
            "knobs": [k.as_dict() for k in result.space], "sensitivity": knob_rows(result.space, result.candidates),
            "decisions": [d.as_dict() for d in result.decisions],
            "candidates": [c.as_dict() for c in result.candidates]}


CSV_FIELDS = ("stage", "plan", "metric", "drop", "latency_ms", "latency_ratio", "macs", "params", "bytes", "seconds",
              "failed", "cached")


def candidates_csv(candidates) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_FIELDS)
    for c in candidates:
        d = c.as_dict()
        writer.writerow([json.dumps(d["plan"], sort_keys=True) if k == "plan" else
                         ("" if d[k] is None else d[k]) for k in CSV_FIELDS])
    return out.getvalue()


def layer_times_ms(model: Model, feeds: Mapping, *, runs: int = 30, threads: int = 1) -> dict[str, float]:
    """Per node (onnxruntime's names, after its own fusions): the 20% quantile over ``runs`` of the
    profiled kernel time (ms), the estimate the latency meter uses (other processes only add time)."""
    import tempfile

    from sculpt.optimizer.latency import low_quantile

    from sculpt.runtime import make_session

    with tempfile.TemporaryDirectory(prefix="sculpt-profile-") as tmp:
        session = make_session(model, threads=threads, profile_prefix=str(Path(tmp) / "profile"))
        for _ in range(runs + 2):
            session.run(None, dict(feeds))
        path = session.end_profiling()
        events = json.loads(Path(path).read_text())
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        per_node.setdefault(name, []).append(float(e.get("dur", 0)) / 1e3)
    return {name: low_quantile(v[2:] if len(v) > 2 else v) for name, v in per_node.items()}


def layer_rows(before: Mapping[str, float], after: Mapping[str, float], top: int = 20) -> list[tuple]:
    """The input model's ``top`` slowest layers with the chosen model's time for each: the node of the same
    name, plus the nodes a pass derived from it (names starting with it: factors, QDQ fusions)."""
    rows = []
    names = sorted(before, key=lambda n: -before[n])[:top]
    for name in names:
        derived = sum(v for n, v in after.items() if n == name or n.startswith(name + "_") or n.startswith(name + "/"))
        rows.append((name, before[name], derived))
    return rows


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(result, metric, max_drop: float, layer_rows: Sequence[tuple]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    measured = [c for c in result.candidates if c.failed is None and c.drop is not None and c.latency_ms is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"sensitivity": ("#9aa5b1", "o", "one knob alone"), "combination": ("#1f77b4", "s", "combination"),
              "combination recovered": ("#2ca02c", "s", "combination, distilled"),
              "back-off": ("#ff7f0e", "D", "back-off"), "back-off recovered": ("#d62728", "D", "back-off, distilled"),
              "refinement": ("#9467bd", "v", "refinement"), "refinement recovered": ("#8c564b", "v", "refinement, distilled")}
    for stage, (color, marker, label) in styles.items():
        pts = [c for c in measured if c.stage == stage]
        if pts:
            ax.scatter([c.latency_ms for c in pts], [c.drop for c in pts], c=color, marker=marker, s=22, label=label,
                       alpha=0.85)
    front, best_drop = [], float("inf")
    for c in sorted(measured + [result.input], key=lambda c: (c.latency_ms, c.drop)):
        if c.drop < best_drop:
            front.append(c)
            best_drop = c.drop
    ax.step([c.latency_ms for c in front], [c.drop for c in front], where="post", color="#444", lw=1,
            label="Pareto front")
    ax.scatter([result.input.latency_ms], [0.0], c="k", marker="^", s=60, label="input model")
    if not result.nothing_helped:
        ax.scatter([result.chosen.latency_ms], [result.chosen.drop], marker="*", s=220, c="#e377c2",
                   edgecolors="k", label="chosen", zorder=5)
    ax.axhline(max_drop, color="#d62728", ls="--", lw=1, label=f"budget ({max_drop:g})")
    ax.set_xlabel(f"latency (ms), {result_runtime_words(result)}")
    ax.set_ylabel(f"drop of {metric.name}")
    ax.set_title("Every measured candidate")
    ax.legend(fontsize=7, loc="best")
    plots["pareto"] = _png(fig)

    from sculpt.optimizer.search import knob_rows

    rows = [r for r in knob_rows(result.space, result.candidates) if r["failed"] is None and r["drop"] is not None]
    if rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, max(2.5, 0.22 * len(rows) + 1)), sharey=True)
        labels = [f"{r['knob']} @ {r['level']:g}" for r in rows]
        y = list(range(len(rows)))
        a1.barh(y, [r["drop"] for r in rows], color="#d62728")
        a1.axvline(max_drop, color="k", ls="--", lw=0.8)
        a1.set_yticks(y)
        a1.set_yticklabels(labels, fontsize=6)
        a1.set_xlabel(f"drop of {metric.name}")
        a2.barh(y, [r["saved_ms"] or 0.0 for r in rows], color="#1f77b4")
        a2.set_xlabel("latency saved (ms)")
        a1.invert_yaxis()
        fig.suptitle("Sensitivity: each knob alone")
        plots["sensitivity"] = _png(fig)
    if layer_rows:
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * len(layer_rows) + 1)))
        y = list(range(len(layer_rows)))
        ax.barh([v - 0.2 for v in y], [r[1] for r in layer_rows], height=0.4, label="input model", color="#9aa5b1")
        ax.barh([v + 0.2 for v in y], [r[2] for r in layer_rows], height=0.4, label="chosen model", color="#1f77b4")
        ax.set_yticks(y)
        ax.set_yticklabels([r[0] for r in layer_rows], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("onnxruntime kernel time (ms, profiler, 20% quantile of 30 runs)")
        ax.legend(fontsize=7)
        ax.set_title("Per layer: the input model's slowest, before and after")
        plots["layers"] = _png(fig)
    return plots


def result_runtime_words(result) -> str:
    return getattr(result, "runtime_words", "")


def report_html(result, metric, meter, max_drop: float, *, layer_rows: Sequence[tuple] = (),
                title: str = "sculpt optimize") -> str:
    result.runtime_words = meter.describe()
    plots = _plots(result, metric, max_drop, layer_rows)
    esc = html.escape
    chosen, base = result.chosen, result.input
    summary = [("metric", metric.describe()), ("budget", f"drop ≤ {max_drop:g}"),
               ("runtime", meter.describe()),
               ("input model", f"{metric.name} {base.metric:.4g}, {base.latency_ms:.3f} ms, {base.macs:,} MACs, "
                               f"{base.bytes:,} bytes"),
               ("chosen model", "the input model (nothing helped)" if result.nothing_helped else
                f"{metric.name} {chosen.metric:.4g} (drop {chosen.drop:.4g}), {chosen.latency_ms:.3f} ms "
                f"({chosen.latency_ratio:.3f}×), {chosen.macs:,} MACs, {chosen.bytes:,} bytes"),
               ("candidates", f"{len(result.candidates)} evaluated in {result.seconds:.0f} s"
                              + (" (the time budget ran out)" if result.interrupted_by_budget else ""))]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
             "text-align:left}img{max-width:100%;display:block;margin:1em 0}</style></head><body>",
             f"<h1>{esc(title)}</h1><table>"]
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary]
    parts.append("</table>")
    captions = {"pareto": "Accuracy against latency: every candidate measured, the Pareto front and the choice",
                "sensitivity": "Per-knob sensitivity: the drop and the time saved by each knob alone",
                "layers": "Per-layer latency before and after (onnxruntime profiler)"}
    for key, caption in captions.items():
        if key in plots:
            parts.append(f"<h2>{esc(caption)}</h2><img class='plot' alt='{esc(caption)}' "
                         f"src='data:image/png;base64,{plots[key]}'>")
    parts.append("<h2>Decisions</h2><table><tr><th>#</th><th>decision</th><th>reason</th></tr>")
    parts += [f"<tr><td>{i}</td><td>{esc(d.what)}</td><td>{esc(d.why)}</td></tr>"
              for i, d in enumerate(result.decisions, 1)]
    parts.append("</table>")
    if result.passes:
        parts.append("<h2>Pipeline</h2><pre>" + esc(json.dumps(to_plain_json(result.passes), indent=1)) + "</pre>")
    parts.append("<h2>Candidates</h2><table><tr>" + "".join(f"<th>{esc(f)}</th>" for f in
                                                           ("stage", "plan", "metric", "drop", "ms", "ratio", "MACs"))
                 + "</tr>")
    for c in result.candidates:
        cells = [c.stage, json.dumps(c.plan, sort_keys=True),
                 "" if c.metric is None else f"{c.metric:.4g}", "" if c.drop is None else f"{c.drop:.4g}",
                 "" if c.latency_ms is None else f"{c.latency_ms:.3f}",
                 "" if c.latency_ratio is None else f"{c.latency_ratio:.3f}",
                 c.failed or ("" if c.macs is None else f"{c.macs:,}")]
        parts.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in cells) + "</tr>")
    parts.append("</table>")
    # the page counts its decoded plots (a browser test reads it back from the rendered DOM)
    parts.append("<p id='plots-status'>plots: not rendered</p><script>window.addEventListener('load',()=>{"
                 "const ok=[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;"
                 "document.getElementById('plots-status').textContent='plots rendered: '+ok+' of '"
                 "+document.images.length;});</script>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
