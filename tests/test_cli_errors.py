"""Bad input to the `sculpt` command: one line on stderr naming what is wrong, exit status 2, no
traceback, nothing written (no -o file, report, dump folder or stray temporary file), and the input
model never modified.

Every case runs in a fresh folder laid out as::

    in/   model.onnx (the built-in example CNN, input 'input' [N, 3, 32, 32]) and the other inputs
          of the case
    out/  empty; the case's -o, --report and --dump-dir point here

and must leave ``out/`` empty and every file of ``in/`` byte-identical. The few cases on the real
PP-OCR files (truncated large models) need the rapidocr-onnxruntime wheel and are skipped, one by
one, without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sculpt.cli import main
from markers import needs_ppocr
from sculpt.examples import tiny_convnet

SHAPE = "input=1,3,32,32"


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def model_bytes():
    """The example model; PP-OCR's det and rec are read only by the cases that need them."""
    return tiny_convnet().proto.SerializeToString()


def ppocr_bytes(kind: str) -> bytes:
    from sculpt.models import ppocr_model_path

    return ppocr_model_path(kind).read_bytes()


@pytest.fixture
def work(tmp_path, monkeypatch, model_bytes):
    """A fresh folder with in/ (inputs) and out/ (empty), as the current directory."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "model.onnx").write_bytes(model_bytes)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(capsys, args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_user_error(rc, out, err, *names, status=2):
    assert rc == status, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sculpt: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert not out.strip(), out


def assert_nothing_written(work: Path, before: dict[str, str]):
    assert _hashes(work / "in") == before, "an input file was modified"
    assert list((work / "out").iterdir()) == [], list((work / "out").iterdir())
    # nothing beside in/ and out/ either (no temp files in the current folder)
    assert sorted(p.name for p in work.iterdir()) == ["in", "out"]


# ------------------------------------------------------------------ the cases
@dataclass
class Case:
    id: str
    args: list  # after "sculpt"
    names: tuple  # what the one error line must mention
    setup: str | None = None  # name of a setup function below
    ppocr: bool = False  # needs the PP-OCR models (rapidocr-onnxruntime)


def run_args(model="in/model.onnx", passes=("canonicalize",), shapes=(SHAPE,), out="out/o.onnx", extra=()):
    args = ["run", model]
    for p in passes:
        args += ["--pass", p]
    for s in shapes:
        args += ["--input-shape", s]
    args += ["-o", out, "--report", "out/report.json", "--dump-dir", "out/dump"]
    return args + list(extra)


def _write(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data if isinstance(data, bytes) else data.encode())


def setup_bad_files(work, model_bytes):
    for name, fraction in (("quarter", 0.25), ("half", 0.5), ("three_quarters", 0.75)):
        _write(f"in/{name}.onnx", model_bytes[: int(len(model_bytes) * fraction)])
    _write("in/notes.onnx", "this is a text file, not a model\n")
    _write("in/noise.onnx", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _write("in/empty.onnx", b"")
    (work / "in" / "folder.onnx").mkdir()


def setup_ppocr_files(work, model_bytes):
    for kind in ("det", "rec"):
        data = ppocr_bytes(kind)
        _write(f"in/half_{kind}.onnx", data[: len(data) // 2])


def setup_pipelines(work, model_bytes):
    _write("in/malformed.yaml", "passes: [canonicalize\n  - fold-batchnorm: {\n")
    _write("in/malformed.json", '{"passes": ["canonicalize"], ')
    _write("in/unknown_key.yaml", "passes: [canonicalize]\nshapes: {input: [1, 3, 32, 32]}\n")
    _write("in/unknown_pass.yaml", "passes: [canonicalize, prune-everything]\n")
    _write("in/unknown_option.yaml", "passes:\n  - canonicalize: {max_roundz: 3}\n")
    _write("in/wrong_type.yaml", "passes:\n  - canonicalize: {max_rounds: abc}\n")
    _write("in/no_passes.yaml", "input_shapes: {input: [1, 3, 32, 32]}\npasses: []\n")
    _write("in/a_list.yaml", "- canonicalize\n")
    _write("in/bad_seed.yaml", "seed: abc\npasses: [canonicalize]\n")
    _write("in/bad_shape.yaml", "input_shapes: {input: [1, a, 32, 32]}\npasses: [canonicalize]\n")
    _write("in/zero_shape.yaml", "input_shapes: {input: [0, 3, 32, 32]}\npasses: [canonicalize]\n")
    _write("in/unknown_input.yaml", "input_shapes: {image: [1, 3, 32, 32]}\npasses: [canonicalize]\n")
    _write("in/bad_calibration.yaml", "calibration: {source: in/no_such_images}\npasses: [canonicalize]\n")
    # issue 17: aliases (a few hundred bytes of nested ones expand to gigabytes), keys given twice,
    # numbers that are not finite
    _write("in/reused.yaml", "passes:\n  - &p canonicalize\n  - *p\n")
    _write("in/anchor.yaml", "passes: &p [canonicalize]\n")
    _write("in/duplicate_option.yaml", "passes:\n  - channel-pruning: {ratio: 0.3, ratio: 0.5}\n")
    _write("in/duplicate_option.json", '{"passes": [{"channel-pruning": {"ratio": 0.3, "ratio": 0.5}}]}')
    _write("in/duplicate_spelling.yaml", "passes:\n  - canonicalize: {max-rounds: 2, max_rounds: 3}\n")
    _write("in/duplicate_key.yaml", "passes: [canonicalize]\npasses: [fold-batchnorm]\n")
    _write("in/duplicate_key.json", '{"passes": ["canonicalize"], "passes": ["fold-batchnorm"]}')
    _write("in/nan_option.yaml", "passes:\n  - channel-pruning: {ridge: .nan}\n")
    _write("in/nan_layer_ratio.yaml", "passes:\n  - channel-pruning: {layer_ratios: {conv1: .nan}}\n")
    _write("in/inf_option.json", '{"passes": [{"constant-folding": {"max_tensor_mb": Infinity}}]}')
    _write("in/nan_mean.yaml", "calibration: {source: images, mean: [.nan, 0, 0]}\npasses: [canonicalize]\n")
    (work / "in" / "images").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(work / "in" / "images" / "a.png")


def setup_calibration(work, model_bytes):
    from PIL import Image

    x = np.zeros((2, 3, 32, 32), np.float32)
    buf = work / "in" / "wrong_name.npz"
    np.savez(buf, image=x)
    np.savez(work / "in" / "wrong_shape.npz", input=np.zeros((2, 3, 16, 16), np.float32))
    np.savez(work / "in" / "wrong_dtype.npz", input=x.astype(np.float64))
    _write("in/not_npz.npz", "hello")
    (work / "in" / "no_images").mkdir()
    _write("in/no_images/readme.txt", "no images here")
    (work / "in" / "broken_images").mkdir()
    _write("in/broken_images/a_broken.png", "this is not a PNG")
    Image.fromarray(np.zeros((48, 192, 3), np.uint8)).save(work / "in" / "broken_images" / "b_ok.png")


def setup_links(work, model_bytes):
    os.symlink("model.onnx", work / "in" / "link.onnx")
    os.link(work / "in" / "model.onnx", work / "in" / "hardlink.onnx")


SETUPS = {"links": setup_links, "bad_files": setup_bad_files, "ppocr_files": setup_ppocr_files,
          "pipelines": setup_pipelines, "calibration": setup_calibration}

CASES = [
    # ---- the model file
    Case("missing-file", run_args(model="in/missing.onnx"), ("in/missing.onnx",)),
    Case("truncated-quarter", run_args(model="in/quarter.onnx"), ("in/quarter.onnx",), "bad_files"),
    Case("truncated-half", run_args(model="in/half.onnx"), ("in/half.onnx",), "bad_files"),
    Case("truncated-three-quarters", run_args(model="in/three_quarters.onnx"), ("in/three_quarters.onnx",),
         "bad_files"),
    Case("truncated-ppocr-det", run_args(model="in/half_det.onnx"), ("in/half_det.onnx",), "ppocr_files", True),
    Case("truncated-ppocr-rec", run_args(model="in/half_rec.onnx"), ("in/half_rec.onnx",), "ppocr_files", True),
    Case("text-file", run_args(model="in/notes.onnx"), ("in/notes.onnx",), "bad_files"),
    Case("random-bytes", run_args(model="in/noise.onnx"), ("in/noise.onnx",), "bad_files"),
    Case("empty-file", run_args(model="in/empty.onnx"), ("in/empty.onnx",), "bad_files"),
    Case("directory", run_args(model="in/folder.onnx"), ("in/folder.onnx", "directory"), "bad_files"),
    # ---- passes and their options
    Case("unknown-pass", run_args(passes=("canonicalize", "prune-everything")), ("prune-everything",)),
    Case("unknown-pass-underscore", run_args(passes=("fold_batchnorm",)), ("fold_batchnorm", "fold-batchnorm")),
    Case("unknown-option", run_args(passes=("canonicalize:max_roundz=3",)), ("canonicalize", "max_roundz")),
    Case("wrong-type-int", run_args(passes=("canonicalize:max_rounds=abc",)), ("max_rounds", "abc")),
    Case("wrong-type-float", run_args(passes=("constant-folding:max_tensor_mb=big",)), ("max_tensor_mb", "big")),
    Case("wrong-type-bool", run_args(passes=("canonicalize:fold_batchnorm=maybe",)), ("fold_batchnorm", "maybe")),
    Case("option-not-key-value", run_args(passes=("canonicalize:max_rounds",)), ("max_rounds",)),
    Case("option-given-twice", run_args(passes=("channel-pruning:ratio=0.3,ratio=0.5",)),
         ("channel-pruning", "'ratio'", "twice")),
    Case("option-given-twice-two-spellings", run_args(passes=("canonicalize:max-rounds=2,max_rounds=3",)),
         ("canonicalize", "max_rounds", "twice")),
    *[Case(f"option-{pass_name}-{key}-{value}", run_args(passes=(f"{pass_name}:{key}={value}",)), (pass_name, key))
      for pass_name, key, value in [
          ("channel-pruning", "ridge", "nan"), ("channel-pruning", "ridge", "inf"), ("channel-pruning", "ridge", "0"),
          ("channel-pruning", "ridge", "1e300"), ("channel-pruning", "positions", "0"),
          ("channel-pruning", "positions", "99999999999"), ("sparsify", "ridge", "nan"),
          ("sparsify", "positions", "-1"), ("low-rank", "ridge", "-1e-4"), ("depthwise-separable", "ridge", "nan"),
          ("fire-module", "positions", "0"), ("constant-folding", "max_tensor_mb", "nan"),
          ("constant-folding", "max_tensor_mb", "-1"), ("canonicalize", "max_tensor_mb", "inf"),
          ("canonicalize", "max_rounds", "0"), ("canonicalize", "max_rounds", "100000"),
          ("simplify-shapes", "max_rounds", "-3"), ("dead-channel-elimination", "threshold", "nan"),
          ("low-rank", "compression", "nan"), ("low-rank", "max_error", "nan"), ("qdq", "error_budget", "nan"),
          ("qdq", "bins", "100000000"), ("channel-pruning", "ratio", "nan"),
      ]],
    Case("empty-pass-name", run_args(passes=(":max_rounds=2",)), ("pass",)),
    Case("no-pass", ["run", "in/model.onnx", "--input-shape", SHAPE, "-o", "out/o.onnx"], ("--pass",)),
    Case("pass-and-pipeline", run_args(extra=("--pipeline", "in/no_passes.yaml")), ("--pipeline",), "pipelines"),
    # ---- input shapes
    Case("shape-not-integer", run_args(shapes=("input=1,a,3",)), ("input=1,a,3",)),
    Case("shape-zero", run_args(shapes=("input=0,3",)), ("input=0,3",)),
    Case("shape-negative", run_args(shapes=("input=1,3,-32,32",)), ("input=1,3,-32,32",)),
    Case("shape-empty", run_args(shapes=("input=",)), ("input=",)),
    Case("shape-unknown-input", run_args(shapes=("image=1,3,32,32",)), ("'image'", "input")),
    Case("shape-wrong-rank", run_args(shapes=("input=1,3,32",)), ("'input'", "rank")),
    Case("shape-wrong-rank-unnamed", run_args(shapes=("1,3,32",)), ("'input'", "rank")),
    Case("shape-fixed-dim", run_args(shapes=("input=1,4,32,32",)), ("'input'", "dimension 1")),
    Case("shape-given-twice", run_args(shapes=(SHAPE, "input=1,3,16,16")), ("'input'",)),
    Case("dynamic-without-shape", run_args(shapes=()), ("'input'", "--input-shape")),
    # ---- where the results go
    Case("output-is-input", run_args(out="in/model.onnx"), ("in/model.onnx", "input model")),
    Case("output-is-input-other-spelling", run_args(out="./in/../in/model.onnx"), ("input model",)),
    Case("output-is-symlink-to-input", run_args(out="in/link.onnx"), ("in/link.onnx", "input model"), "links"),
    Case("output-is-hardlink-of-input", run_args(out="in/hardlink.onnx"), ("in/hardlink.onnx", "input model"),
         "links"),
    Case("output-in-missing-folder", run_args(out="out/missing/o.onnx"), ("out/missing",)),
    Case("output-is-a-folder", run_args(out="out"), ("out", "directory")),
    Case("report-is-input", run_args()[:-4] + ["--report", "in/model.onnx"], ("in/model.onnx", "--report")),
    Case("report-in-missing-folder", run_args()[:-4] + ["--report", "out/missing/r.json"], ("out/missing",)),
    Case("report-is-output", run_args()[:-4] + ["--report", "out/o.onnx"], ("out/o.onnx", "--report")),
    Case("dump-dir-is-input", run_args()[:-2] + ["--dump-dir", "in/model.onnx"], ("in/model.onnx", "--dump-dir")),
    Case("output-is-pipeline", ["run", "in/model.onnx", "--pipeline", "in/no_passes.yaml", "-o", "in/no_passes.yaml"],
         ("in/no_passes.yaml", "pipeline"), "pipelines"),
    Case("compare-samples-zero", run_args(extra=("--compare-samples", "0")), ("--compare-samples",)),
    Case("no-output", ["run", "in/model.onnx", "--pass", "canonicalize", "--input-shape", SHAPE], ("-o",)),
    # ---- pipeline files
    Case("pipeline-missing", ["run", "in/model.onnx", "--pipeline", "in/nope.yaml", "-o", "out/o.onnx"],
         ("in/nope.yaml",)),
    *[Case(f"pipeline-{name.replace('_', '-')}-{ext}", ["run", "in/model.onnx", "--pipeline", f"in/{name}.{ext}",
                                                   "--input-shape", SHAPE, "-o", "out/o.onnx", "--report",
                                                   "out/r.json", "--dump-dir", "out/dump"], names, "pipelines")
      for name, ext, names in [
          ("malformed", "yaml", ("in/malformed.yaml",)),
          ("malformed", "json", ("in/malformed.json",)),
          ("unknown_key", "yaml", ("in/unknown_key.yaml", "'shapes'")),
          ("unknown_pass", "yaml", ("in/unknown_pass.yaml", "prune-everything")),
          ("unknown_option", "yaml", ("in/unknown_option.yaml", "max_roundz")),
          ("wrong_type", "yaml", ("in/wrong_type.yaml", "max_rounds", "abc")),
          ("no_passes", "yaml", ("in/no_passes.yaml", "passes")),
          ("a_list", "yaml", ("in/a_list.yaml",)),
          ("bad_seed", "yaml", ("in/bad_seed.yaml", "seed")),
          ("bad_calibration", "yaml", ("in/no_such_images",)),
          ("reused", "yaml", ("in/reused.yaml", "anchors and aliases")),
          ("anchor", "yaml", ("in/anchor.yaml", "anchors and aliases")),
          ("duplicate_option", "yaml", ("in/duplicate_option.yaml", "'ratio'", "twice")),
          ("duplicate_option", "json", ("in/duplicate_option.json", "'ratio'", "twice")),
          ("duplicate_spelling", "yaml", ("in/duplicate_spelling.yaml", "max_rounds", "twice")),
          ("duplicate_key", "yaml", ("in/duplicate_key.yaml", "'passes'", "twice")),
          ("duplicate_key", "json", ("in/duplicate_key.json", "'passes'", "twice")),
          ("nan_option", "yaml", ("in/nan_option.yaml", "ridge")),
          ("nan_layer_ratio", "yaml", ("in/nan_layer_ratio.yaml", "layer_ratios", "finite")),
          ("inf_option", "json", ("in/inf_option.json", "max_tensor_mb")),
          ("nan_mean", "yaml", ("mean", "finite")),
      ]],
    *[Case(f"pipeline-{name.replace('_', '-')}", ["run", "in/model.onnx", "--pipeline", f"in/{name}.yaml",
                                                   "-o", "out/o.onnx"], names, "pipelines")
      for name, names in [("bad_shape", ("in/bad_shape.yaml", "'input'")), ("zero_shape", ("'input'",)), ("unknown_input", ("'image'",))]],
    # ---- calibration data
    Case("calibration-missing-npz", run_args(extra=("--calibration", "in/nope.npz")), ("in/nope.npz",)),
    Case("calibration-missing-folder", run_args(extra=("--calibration", "in/nope")), ("in/nope",)),
    Case("calibration-random-abc", run_args(extra=("--calibration", "random:abc")), ("random:abc",)),
    Case("calibration-random-zero", run_args(extra=("--calibration", "random:0")), ("random:0",)),
    Case("calibration-not-npz", run_args(extra=("--calibration", "in/not_npz.npz")), ("in/not_npz.npz",),
         "calibration"),
    Case("calibration-wrong-name", run_args(extra=("--calibration", "in/wrong_name.npz")), ("image", "input"),
         "calibration"),
    Case("calibration-wrong-shape", run_args(extra=("--calibration", "in/wrong_shape.npz")), ("'input'",),
         "calibration"),
    Case("calibration-wrong-dtype", run_args(extra=("--calibration", "in/wrong_dtype.npz")),
         ("'input'", "float64"), "calibration"),
    Case("calibration-no-images", run_args(extra=("--calibration", "in/no_images")), ("in/no_images",),
         "calibration"),
    Case("calibration-broken-image", run_args(extra=("--calibration", "in/broken_images")), ("a_broken.png",),
         "calibration"),
    # ---- inspect and compare
    Case("inspect-missing", ["inspect", "in/missing.onnx"], ("in/missing.onnx",)),
    Case("inspect-truncated", ["inspect", "in/half.onnx", "--json"], ("in/half.onnx",), "bad_files"),
    Case("inspect-truncated-ppocr", ["inspect", "in/half_det.onnx", "--json"], ("in/half_det.onnx",), "ppocr_files",
         True),
    Case("inspect-bad-shape", ["inspect", "in/model.onnx", "--input-shape", "input=1,a,3"], ("input=1,a,3",)),
    Case("inspect-unknown-input", ["inspect", "in/model.onnx", "--input-shape", "y=1,3,32,32"], ("'y'",)),
    Case("compare-missing", ["compare", "in/model.onnx", "in/missing.onnx"], ("in/missing.onnx",)),
    Case("compare-not-onnx", ["compare", "in/notes.onnx", "in/model.onnx"], ("in/notes.onnx",), "bad_files"),
    Case("compare-dynamic", ["compare", "in/model.onnx", "in/model.onnx"], ("'input'", "--input-shape")),
    Case("compare-rtol-nan", ["compare", "in/model.onnx", "in/model.onnx", "--input-shape", SHAPE, "--rtol", "nan"],
         ("--rtol",)),
    Case("compare-atol-negative", ["compare", "in/model.onnx", "in/model.onnx", "--input-shape", SHAPE, "--atol",
                                   "-1"], ("--atol",)),
    Case("verify-rtol-nan", ["verify", "in/none.so", "--model", "in/model.onnx", "--rtol", "nan"], ("--rtol",)),
    Case("verify-atol-inf", ["verify", "in/none.so", "--model", "in/model.onnx", "--atol", "inf"], ("--atol",)),
    Case("verify-timeout-zero", ["verify", "in/none.so", "--model", "in/model.onnx", "--timeout", "0"],
         ("--timeout",)),
    Case("verify-timeout-nan", ["verify", "in/none.so", "--model", "in/model.onnx", "--timeout", "nan"],
         ("--timeout",)),
    Case("compare-bad-samples", ["compare", "in/model.onnx", "in/model.onnx", "--samples", "0"], ("--samples",)),
    # ---- the command line itself
    Case("unknown-command", ["compress", "in/model.onnx"], ("compress",)),
    Case("unknown-flag", ["run", "in/model.onnx", "--pass", "canonicalize", "-o", "out/o.onnx", "--fast"],
         ("--fast",)),
]


def _params(cases):
    return [pytest.param(c, id=c.id, marks=needs_ppocr if c.ppocr else ()) for c in cases]


@pytest.mark.parametrize("case", _params(CASES))
def test_user_error(case, work, capsys, model_bytes):
    if case.setup:
        SETUPS[case.setup](work, model_bytes)
    before = _hashes(work / "in")
    rc, out, err = run_cli(capsys, case.args)
    assert_user_error(rc, out, err, *case.names)
    assert_nothing_written(work, before)


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------ the real process
SUBPROCESS_CASES = ["missing-file", "truncated-half", "random-bytes", "unknown-pass", "wrong-type-int",
                    "dynamic-without-shape", "output-in-missing-folder", "pipeline-malformed-yaml"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_user_error_subprocess(case_id, work, model_bytes):
    """The same through `python -m sculpt`: no traceback, no warnings, one line, status 2."""
    case = next(c for c in CASES if c.id == case_id)
    if case.setup:
        SETUPS[case.setup](work, model_bytes)
    before = _hashes(work / "in")
    env = dict(os.environ)
    env.pop("SCULPT_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "sculpt", *case.args], capture_output=True, text=True, cwd=work,
                       env=env, timeout=120)
    assert_user_error(p.returncode, p.stdout, p.stderr, *case.names)
    assert_nothing_written(work, before)


# ------------------------------------------------------------------ failures after passes started
def _failing_pass(kind: str):
    from dataclasses import dataclass

    from sculpt.errors import PassError
    from sculpt.passes.base import Pass, PassResult

    @dataclass
    class Failing(Pass):
        """Test pass: fails the way it is told to."""

        name = f"test-fail-{kind}"
        exact = True

        def run(self, model, ctx):
            if kind == "user":
                raise PassError(self.name, "cannot handle this model", node="p2o.Conv.0")
            if kind == "bug":
                raise RuntimeError("an internal bug\nwith a second line")
            if kind == "interrupt":
                raise KeyboardInterrupt
            if kind == "inexact":  # an "exact" pass that changes the outputs
                from onnx import numpy_helper

                for node in model.graph.node:
                    if node.op_type == "Constant":
                        t = node.attribute[0].t
                        a = numpy_helper.to_array(t)
                        if a.dtype.kind == "f" and a.ndim == 4:
                            t.CopyFrom(numpy_helper.from_array((a * 1.5).astype(a.dtype), t.name))
                            break
                else:
                    for t in model.graph.initializer:
                        a = numpy_helper.to_array(t)
                        if a.dtype.kind == "f" and a.ndim == 4:
                            t.CopyFrom(numpy_helper.from_array((a * 1.5).astype(a.dtype), t.name))
                            break
                return PassResult(model, True, {})
            return PassResult(model, False, {})

    return Failing


@pytest.mark.parametrize("kind,status,names", [
    ("user", 2, ("test-fail-user", "p2o.Conv.0", "remove-identity")),
    ("bug", 3, ("RuntimeError", "an internal bug")),
    ("inexact", 2, ("test-fail-inexact",)),
])
def test_failure_mid_pipeline_writes_nothing(kind, status, names, work, capsys, register_pass):
    register_pass(_failing_pass(kind))
    before = _hashes(work / "in")
    args = run_args(passes=("remove-identity", f"test-fail-{kind}", "canonicalize"), extra=("--verify-each",))
    rc = main(args)
    cap = capsys.readouterr()
    assert rc == status, cap.err
    assert "Traceback" not in cap.out + cap.err
    lines = cap.err.strip().splitlines()
    # progress lines of the passes that ran, then exactly one error line
    assert lines[-1].startswith("sculpt: ")
    assert all(line.startswith("[") for line in lines[:-1]), lines
    for name in names:
        assert name in lines[-1], (name, lines[-1])
    assert not cap.out.strip()
    assert_nothing_written(work, before)


def test_interrupt_mid_pipeline_writes_nothing(work, capsys, register_pass):
    register_pass(_failing_pass("interrupt"))
    before = _hashes(work / "in")
    rc = main(run_args(passes=("remove-identity", "test-fail-interrupt")))
    cap = capsys.readouterr()
    assert rc == 130
    assert "Traceback" not in cap.err and cap.err.strip().splitlines()[-1] == "sculpt: interrupted"
    assert_nothing_written(work, before)


def test_failure_keeps_existing_dump_dir_and_output(work, capsys, register_pass):
    """A failing run leaves an existing --dump-dir and an existing -o file exactly as they were."""
    register_pass(_failing_pass("user"))
    (work / "out" / "dump").mkdir()
    (work / "out" / "dump" / "001_remove-identity.onnx").write_bytes(b"old dump")
    (work / "out" / "o.onnx").write_bytes(b"old output")
    (work / "out" / "report.json").write_text("{}")
    before_out = _hashes(work / "out")
    rc = main(run_args(passes=("remove-identity", "test-fail-user")))
    capsys.readouterr()
    assert rc == 2
    assert _hashes(work / "out") == before_out


def test_debug_env_shows_traceback(work, capsys, monkeypatch, register_pass):
    """SCULPT_DEBUG=1 re-raises internal errors (for developers); user errors stay one line."""
    register_pass(_failing_pass("bug"))
    monkeypatch.setenv("SCULPT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(run_args(passes=("test-fail-bug",)))
    capsys.readouterr()
    rc = main(run_args(model="in/missing.onnx"))
    assert_user_error(rc, *capsys.readouterr(), "in/missing.onnx")


def test_success_after_errors_still_writes(work, capsys):
    """Sanity check of the harness: the same arguments without the fault write all three outputs."""
    rc = main(run_args(passes=("remove-identity",)))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert sorted(p.name for p in (work / "out").iterdir()) == ["dump", "o.onnx", "report.json"]
    assert sorted(p.name for p in (work / "out" / "dump").iterdir()) == ["001_remove-identity.onnx"]
    json.loads((work / "out" / "report.json").read_text())
