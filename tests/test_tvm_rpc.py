"""Remote devices through TVM's RPC tracker, for real on loopback: a tracker and an RPC server (the
"device", key sculpt-loopback) run as separate processes; `sculpt bench` measures on the device and
`sculpt compile --tune` measures its tuning candidates there."""

import json

import pytest
from rpc_loopback import KEY, free_port, loopback_tracker

from sculpt.cli import main
from sculpt.models import ppocr_model_path


@pytest.fixture(scope="module")
def tracker():
    with loopback_tracker(servers=1) as address:
        yield address


def test_bench_measures_on_the_rpc_device(tracker, capsys):
    assert main(["bench", str(ppocr_model_path("cls")), "--input-shape", "x=1,3,48,192", "--runs", "3",
                 "--rounds", "1", "--warmup", "1", "--rpc", tracker, "--device-key", KEY, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["measured_on"] == f"rpc:{KEY}@{tracker}"
    assert data["ort_ms"] > 0 and data["tvm_ms"] > 0
    assert data["tvm_max_rel_error"] <= 1e-4  # the outputs came back from the device and match


def test_unknown_device_key_is_a_one_line_error(tracker, capsys):
    from sculpt.backends.tvm.rpc import RemoteError, request_session
    from sculpt.backends.tvm.tune import RemoteDevice

    host, port = tracker.split(":")
    with pytest.raises(RemoteError, match="--device-key no-such-device"):
        request_session(RemoteDevice(host, int(port), "no-such-device"), timeout_sec=2)


def test_unreachable_tracker(capsys):
    port = free_port()
    assert main(["bench", str(ppocr_model_path("cls")), "--input-shape", "x=1,3,48,192", "--rpc",
                 f"127.0.0.1:{port}", "--device-key", KEY, "--runs", "1", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the RPC tracker" in err and err.count("\n") == 1


@pytest.mark.slow
def test_tuning_measures_on_the_rpc_device(tracker, tmp_path):
    from test_tvm_tune import conv_relu_model

    model = conv_relu_model(tmp_path / "conv.onnx")
    out = tmp_path / "conv.so"
    assert main(["compile", str(model), "--tune", "1", "--tune-strategy", "random", "--rpc", tracker, "--device-key", KEY, "-o", str(out)]) == 0
    tuning = json.loads(out.with_suffix(".json").read_text())["tuning"]
    assert tuning["measured_on"] == f"{KEY}@{tracker}"
    assert tuning["trials"] >= 1 and tuning["tasks_tuned"] == tuning["tasks"] >= 1
