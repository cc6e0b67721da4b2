"""`sculpt compile --tune`: MetaSchedule tunes the model's tasks into a database beside the artifact; the
next compile of the same model and target takes every task from it and measures nothing."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sculpt.backends.tvm.deploy import verify_artifact
from sculpt.backends.tvm.tune import RECORD_FILE, WORKLOAD_FILE, database_record_count
from sculpt.cli import main


def conv_relu_model(path):
    """One 3x3 convolution with bias and ReLU: a single tuning task, so the test stays quick."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "conv_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], [weight, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_tuned_compile_is_reused_from_its_database(tmp_path, capsys):
    model = conv_relu_model(tmp_path / "conv.onnx")
    out = tmp_path / "conv.so"
    # random search: the cheap strategy; what is tested here is the database and its reuse
    assert main(["compile", str(model), "--target", "host", "--tune", "2", "--tune-strategy", "random",
                 "-o", str(out)]) == 0
    first = json.loads(out.with_suffix(".json").read_text())["tuning"]
    database = tmp_path / "conv.tuning"
    assert first["database"] == str(database)
    assert (database / WORKLOAD_FILE).is_file() and (database / RECORD_FILE).is_file()
    assert first["tasks"] >= 1 and first["tasks_tuned"] == first["tasks"] and first["tasks_reused"] == 0
    assert first["trials"] >= first["tasks"] and first["strategy"] == "random"
    records = database_record_count(database)
    assert records >= first["tasks"]
    assert verify_artifact(out, model).ok

    capsys.readouterr()
    assert main(["compile", str(model), "--target", "host", "--tune", "2", "--tune-strategy", "random",
                 "-o", str(out)]) == 0
    second = json.loads(out.with_suffix(".json").read_text())["tuning"]
    assert second["trials"] == 0 and second["tasks_tuned"] == 0
    assert second["tasks_reused"] == second["tasks"] == first["tasks"]
    assert database_record_count(database) == records
    assert "taken from the database" in capsys.readouterr().out
    assert verify_artifact(out, model).ok
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind

    # --tuning-db without --tune: another artifact built from the same database, nothing measured
    assert main(["compile", str(model), "--tuning-db", str(database), "-o", str(tmp_path / "again.so")]) == 0
    applied = json.loads((tmp_path / "again.json").read_text())["tuning"]
    assert applied["trials"] == 0 and applied["tasks_reused"] == applied["tasks"] == first["tasks"]


def test_tuning_a_device_target_without_a_device_is_an_error(tmp_path, capsys):
    model = conv_relu_model(tmp_path / "conv.onnx")
    assert main(["compile", str(model), "--target", "arm64", "--tune", "4", "-o", str(tmp_path / "a.so")]) == 2
    err = capsys.readouterr().err
    assert "--rpc" in err and err.count("\n") == 1
    assert main(["compile", str(model), "--tuning-db", str(tmp_path / "none"), "-o", str(tmp_path / "a.so")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]
