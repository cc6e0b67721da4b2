"""`sculpt compile` for the host and `sculpt verify`: the artifact (library + manifest), the deploy runner
run natively and compared with onnxruntime, and the errors a user can cause."""

import json
import shutil

import numpy as np
import onnx
import pytest

from sculpt import __version__
from sculpt.backends.tvm.artifact import ArtifactError, file_sha256, load_artifact
from sculpt.backends.tvm.deploy import run_artifact
from sculpt.backends.tvm.runner import DeployRunFailed
from sculpt.cli import main
from sculpt.errors import ShapeError
from sculpt.models import ppocr_model_path

CLS_SHAPE = [1, 3, 48, 192]


@pytest.fixture(scope="module")
def cls_host(tmp_path_factory):
    out = tmp_path_factory.mktemp("host") / "cls_host.so"
    assert main(["compile", str(ppocr_model_path("cls")), "--target", "host", "--input-shape",
                 "x=" + ",".join(map(str, CLS_SHAPE)), "-o", str(out)]) == 0
    return out


def test_artifact_is_a_library_with_its_manifest(cls_host):
    manifest = json.loads(cls_host.with_suffix(".json").read_text())
    assert cls_host.read_bytes()[:4] == b"\x7fELF"
    assert manifest["format"] == "sculpt-tvm-artifact/1" and manifest["library"] == "cls_host.so"
    assert manifest["target"]["name"] == "host" and manifest["target"]["tvm_target"] == {"kind": "llvm"}
    assert manifest["inputs"] == [{"name": "x", "shape": CLS_SHAPE, "dtype": "float32"}]
    model = onnx.load(ppocr_model_path("cls"))
    assert [o["name"] for o in manifest["outputs"]] == [o.name for o in model.graph.output]
    assert manifest["outputs"][0]["shape"] == [1, 2] and manifest["outputs"][0]["dtype"] == "float32"
    assert manifest["source_model"]["sha256"] == file_sha256(ppocr_model_path("cls"))
    assert manifest["sculpt_version"] == __version__
    assert manifest["tvm_version"].startswith("0.27") and manifest["passes"] == ["canonicalize"]
    assert manifest["opencl_source"] is None and manifest["tuning"] is None
    assert manifest["options"]["kernels"] == "sculpt"  # relax_import.build's default CPU kernels


def test_host_artifact_runs_in_the_deploy_runner_and_matches_onnxruntime(cls_host):
    import onnxruntime as ort

    x = np.random.default_rng(3).random(CLS_SHAPE, dtype=np.float32)
    run = run_artifact(cls_host, {"x": x}, runs=3, warmup=1)
    ref = ort.InferenceSession(str(ppocr_model_path("cls")), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = next(iter(run.outputs.values()))
    assert got.shape == ref.shape == (1, 2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert len(run.times_ms) == 3 and run.median_ms == sorted(run.times_ms)[1] and not run.emulated


def test_sculpt_verify_host_with_an_input_file(cls_host, tmp_path, capsys):
    x = np.random.default_rng(5).random(CLS_SHAPE, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["verify", str(cls_host), "--model", str(ppocr_model_path("cls")), "--input",
                 f"x={tmp_path / 'x.npy'}", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["kind"] == "run" and not data["emulated"] and data["max_rel"] <= 1e-4


def test_verify_detects_a_different_model(cls_host, tmp_path, capsys):
    """A model whose final classifier weights were changed: the artifact no longer matches it."""
    from sculpt.ir.model import Model
    from sculpt.passes import create_pass

    fixed = Model.load(ppocr_model_path("cls")).clone().fix_input_shapes({"x": CLS_SHAPE})
    model = create_pass("canonicalize")(fixed).model.proto  # weights as initializers
    init = next(t for t in reversed(model.graph.initializer) if len(t.dims) == 2)
    w = onnx.numpy_helper.to_array(init)
    init.CopyFrom(onnx.numpy_helper.from_array(w[:, ::-1].copy() + 0.5, init.name))
    onnx.save(model, tmp_path / "changed.onnx")
    assert main(["verify", str(cls_host), "--model", str(tmp_path / "changed.onnx")]) == 1
    captured = capsys.readouterr()
    assert "DIFFERS from onnxruntime" in captured.out
    assert "not the model the artifact was compiled from" in captured.err


def test_runner_rejects_inputs_that_do_not_match_the_manifest(cls_host):
    with pytest.raises(ShapeError, match=r"input 'x' has shape \[1, 3, 48, 100\]"):
        run_artifact(cls_host, {"x": np.zeros((1, 3, 48, 100), np.float32)})
    with pytest.raises(ShapeError, match="expects float32"):
        run_artifact(cls_host, {"x": np.zeros(CLS_SHAPE, np.float64)})
    with pytest.raises(ShapeError, match="no input named 'y'"):
        run_artifact(cls_host, {"x": np.zeros(CLS_SHAPE, np.float32), "y": np.zeros(1)})


def test_a_broken_library_is_a_one_line_runner_error(cls_host, tmp_path):
    broken = tmp_path / "broken.so"
    broken.write_bytes(cls_host.read_bytes()[:4096])
    shutil.copy(cls_host.with_suffix(".json"), tmp_path / "broken.json")
    with pytest.raises(DeployRunFailed) as e:
        run_artifact(broken, {"x": np.zeros(CLS_SHAPE, np.float32)})
    assert "broken.so" in str(e.value) and "\n" not in str(e.value)


def test_missing_or_foreign_manifest(cls_host, tmp_path, capsys):
    lone = tmp_path / "lone.so"
    shutil.copy(cls_host, lone)
    with pytest.raises(ArtifactError, match="manifest of lone.so is missing"):
        load_artifact(lone)
    (tmp_path / "lone.json").write_text('{"format": "something-else"}')
    assert main(["verify", str(lone), "--model", str(ppocr_model_path("cls"))]) == 2
    assert "not a sculpt artifact manifest" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["-o", "{tmp}/out.onnx"], ["ending in .so"]),
    (["-o", "{tmp}/missing/out.so"], ["does not exist"]),
    (["-o", "{tmp}/model.so"], ["would overwrite the input model"]),
    (["-o", "{tmp}/out.so", "--tune", "-3"], ["--tune"]),
    (["-o", "{tmp}/out.so", "--rpc", "localhost", "--device-key", "k"], ["HOST:PORT"]),
    (["-o", "{tmp}/out.so", "--rpc", "localhost:9190"], ["--device-key"]),
    (["-o", "{tmp}/out.so", "--search-tiles", "-1"], ["--search-tiles", ">= 0"]),
    (["-o", "{tmp}/out.so", "--search-tiles", "2", "--target", "arm64"], ["--search-tiles", "arm64"]),
    (["-o", "{tmp}/out.so", "--search-tiles", "2", "--kernels", "default"], ["--search-tiles", "--kernels sculpt"]),
    (["-o", "{tmp}/out.so", "--search-tiles", "2", "--tune", "4"], ["--search-tiles", "--tune"]),
])
def test_compile_errors_write_nothing(tmp_path, capsys, args, words):
    """The input is called model.json here, so that '-o model.so' would put the manifest over it."""
    model = tmp_path / "model.json"
    shutil.copy(ppocr_model_path("cls"), model)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["compile", str(model), "--input-shape", "x=1,3,48,192"] + [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sculpt: error:") and err.count("\n") == 1
    assert all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert file_sha256(model) == file_sha256(ppocr_model_path("cls"))


def test_compile_a_dynamic_model_without_shapes_names_the_input(tmp_path, capsys):
    assert main(["compile", str(ppocr_model_path("cls")), "-o", str(tmp_path / "a.so")]) == 2
    err = capsys.readouterr().err
    assert "'x'" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_verify_input_errors(cls_host, tmp_path, capsys):
    model = str(ppocr_model_path("cls"))
    assert main(["verify", str(cls_host), "--model", model, "--input", f"x={tmp_path / 'none.npy'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    assert main(["verify", str(cls_host), "--model", model, "--input", f"x={tmp_path / 'bad.npy'}"]) == 2
    assert "not a readable .npy" in capsys.readouterr().err
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), np.float32))
    assert main(["verify", str(cls_host), "--model", model, "--input", f"x={tmp_path / 'small.npy'}"]) == 2
    assert "compiled for [1, 3, 48, 192]" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_with_sparse_kernels_on_a_sparsified_model(tmp_path, capsys):
    """`--sparse on` after the sparsify pass: block-sparse kernels replace layers, the artifact still
    computes what the sparsified model computes."""
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.ir.model import Model
    from sculpt.passes import Pipeline

    fixed = Model.load(ppocr_model_path("cls")).clone().fix_input_shapes({"x": CLS_SHAPE})
    cal = CalibrationSet.random(fixed, count=4, low=0.0, high=1.0)
    sparse = Pipeline.from_specs(["canonicalize", "sparsify:sparsity=0.8,reconstruct=false"], calibration=cal,
                                 statistics=False).run(fixed).model
    sparse.save(tmp_path / "cls_sparse.onnx")
    out = tmp_path / "cls_sparse.so"
    assert main(["compile", str(tmp_path / "cls_sparse.onnx"), "--sparse", "on", "-o", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["options"]["sparse"]["layers_sparse"] > 0
    capsys.readouterr()
    assert main(["verify", str(out), "--model", str(tmp_path / "cls_sparse.onnx")]) == 0


def test_compile_with_a_tile_search_caches_measured_tiles_and_says_so(tmp_path, monkeypatch, capsys):
    """--search-tiles times candidate tiles of every sculpt kernel here, caches them, and the manifest
    and the summary say how many kernels were searched; the artifact still matches onnxruntime."""
    monkeypatch.setenv("SCULPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "cls.so"
    assert main(["compile", str(ppocr_model_path("cls")), "--input-shape", "x=" + ",".join(map(str, CLS_SHAPE)),
                 "--search-tiles", "2", "-o", str(out)]) == 0
    assert "tile search:" in capsys.readouterr().out
    searched = load_artifact(out).manifest["options"]["tile_search"]
    assert searched["candidates"] == 2 and searched["kernels"] >= 5
    tiles = json.loads((tmp_path / "cache" / "kernel_tiles.json").read_text())["tiles"]
    assert len(tiles) == searched["kernels"]
    assert any("conv2d_blocked" in key for key in tiles)
    # timed for the CPU the build compiles for (the search once timed bare llvm: SSE code, under a
    # key no build of this machine reads)
    from sculpt.backends.tvm.kernels import host_target, traits_of

    traits = traits_of(host_target("llvm"))
    assert {key.split("|")[0] for key in tiles} <= {traits.key, traits.widened().key}, sorted(tiles)
    assert main(["verify", str(out), "--model", str(ppocr_model_path("cls"))]) == 0
