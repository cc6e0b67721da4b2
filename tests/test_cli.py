"""The `sculpt` command end to end: inspect, run, passes, compare, demo.

Most cases call ``sculpt.cli.main([...])`` in-process (fast); a few start the real command
(``sculpt``, ``python -m sculpt``, ``python -m sculpt.cli``) to check the entry points. They run on
the built-in example model (``sculpt.examples.tiny_convnet``); the model cases run on the real
PP-OCR models too when the optional rapidocr-onnxruntime wheel is installed, and those (with the
demo's PP-OCR half) are skipped one by one without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sculpt.cli import main
from markers import needs_ppocr
from sculpt.examples import tiny_convnet
from sculpt.models import PPOCR_SHAPES
from sculpt.passes.base import registered_passes


# model -> (input name, the static shape used here)
INPUTS = {"tiny": ("input", [1, 3, 32, 32]), **{kind: ("x", shape) for kind, shape in PPOCR_SHAPES.items()}}
KINDS = ["tiny", *[pytest.param(kind, marks=needs_ppocr) for kind in ("det", "rec", "cls")]]
RTOL = 1e-4  # canonicalize is exact: outputs equal within 1e-4 of each output's largest magnitude


def shape_arg(kind: str) -> str:
    name, shape = INPUTS[kind]
    return f"{name}=" + ",".join(map(str, shape))


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(capsys, *args):
    """Run ``sculpt ARGS`` in-process; returns (exit status, stdout, stderr)."""
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_no_traceback(text: str):
    assert "Traceback" not in text, text


def image_like(shape, seed: int) -> np.ndarray:
    """Uniform [0, 1) pixels normalised with mean 0.5 and std 0.5, like PP-OCR's preprocessing."""
    rng = np.random.default_rng(seed)
    return ((rng.random(shape, dtype=np.float32) - 0.5) / 0.5).astype(np.float32)


def text_image(shape, seed: int = 0) -> np.ndarray:
    """A white image with dark text lines, normalised like image_like (a det input whose probability
    map is not saturated: on noise the DB head outputs ~1e-4 everywhere)."""
    from PIL import Image, ImageDraw

    _, _, h, w = shape
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(["sculpt 0.1 compiles", "PP-OCR text 12345", "model compression"]):
        draw.text((10 + 5 * k, 20 + k * (h // 4)), line, fill=tuple(int(v) for v in rng.integers(0, 80, 3)))
    img = img.resize((w, h))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32).copy()


def session(path, optimize: bool = False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:  # no onnxruntime fusions: compare the graphs as written
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


class _Models(dict):
    """kind -> a private copy of the model file, made when first asked for: 'tiny' (the example
    model), 'tiny-other' (another example model, 7 classes) and the PP-OCR 'det', 'rec', 'cls'."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, kind: str) -> Path:
        dst = self.root / f"{kind}.onnx"
        if kind == "tiny":
            tiny_convnet().save(dst)
        elif kind == "tiny-other":
            tiny_convnet(seed=1, classes=7).save(dst)
        else:
            from sculpt.models import ppocr_model_path

            shutil.copyfile(ppocr_model_path(kind), dst)
        self[kind] = dst
        return dst


@pytest.fixture(scope="module")
def model_copies(tmp_path_factory):
    """The models copied into a private folder (so tests can hash and never touch the installed files)."""
    return _Models(tmp_path_factory.mktemp("models"))


class _Canonical(dict):
    """kind -> `sculpt run MODEL --pass canonicalize` with --report and --dump-dir, run when first asked
    for: (rc, stdout, stderr, out_path, report_path, dump_dir, hash_before, hash_after)."""

    def __init__(self, models: _Models, root: Path):
        super().__init__()
        self.models, self.root = models, root

    def __missing__(self, kind: str):
        import contextlib
        import io

        src = self.models[kind]
        before = sha256(src)
        out, report, dump = self.root / f"{kind}.canonical.onnx", self.root / f"{kind}.json", self.root / f"{kind}.dump"
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            rc = main(["run", str(src), "--pass", "canonicalize", "--input-shape", shape_arg(kind), "-o", str(out),
                       "--report", str(report), "--dump-dir", str(dump)])
        self[kind] = (rc, so.getvalue(), se.getvalue(), out, report, dump, before, sha256(src))
        return self[kind]


@pytest.fixture(scope="module")
def canonical(model_copies, tmp_path_factory):
    return _Canonical(model_copies, tmp_path_factory.mktemp("canonical"))


# ------------------------------------------------------------------ passes
def test_passes_table(capsys):
    rc, out, err = cli(capsys, "passes")
    assert rc == 0 and not err
    for name, cls in registered_passes().items():
        assert name in out
        for opt in cls.options():
            assert opt.name in out


def test_passes_json(capsys):
    rc, out, err = cli(capsys, "passes", "--json")
    assert rc == 0 and not err
    data = json.loads(out)
    passes = registered_passes()
    assert set(data) == set(passes)
    assert "canonicalize" in data and "constant-folding" in data
    for name, cls in passes.items():
        entry = data[name]
        assert entry["exact"] == cls.exact
        assert isinstance(entry["doc"], str) and entry["doc"]
        assert [o["name"] for o in entry["options"]] == [o.name for o in cls.options()]
        for o, spec in zip(entry["options"], cls.options()):
            assert o["type"] == spec.type_name()
            assert o["default"] == json.loads(json.dumps(spec.default, default=str))
    opts = {o["name"]: o for o in data["constant-folding"]["options"]}
    assert opts["max_tensor_mb"]["type"] == "float"
    opts = {o["name"]: o for o in data["canonicalize"]["options"]}
    assert opts["max_rounds"]["type"] == "int" and isinstance(opts["max_rounds"]["default"], int)


# ------------------------------------------------------------------ inspect
def _independent_params(path) -> int:
    """Floating-point weights read by some node: initializers and Constant nodes (PP-OCR keeps its
    weights in Constant nodes)."""
    m = onnx.load(str(path))
    used = {i for n in m.graph.node for i in n.input}
    total = sum(int(np.prod(t.dims)) for t in m.graph.initializer
                if t.name in used and onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f")
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output[0] in used:
            for a in n.attribute:
                if a.name == "value" and onnx.helper.tensor_dtype_to_np_dtype(a.t.data_type).kind == "f":
                    total += int(np.prod(a.t.dims))
    return total


def _independent_conv_macs(path, name, shape) -> int:
    """Conv MACs from the output shapes onnxruntime actually produces at a fixed input shape."""
    m = onnx.load(str(path))
    consts = {n.output[0]: list(a.t.dims) for n in m.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "value"}
    consts.update({t.name: list(t.dims) for t in m.graph.initializer})
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    for n in convs:
        m.graph.output.append(onnx.ValueInfoProto(name=n.output[0]))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = sess.run([n.output[0] for n in convs], {name: np.zeros(shape, np.float32)})
    return sum(int(v.size) * int(np.prod(consts[n.input[1]][1:])) for n, v in zip(convs, values))


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_json(capsys, model_copies, kind):
    path = model_copies[kind]
    before = sha256(path)
    rc, out, err = cli(capsys, "inspect", path, "--input-shape", shape_arg(kind), "--json")
    assert rc == 0 and not err
    data = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert isinstance(data, dict)
    totals = data["totals"]
    for key in ("params", "macs", "weight_bytes", "model_bytes", "nodes"):
        assert isinstance(totals[key], int) and totals[key] > 0, key
    assert totals["params"] == _independent_params(path)
    assert totals["weight_bytes"] == 4 * totals["params"]  # float32 weights
    assert totals["model_bytes"] == path.stat().st_size
    layers = data["layers"]
    assert len(layers) == totals["nodes"]
    assert {"name", "op_type", "params", "macs", "weight_bytes", "output_shape"} <= set(layers[0])
    names = [l["name"] for l in layers]
    assert len(set(names)) == len(names) and all(names)
    unknown = [l["name"] for l in layers if l["op_type"] == "Conv" and l["macs"] is None]
    assert not unknown, f"Conv MACs not counted at a static input shape: {unknown[:3]}"
    conv_macs = sum(l["macs"] for l in layers if l["op_type"] == "Conv")
    name, shape = INPUTS[kind]
    assert conv_macs == _independent_conv_macs(path, name, shape)
    assert totals["macs"] >= conv_macs
    assert data["inputs"] == {name: shape}
    assert sha256(path) == before


@pytest.mark.parametrize("kind", ["tiny", pytest.param("cls", marks=needs_ppocr)])
def test_inspect_without_shape_is_dynamic(capsys, model_copies, kind):
    name, _ = INPUTS[kind]
    rc, out, err = cli(capsys, "inspect", model_copies[kind], "--json")
    assert rc == 0 and not err
    data = json.loads(out)
    assert data["totals"]["params"] == _independent_params(model_copies[kind])
    batch = data["inputs"][name][0]
    assert data["inputs"][name][1] == 3 and not (isinstance(batch, int) and batch > 0)  # 'N', or -1 in PP-OCR's
    # the table says how to get the MACs
    rc, out, err = cli(capsys, "inspect", model_copies[kind])
    assert rc == 0 and f"--input-shape {name}=" in out


@pytest.mark.parametrize("kind", ["tiny", pytest.param("det", marks=needs_ppocr)])
def test_inspect_table(capsys, model_copies, kind):
    name, shape = INPUTS[kind]
    rc, out, err = cli(capsys, "inspect", model_copies[kind], "--input-shape", shape_arg(kind))
    assert rc == 0 and not err
    assert "total:" in out and "params" in out and "MACs" in out
    assert "Conv" in out and f"{name}={shape}" in out
    rc, top, _ = cli(capsys, "inspect", model_copies[kind], "--input-shape", shape_arg(kind), "--top", "3")
    assert rc == 0 and len(top.splitlines()) < len(out.splitlines())
    # unnamed shape for a single-input model
    rc, out2, _ = cli(capsys, "inspect", model_copies[kind], "--input-shape", ",".join(map(str, shape)), "--json")
    assert rc == 0 and json.loads(out2)["inputs"] == {name: shape}


# ------------------------------------------------------------------ run --pass canonicalize
@pytest.mark.parametrize("kind", KINDS)
def test_run_canonicalize(canonical, model_copies, kind):
    rc, out, err, path, report_path, dump, before, after = canonical[kind]
    assert rc == 0, err
    assert_no_traceback(out + err)
    assert before == after, "the input model was modified"
    # progress on stderr, the summary on stdout
    assert "[1/1] canonicalize" in err
    for word in ("params", "MACs", "file size", "before", "after", "max error"):
        assert word in out, word
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    name, shape = INPUTS[kind]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == shape
    # numerically the same model
    ref, got = session(model_copies[kind]), session(path)
    inputs = [image_like(shape, seed) for seed in range(2)]
    if kind == "det":
        # DB's sigmoid map is saturated (max ~1e-4) on noise, where the relative error is float
        # rounding amplified; a text image gives a real probability map
        inputs = [text_image(shape)]
    for x in inputs:
        for a, b in zip(ref.run(None, {name: x}), got.run(None, {name: x})):
            assert rel_error(b, a) <= RTOL, (kind, rel_error(b, a))
    # fewer nodes, no more parameters
    rep = json.loads(report_path.read_text())
    assert rep["after"]["nodes"] < rep["before"]["nodes"]
    assert rep["after"]["params"] <= rep["before"]["params"]


@needs_ppocr
def test_run_canonicalize_det_on_noise_matches_onnxruntime_own_fusion(canonical, model_copies):
    """On noise images the det map is ~1e-4 everywhere: relative error is then dominated by float
    rounding. sculpt's result must be no worse than onnxruntime's own graph optimisation of the
    original (the rounding floor), and within 1e-4 of the map's full scale (probability 1)."""
    rc, _, err, path, *_ = canonical["det"]
    assert rc == 0, err
    plain, fused, got = session(model_copies["det"]), session(model_copies["det"], True), session(path)
    for seed in range(2):
        x = image_like(PPOCR_SHAPES["det"], seed)
        a = plain.run(None, {"x": x})[0].astype(np.float64)
        floor = rel_error(fused.run(None, {"x": x})[0], a)
        b = got.run(None, {"x": x})[0]
        assert rel_error(b, a) <= max(RTOL, 2 * floor)
        assert np.abs(b - a).max() <= RTOL * 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_run_report_and_dump(canonical, kind):
    rc, out, err, path, report_path, dump, *_ = canonical[kind]
    assert rc == 0, err
    rep = json.loads(report_path.read_text())  # strict JSON
    assert rep["output"] == str(path)
    assert len(rep["passes"]) == 1
    rec = rep["passes"][0]
    for key in ("index", "name", "exact", "modified", "seconds", "stats", "cost_before", "cost_after", "dump",
                "options"):
        assert key in rec, key
    assert rec["index"] == 1 and rec["name"] == "canonicalize" and rec["exact"] is True and rec["modified"]
    assert rec["options"]["max_rounds"] == 4
    for side in ("before", "after"):
        assert {"params", "macs", "weight_bytes", "model_bytes", "nodes"} <= set(rep[side])
    assert rep["error"]["samples"] >= 1 and rep["error"]["max_rel"] < 1e-2
    dumps = sorted(p.name for p in dump.iterdir())
    assert dumps == ["001_canonicalize.onnx"]
    assert rec["dump"] == str(dump / "001_canonicalize.onnx")
    assert (dump / "001_canonicalize.onnx").read_bytes() == path.read_bytes()
    # no temporary files beside the outputs
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_run_output_files_are_not_private(tmp_path, capsys, model_copies):
    """Outputs get the usual permissions (umask), not mkstemp's 0600."""
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, _, err = cli(capsys, "run", model_copies["tiny"], "--pass", "remove-identity", "--input-shape",
                     shape_arg("tiny"), "-o", out, "--report", report)
    assert rc == 0, err
    mask = os.umask(0)
    os.umask(mask)
    for p in (out, report):
        assert (p.stat().st_mode & 0o777) == (0o666 & ~mask), p


# ------------------------------------------------------------------ pipelines, options, calibration
PIPELINE = {
    "input_shapes": {"input": [1, 3, 32, 32]},
    "verify_each": True,
    "seed": 3,
    "passes": ["remove-identity", {"constant-folding": {"max_tensor_mb": 64}},
               {"canonicalize": {"max_rounds": 2}}, "fold-batchnorm"],
}


def _check_pipeline_result(tmp_path, out, report, dump):
    rep = json.loads(report.read_text())
    names = [r["name"] for r in rep["passes"]]
    assert names == ["remove-identity", "constant-folding", "canonicalize", "fold-batchnorm"]
    assert [r["index"] for r in rep["passes"]] == [1, 2, 3, 4]
    assert rep["passes"][1]["options"]["max_tensor_mb"] == 64.0
    assert rep["passes"][2]["options"]["max_rounds"] == 2
    # verify_each: true in the file is honoured: every modified pass has a measured error
    for r in rep["passes"]:
        assert r["error"] is not None, r["name"]
        if r["modified"]:
            assert r["error"]["max_rel"] <= 1e-5
    expected = ["001_remove-identity.onnx", "002_constant-folding.onnx", "003_canonicalize.onnx",
                "004_fold-batchnorm.onnx"]
    assert sorted(p.name for p in dump.iterdir()) == expected
    for name in expected:
        onnx.checker.check_model(onnx.load(str(dump / name)), full_check=True)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_run_yaml_pipeline(tmp_path, capsys, model_copies):
    import yaml

    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    out, report, dump = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "dump"
    rc, stdout, err = cli(capsys, "run", model_copies["tiny"], "--pipeline", pipe, "-o", out, "--report", report,
                          "--dump-dir", dump)
    assert rc == 0, err
    for k in range(1, 5):
        assert f"[{k}/4]" in err
    _check_pipeline_result(tmp_path, out, report, dump)


def test_run_json_pipeline(tmp_path, capsys, model_copies):
    pipe = tmp_path / "pipe.json"
    pipe.write_text(json.dumps(PIPELINE))
    out, report, dump = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "deep" / "er" / "dump"
    rc, stdout, err = cli(capsys, "run", model_copies["tiny"], "--pipeline", pipe, "-o", out, "--report", report,
                          "--dump-dir", dump)
    assert rc == 0, err
    _check_pipeline_result(tmp_path, out, report, dump)


def test_run_cli_shape_overrides_pipeline_shape(tmp_path, capsys, model_copies):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text("input_shapes: {input: [1, 3, 32, 32]}\npasses: [remove-identity]\n")
    out = tmp_path / "o.onnx"
    rc, _, err = cli(capsys, "run", model_copies["tiny"], "--pipeline", pipe, "--input-shape", "input=2,3,32,32",
                     "-o", out)
    assert rc == 0, err
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 32, 32]


def test_run_pass_options(tmp_path, capsys, model_copies):
    out, report, dump = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "dump"
    rc, stdout, err = cli(capsys, "run", model_copies["tiny"], "--pass", "constant-folding:max_tensor_mb=64",
                          "--pass", "canonicalize:max_rounds=2,fold_affine=false", "--input-shape", shape_arg("tiny"),
                          "-o", out, "--report", report, "--dump-dir", dump, "--verify-each")
    assert rc == 0, err
    rep = json.loads(report.read_text())
    assert rep["passes"][0]["options"]["max_tensor_mb"] == 64.0
    assert rep["passes"][1]["options"]["max_rounds"] == 2
    assert rep["passes"][1]["options"]["fold_affine"] is False
    assert all(r["error"] is not None for r in rep["passes"])  # --verify-each
    assert sorted(p.name for p in dump.iterdir()) == ["001_constant-folding.onnx", "002_canonicalize.onnx"]


def _calibration(tmp_path, kind):
    """Calibration data for the example model: (source, samples the run measures with: the held-out
    quarter, at least one)."""
    name, shape = INPUTS["tiny"]
    if kind == "npz":
        path = tmp_path / "cal.npz"
        np.savez(path, **{name: np.concatenate([image_like(shape, s) for s in range(3)])})
        return str(path), 1
    if kind == "images":
        from PIL import Image

        folder = tmp_path / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (60, 200, 3), dtype=np.uint8)).save(folder / f"img{k}.png")
        (folder / "notes.txt").write_text("not an image: ignored")
        return str(folder), 1
    return "random:8", 2


@pytest.mark.parametrize("kind", ["npz", "images", "random"])
def test_run_calibration(tmp_path, capsys, model_copies, kind):
    source, samples = _calibration(tmp_path, kind)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, stdout, err = cli(capsys, "run", model_copies["tiny"], "--pass", "canonicalize", "--input-shape",
                          shape_arg("tiny"), "--calibration", source, "--verify-each", "-o", out, "--report", report)
    assert rc == 0, err
    rep = json.loads(report.read_text())
    assert rep["error"]["samples"] == samples
    assert rep["error"]["max_rel"] <= RTOL
    assert rep["passes"][0]["error"]["max_rel"] <= 1e-5
    assert f"on {samples} held-out sample(s)" in stdout


def test_run_calibration_in_pipeline_file(tmp_path, capsys, model_copies):
    source, _ = _calibration(tmp_path, "images")
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"input_shapes: {{input: [1, 3, 32, 32]}}\ncalibration: {{source: '{source}', count: 2, "
                    f"mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}\npasses: [canonicalize]\n")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, _, err = cli(capsys, "run", model_copies["tiny"], "--pipeline", pipe, "-o", out, "--report", report,
                     "--compare-samples", "5")
    assert rc == 0, err
    assert json.loads(report.read_text())["error"]["samples"] == 1  # count: 2, one held out


# ------------------------------------------------------------------ compare
@pytest.fixture(scope="module")
def pair(model_copies, tmp_path_factory):
    """The example model canonicalized, and a copy with one weight changed."""
    root = tmp_path_factory.mktemp("compare")
    good, bad = root / "good.onnx", root / "bad.onnx"
    assert main(["run", str(model_copies["tiny"]), "--pass", "canonicalize", "--input-shape", shape_arg("tiny"),
                 "-o", str(good)]) == 0
    m = onnx.load(str(good))
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 4 and a.size > 100:
            t.CopyFrom(numpy_helper.from_array((a * 1.5).astype(a.dtype), t.name))
            break
    onnx.save(m, str(bad))
    return model_copies["tiny"], good, bad


def test_compare_equal(capsys, pair):
    orig, good, _ = pair
    rc, out, err = cli(capsys, "compare", orig, good, "--input-shape", shape_arg("tiny"))
    assert rc == 0, err
    assert "max abs" in out and not err
    # the candidate has static shapes: no --input-shape needed
    rc, out, err = cli(capsys, "compare", orig, good)
    assert rc == 0, err
    rc, out, err = cli(capsys, "compare", good, good, "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["equal"] is True and data["max_abs"] == 0.0 and data["samples"] == 2


def test_compare_differs(capsys, pair):
    orig, good, bad = pair
    rc, out, err = cli(capsys, "compare", good, bad)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and "differ" in err
    rc, out, err = cli(capsys, "compare", orig, bad, "--input-shape", shape_arg("tiny"), "--json")
    assert rc == 1
    data = json.loads(out)
    assert data["equal"] is False and data["max_rel"] > 1e-3
    # a loose enough tolerance accepts it
    rc, _, _ = cli(capsys, "compare", good, bad, "--rtol", "10")
    assert rc == 0


def test_compare_with_calibration(tmp_path, capsys, pair):
    orig, good, bad = pair
    source, _ = _calibration(tmp_path, "npz")
    rc, out, err = cli(capsys, "compare", orig, good, "--input-shape", shape_arg("tiny"), "--calibration", source,
                       "--held-out", "3", "--json")
    assert rc == 0, err
    assert json.loads(out)["samples"] == 3


def test_compare_different_models(capsys, model_copies, pair):
    _, good, _ = pair
    rc, out, err = cli(capsys, "compare", model_copies["tiny-other"], good, "--input-shape", shape_arg("tiny"))
    assert rc == 1  # different outputs entirely: a mismatch, not a crash
    assert_no_traceback(err)


# ------------------------------------------------------------------ demo
def test_demo_without_ppocr(tmp_path, capsys, monkeypatch):
    """Without the PP-OCR models the demo says so and compresses the built-in model alone."""
    import sculpt.models
    from sculpt.errors import SculptError

    def unavailable(kind):
        raise SculptError("the PP-OCR models come from the 'rapidocr-onnxruntime' package")

    monkeypatch.setattr(sculpt.models, "ppocr_model", unavailable)
    rc, out, err = cli(capsys, "demo", "-o", tmp_path / "demo")
    assert rc == 0, err
    assert "skipping the PP-OCR classifier" in out and "tiny_convnet" in out and "max rel. output error" in out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["tiny_convnet.sculpt.onnx"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "demo" / "tiny_convnet.sculpt.onnx")), full_check=True)


@needs_ppocr
def test_demo(tmp_path, capsys):
    rc, out, err = cli(capsys, "demo", "-o", tmp_path / "demo")
    assert rc == 0, err
    assert "tiny_convnet" in out and "PP-OCR" in out and "->" in out
    for col in ("params", "MACs", "file size", "onnxruntime ms", "accuracy", "channel-pruning"):
        assert col in out
    # the orientation accuracy after pruning is printed and stays high (measured 98% at 30% fewer MACs)
    import re

    accs = re.findall(r"(\d+\.\d)% -> (\d+\.\d)% \(orientation", out)
    assert accs and float(accs[0][1]) >= 90.0, out
    files = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert len(files) == 2 and all(f.endswith(".onnx") for f in files)
    from sculpt.ir.cost import cost_of
    from sculpt.ir.model import Model

    for f in files:
        onnx.checker.check_model(onnx.load(str(tmp_path / "demo" / f)), full_check=True)
    from sculpt.models import ppocr_model_path

    pruned = Model.load(tmp_path / "demo" / "ppocr_cls.sculpt.onnx")
    original = Model.load(ppocr_model_path("cls")).fix_input_shapes({"x": [1, 3, 48, 192]})
    assert cost_of(pruned).macs < 0.8 * cost_of(original).macs


# ------------------------------------------------------------------ the real command
def _env():
    env = dict(os.environ)
    env.pop("SCULPT_DEBUG", None)
    return env


def test_entry_points(tmp_path):
    exe = shutil.which("sculpt")
    commands = [[sys.executable, "-m", "sculpt"], [sys.executable, "-m", "sculpt.cli"]]
    if exe:
        commands.append([exe])
    for cmd in commands:
        p = subprocess.run(cmd + ["passes", "--json"], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                           timeout=120)
        assert p.returncode == 0, (cmd, p.stderr)
        assert "canonicalize" in json.loads(p.stdout)
    p = subprocess.run([sys.executable, "-m", "sculpt", "--version"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert p.returncode == 0 and "sculpt" in p.stdout


def test_subprocess_run_and_inspect(tmp_path, model_copies):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "sculpt", "run", str(model_copies["tiny"]), "--pass", "canonicalize",
                        "--input-shape", shape_arg("tiny"), "-o", str(out), "--report", str(report)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "canonicalize" in p.stderr and "max error" in p.stdout
    json.loads(report.read_text())
    p = subprocess.run([sys.executable, "-m", "sculpt", "inspect", str(out), "--json"], capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["inputs"] == {"input": INPUTS["tiny"][1]}
