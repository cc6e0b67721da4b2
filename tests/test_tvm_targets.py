"""Named TVM targets: every one is accepted by TVM, knows its architecture and linker; `sculpt targets`."""

import json
import platform

import pytest

from sculpt.backends.tvm.targets import TARGETS, get_target
from sculpt.cli import main
from sculpt.errors import OptionError

NAMED = ["host", "arm64", "cortex-a53", "cortex-a72", "cortex-a76", "mali", "adreno"]


def test_the_named_targets_are_exactly_the_documented_ones():
    assert list(TARGETS) == NAMED


@pytest.mark.parametrize("name", NAMED)
def test_tvm_accepts_every_named_target(name):
    target = get_target(name)
    tvm_target = target.tvm_target()
    assert tvm_target.kind.name == target.spec["kind"]
    if target.is_opencl:
        assert tvm_target.host.kind.name == "llvm"
        assert str(tvm_target.attrs["device"]) == name
        assert str(tvm_target.host.attrs["mtriple"]) == "aarch64-linux-gnu"


@pytest.mark.parametrize("name", NAMED[1:])
def test_arm_and_gpu_targets_are_aarch64_and_cross_linked(name):
    target = get_target(name)
    assert target.arch == "aarch64"
    assert target.is_cross == (platform.machine() != "aarch64")
    if target.is_cross:
        assert target.cross_compiler == "aarch64-linux-gnu-g++"
    assert "+neon" in target.host_spec["mattr"]


def test_host_target_is_this_machine():
    host = get_target("host")
    assert host.arch == platform.machine() and not host.is_cross and host.cross_compiler is None


def test_cortex_a76_has_dot_product_and_cores_have_their_mcpu():
    assert "+dotprod" in get_target("cortex-a76").spec["mattr"]
    for core in ("cortex-a53", "cortex-a72", "cortex-a76"):
        assert get_target(core).spec["mcpu"] == core
        assert bool(get_target(core).tvm_target().attrs["feature.has_dotprod"]) == (core == "cortex-a76")


def test_custom_target_json():
    t = get_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}')
    assert t.name == "custom" and t.arch == "aarch64" and t.cross_compiler == "aarch64-linux-gnu-g++"


@pytest.mark.parametrize("text, words", [
    ("rasberry", ["unknown target 'rasberry'", "arm64"]),
    ('{"kind": llvm}', ["not valid JSON"]),
    ('{"mtriple": "x"}', ["needs a 'kind'"]),
    ('{"kind": "cuda"}', ["'cuda'"]),
])
def test_bad_targets_are_one_line_errors(text, words):
    with pytest.raises(OptionError) as e:
        get_target(text)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_sculpt_targets_json_lists_the_tvm_target_json(capsys):
    assert main(["targets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == NAMED
    for name in NAMED:
        assert data[name]["tvm_target"] == TARGETS[name].spec
    assert data["mali"]["opencl"] and data["mali"]["tvm_target"]["device"] == "mali"


def test_sculpt_targets_table(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in NAMED:
        assert name in out


def test_compile_with_an_unknown_target_fails_before_loading_anything(tmp_path, capsys):
    assert main(["compile", str(tmp_path / "missing.onnx"), "--target", "gpu", "-o", str(tmp_path / "a.so")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown target 'gpu'" in err
    assert list(tmp_path.iterdir()) == []
