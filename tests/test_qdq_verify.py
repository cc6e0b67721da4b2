"""Unit-by-unit verification of QDQ builds (sculpt.backends.tvm.qdq_verify): every quantized unit of the
build, on the build's own int8 inputs, within one step of onnxruntime's graph as written and exact on all
but a tiny fraction of its elements; the artifact equal to the verification build. A build with one
wrong unit (a requantization scale 3% off, a zero point shifted by one) fails and the failing unit is
named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphs import conv_matmul_net
from markers import needs_ppocr
from sculpt.backends.tvm import int8 as int8_lowering
from sculpt.backends.tvm import qdq_verify
from sculpt.backends.tvm.artifact import compile_model, export_artifact
from sculpt.backends.tvm.deploy import verify_artifact
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.model import Model
from sculpt.passes import PassContext, create_pass
from sculpt.runtime import make_session

WRONG_UNIT = "c2_quantized"  # the pointwise conv 'pw' of conv_matmul_net


@pytest.fixture(scope="module")
def qdq_net(tmp_path_factory):
    """conv_matmul_net quantized by ``qdq``: units x (the input's quantizer), conv1+relu, dw, pw,
    pool+flatten, linear; the head Gemm is a float tail."""
    model = conv_matmul_net()
    q = create_pass("qdq")(model, PassContext(calibration=CalibrationSet.random(model, 8, seed=3))).model
    path = tmp_path_factory.mktemp("qdq") / "net.qdq.onnx"
    q.save(path)
    return path


@pytest.fixture(scope="module")
def relax_builds(qdq_net, tmp_path_factory):
    """The net on integer Relax ops, built right and with WRONG_UNIT's scale 3% off (shared: builds are
    the slow part)."""
    folder = tmp_path_factory.mktemp("builds")
    right = build(qdq_net, folder, "relax", name="right")
    with pytest.MonkeyPatch.context() as patched:
        wrong_scale(patched, qdq_net)
        wrong = build(qdq_net, folder, "relax", name="wrong")
    return right, wrong


def build(path, tmp_path, int8: str, name: str = "net"):
    return export_artifact(compile_model(Model.load(path), "host", int8=int8), tmp_path / f"{name}.so",
                           source_model=path)


def output_scale_of(path, tensor: str) -> float:
    model = Model.load(path)
    quantizer = model.producers()[tensor]
    return float(model.get_constant(quantizer.input[1]))


@pytest.fixture
def every_conv_on_the_kernel(monkeypatch):
    """The host policy takes every conv of one group with 4+ input channels (the net's are small)."""
    monkeypatch.setattr(int8_lowering, "MIN_KERNEL_MACS", 0)


def wrong_scale(monkeypatch, path, factor=1.03):
    """The int8 lowering's requantization multiplier ``factor`` times too large for WRONG_UNIT."""
    target = output_scale_of(path, WRONG_UNIT)
    right = int8_lowering._multiplier

    def multiplier(sx, sw, sy):
        m = right(sx, sw, sy)
        return (m * np.float32(factor)).astype(np.float32) if np.isclose(float(sy), target, rtol=0) else m

    monkeypatch.setattr(int8_lowering, "_multiplier", multiplier)


def test_quantized_tensors_and_the_cut_model(qdq_net):
    model = Model.load(qdq_net)
    tensors = qdq_verify.quantized_tensors(model)
    assert tensors == ["x_quantized", "r1_quantized", "cd_quantized", "c2_quantized", "f_quantized", "m_quantized"]
    x = np.random.default_rng(0).random((1, 8, 12, 12)).astype(np.float32)
    reference = make_session(model, optimize=False, extra_outputs=tensors)
    values = dict(zip(tensors, reference.run(tensors, {"x": x})))
    proto, unit_outputs = qdq_verify.cut_model(model, values)
    assert set(unit_outputs) == set(tensors)
    assert {i.name for i in proto.graph.input} == {"x", *tensors}
    # fed its own values, every unit of the cut model gives them back, and the tail the model's output
    y = reference.run(["y"], {"x": x})[0]
    units, tails = qdq_verify.compare_units(model, values, {"x": x}, {"y": y})
    assert [u.tensor for u in units] == tensors and all(u.worst_steps == 0 for u in units)
    assert units[3].op == "Conv pw" and tails[0].max_abs == 0


def test_one_step_is_allowed_at_a_rounding_tie_only(qdq_net):
    """The comparison on its own: the build's values are onnxruntime's, then edited. One step off where
    onnxruntime's x / scale is nearest a tie passes; one step off elsewhere, two steps anywhere, or every
    element shifted (a zero point off by one) fails."""
    model = Model.load(qdq_net)
    tensors = qdq_verify.quantized_tensors(model)
    x = np.random.default_rng(1).random((1, 8, 12, 12)).astype(np.float32)
    session = make_session(model, optimize=False, extra_outputs=tensors + ["c2"])
    values = dict(zip(tensors, session.run(tensors, {"x": x})))
    y, c2 = session.run(["y", "c2"], {"x": x})
    steps = (c2 / np.float32(output_scale_of(qdq_net, WRONG_UNIT))).astype(np.float64).reshape(-1)
    distance = np.abs(steps - np.floor(steps) - 0.5)
    inside = (values[WRONG_UNIT].reshape(-1) > 1) & (values[WRONG_UNIT].reshape(-1) < 254)  # not saturated
    at_tie = int(np.argmin(np.where(inside, distance, np.inf)))
    far = int(np.argmax(np.where(inside, distance, -np.inf)))
    assert distance[at_tie] < qdq_verify.TIE_TOLERANCE < distance[far]

    def check(edit):
        edited = {k: v.copy() for k, v in values.items()}
        edit(edited[WRONG_UNIT].reshape(-1))
        units, _ = qdq_verify.compare_units(model, edited, {"x": x}, {"y": y})
        return next(u for u in units if u.tensor == WRONG_UNIT)

    def across_the_tie(flat):  # the other integer next to the tie
        flat[at_tie] = int(flat[at_tie]) + (1 if steps[at_tie] - np.floor(steps[at_tie]) < 0.5 else -1)

    def nudge(flat, index, by):  # away from the type's limit
        flat[index] = int(flat[index]) + by if flat[index] < 128 else int(flat[index]) - by

    tie = check(across_the_tie)
    assert (tie.off_by_one, tie.worst_steps, tie.flips_off_tie, tie.ok) == (1, 1, 0, True)
    assert tie.flip_tie_distance == pytest.approx(distance[at_tie], abs=1e-6)
    off_tie = check(lambda flat: nudge(flat, far, 1))
    assert (off_tie.off_by_one, off_tie.flips_off_tie, off_tie.ok) == (1, 1, False)
    assert "away from a rounding tie" in off_tie.why()
    two = check(lambda flat: nudge(flat, at_tie, 2))
    assert (two.worst_steps, two.ok) == (2, False)
    shifted = check(lambda flat: flat.__setitem__(slice(None), np.where(flat < 128, flat + 1, flat - 1)))
    assert shifted.off_by_one == shifted.elements == 16 * 144 and shifted.flips_off_tie > 0.9 * 16 * 144


@pytest.mark.parametrize("int8", ["off", "relax", "kernel"])
def test_a_right_build_passes_unit_by_unit(qdq_net, tmp_path, int8, every_conv_on_the_kernel, relax_builds):
    artifact = relax_builds[0] if int8 == "relax" else build(qdq_net, tmp_path, int8)
    if int8 == "kernel":
        assert artifact.manifest["options"]["int8"]["on_int8_kernel"] >= 2
    result = verify_artifact(artifact, qdq_net, qdq_units="always")
    check = result.unit_check
    assert check is not None and result.ok and check.ok, check.summary()
    assert len(check.units) == 6 and check.consistent and check.tails_ok
    assert all(u.worst_steps <= 1 for u in check.units)
    note = next(n for n in result.notes if "unit by unit" in n)
    assert "\n" not in note and "6 quantized units" in note


@pytest.mark.parametrize("int8", ["relax", "kernel"])
def test_a_wrong_requantization_scale_fails_and_names_the_unit(qdq_net, tmp_path, int8, monkeypatch,
                                                               every_conv_on_the_kernel, relax_builds):
    wrong_scale(monkeypatch, qdq_net)  # for the artifact and for the verification build alike
    artifact = relax_builds[1] if int8 == "relax" else build(qdq_net, tmp_path, int8)
    if int8 == "kernel":
        assert artifact.manifest["options"]["int8"]["on_int8_kernel"] >= 2
    result = verify_artifact(artifact, qdq_net)  # auto: the end-to-end error is beyond the tolerance
    assert not result.end_to_end_ok and not result.ok
    failing = result.unit_check.failing_units
    assert [u.tensor for u in failing] == [WRONG_UNIT], result.unit_check.summary()
    assert f"FAILS at {WRONG_UNIT} (Conv pw)" in result.unit_check.summary()
    # the other units, fed the wrong unit's output, are still right
    assert all(u.ok for u in result.unit_check.units if u.tensor != WRONG_UNIT)


def test_a_shifted_zero_point_fails(qdq_net, tmp_path, monkeypatch):
    """Every element of the unit one step off: within one step, but far beyond the flip fraction."""
    target = output_scale_of(qdq_net, WRONG_UNIT)
    right = int8_lowering._requantize

    def requantize(acc, multiplier, out_q_call, channel_axis, ndim):
        y = right(acc, multiplier, out_q_call, channel_axis, ndim)
        scale = float(int8_lowering._const_value(out_q_call.args[1]).reshape(-1)[0])
        if not np.isclose(scale, target, rtol=0):
            return y
        from tvm import relax

        zero = int(int8_lowering._const_value(out_q_call.args[2]).reshape(-1)[0])
        dtype = str(out_q_call.attrs.out_dtype)
        shift = 1 if zero < 128 else -1
        return relax.op.astype(relax.op.add(relax.op.astype(y, "int32"), relax.const(np.int32(shift))), dtype)

    monkeypatch.setattr(int8_lowering, "_requantize", requantize)
    result = verify_artifact(build(qdq_net, tmp_path, "relax"), qdq_net, qdq_units="always")
    bad = result.unit_check.failing_units
    assert [u.tensor for u in bad] == [WRONG_UNIT] and bad[0].worst_steps == 1
    assert bad[0].off_by_one > 0.5 * bad[0].elements and not result.ok


def test_an_artifact_that_is_not_the_checked_build_fails(qdq_net, relax_builds):
    """The artifact built with a wrong unit, the verification build (unpatched) with the right one: every
    unit of the verification build passes, but the artifact's outputs are not the verification build's."""
    result = verify_artifact(relax_builds[1], qdq_net)
    check = result.unit_check
    assert not check.failing_units and not check.consistent and not result.ok
    assert "not the same build" in check.summary()


def test_float_models_are_compared_end_to_end_only(tmp_path):
    path = tmp_path / "net.onnx"
    conv_matmul_net().save(path)
    artifact = export_artifact(compile_model(Model.load(path), "host"), tmp_path / "net.so", source_model=path)
    result = verify_artifact(artifact, path, qdq_units="always")
    assert result.ok and result.unit_check is None
    assert not any("unit by unit" in n for n in result.notes)


def test_auto_checks_units_only_when_the_end_to_end_error_is_beyond_the_tolerance(qdq_net, relax_builds):
    right, wrong = relax_builds
    exact = verify_artifact(right, qdq_net)
    assert exact.ok and exact.end_to_end_ok and exact.unit_check is None
    assert verify_artifact(wrong, qdq_net, qdq_units="off").unit_check is None


def test_the_verify_command_reports_units(qdq_net, relax_builds, monkeypatch, capsys):
    from sculpt.cli import main

    right, wrong = relax_builds
    assert main(["verify", str(right.library), "--model", str(qdq_net), "--qdq-units", "always", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["qdq_units"]["units"] == 6 and data["qdq_units"]["worst_steps"] <= 1
    assert any(n.startswith("QDQ model compared unit by unit") for n in data["notes"])

    wrong_scale(monkeypatch, qdq_net)
    assert main(["verify", str(wrong.library), "--model", str(qdq_net)]) == 1
    out = capsys.readouterr()
    assert "DIFFERS from onnxruntime unit by unit" in out.out
    assert "note: QDQ model compared unit by unit (the end-to-end error" in out.err
    err = out.err.strip().splitlines()[-1]
    assert err.startswith("sculpt: ") and f"FAILS at {WRONG_UNIT} (Conv pw)" in err


@pytest.mark.slow
@needs_ppocr
def test_ppocr_det_qdq_build_fails_end_to_end_and_passes_unit_by_unit(tmp_path):
    """PP-OCRv4 det quantized by ``qdq``, on the int8 kernel: a few one-step flips at .5 ties propagate
    to an end-to-end error far beyond 1e-4; every unit is within the bound."""
    from sculpt.models import PPOCR_SHAPES, ppocr_model
    from sculpt.passes import Pipeline

    shape = PPOCR_SHAPES["det"]
    fp32 = Pipeline.from_specs(["canonicalize"], input_shapes={"x": shape}).run(ppocr_model("det")).model
    rng = np.random.default_rng(3)
    cal = CalibrationSet.from_arrays({"x": rng.random((4, *shape[1:])).astype(np.float32)})
    q = Pipeline.from_specs(["qdq:samples=4"], calibration=cal).run(fp32).model
    path = tmp_path / "det.qdq.onnx"
    q.save(path)
    result = verify_artifact(build(path, tmp_path, "kernel", name="det"), path)
    check = result.unit_check
    assert not result.end_to_end_ok and check is not None and result.ok, check.summary()
    assert len(check.units) > 50 and check.consistent
    assert all(u.worst_steps <= 1 and u.flips_off_tie == 0 for u in check.units)


def saturated_bias_conv():
    """A QDQ 1x1 conv whose channel 1 has a weight scale of 2.6e-8 and its bias quantized to -2^31 (as
    the ``qdq`` pass leaves PP-OCRv4 det's Conv.28 channel 33): its output is zy - 4 for every input,
    and the int32 sum of the bias and any negative product wraps around."""
    from onnx import TensorProto, helper, numpy_helper

    sx, sy, zy = np.float32(1 / 255), np.float32(0.055), np.uint8(125)
    sw = np.array([0.02, 2.6e-8], np.float32)
    w = np.zeros((2, 4, 1, 1), np.int8)
    w[0, :, 0, 0] = [50, -20, 7, 90]
    w[1, 0, 0, 0] = -127
    consts = {"sx": sx, "zx": np.uint8(0), "w": w, "sw": sw, "zw": np.zeros(2, np.int8),
              "b": np.array([1000, -2 ** 31], np.int32), "sb": (sx * sw).astype(np.float32),
              "zb": np.zeros(2, np.int32), "sy": sy, "zy": zy}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "saturated_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model.wrap(proto)


@pytest.mark.parametrize("int8", ["relax", "kernel"])
def test_a_bias_at_the_int32_limit_does_not_wrap_around(tmp_path, int8):
    """Found by the unit check on PP-OCRv4 det's --int8 kernel build (the unit stays integer Relax ops
    there): 15 of Conv.28's outputs 8 steps off onnxruntime, the int32 sum of the bias -2^31 and a
    negative product wrapped around. Now the sum is taken in int64 where it can overflow."""
    path = tmp_path / "sat.onnx"
    saturated_bias_conv().save(path)
    x = np.random.default_rng(0).random((1, 4, 5, 5)).astype(np.float32)
    reference = make_session(Model.load(path), optimize=False).run(None, {"x": x})[0]
    scale = np.float32(0.055)
    np.testing.assert_array_equal(reference[0, 1], (121 - 125) * scale)  # zy - 4 everywhere
    products = -127 * np.clip(np.rint(x[0, 0] * 255), 0, 255).astype(np.int64)
    assert np.any(products - 2 ** 31 < -2 ** 31)  # the int32 sum would wrap around here
    artifact = export_artifact(compile_model(Model.load(path), "host", int8=int8), tmp_path / "sat.so",
                               source_model=path)
    result = verify_artifact(artifact, path, {"x": x}, qdq_units="always")
    assert result.end_to_end_ok and result.ok, result.unit_check.summary()
    assert all(u.worst_steps == 0 for u in result.unit_check.units)


def test_a_tuned_build_is_compared_end_to_end_with_a_note(qdq_net, relax_builds, tmp_path):
    """The check rebuilds the artifact; MetaSchedule's schedules are not rebuilt, so a tuned build is
    left to the end-to-end comparison (here failed on purpose with a negative tolerance)."""
    import shutil

    from sculpt.backends.tvm.artifact import load_artifact

    right = relax_builds[0]
    library = tmp_path / "tuned.so"
    shutil.copy(right.library, library)
    manifest = dict(right.manifest, library=library.name, tuning={"tasks": 1, "trials": 1})
    library.with_suffix(".json").write_text(json.dumps(manifest))
    result = verify_artifact(load_artifact(library), qdq_net, rtol=-1.0, atol=-1.0)
    assert result.unit_check is None and not result.ok
    assert any("tuned build: not checked unit by unit" in n for n in result.notes)
