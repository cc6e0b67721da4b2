"""distill: the ONNX → PyTorch converter (exact against onnxruntime on the real models), recovery of a
pruned model on held-out data, the graph's structure kept, one-line errors, determinism."""

from __future__ import annotations

import builtins

import numpy as np
import onnx
import pytest
from onnx import helper

from sculpt.errors import PassError, PipelineError
from sculpt.ir.calibration import CalibrationSet
from sculpt.passes import Pipeline, create_pass
from sculpt.passes.base import PassContext
from sculpt.runtime import run
from sculpt.training import TrainingUnavailable, require_torch
from tests.graphs import f32, make_model, rms_error

torch = pytest.importorskip("torch", reason="the train extra (pip install -e '.[train]') is not installed")

from sculpt.training.onnx_to_torch import (  # noqa: E402  (after the skip: imports torch)
    GraphModule, UnconvertibleModelError, check_against_onnxruntime, node_by_node_error, trainable_initializers)


# ------------------------------------------------------------------------------ the converter
@pytest.mark.parametrize("kind", ["cls", "rec"])
def test_conversion_matches_onnxruntime_on_ppocr(kind):
    from sculpt.models import ppocr_model
    from sculpt.ocr_task import calibration_inputs

    model = ppocr_model(kind)
    lines = calibration_inputs(kind, 2)
    module = GraphModule(model, trainable_initializers(model))
    error = check_against_onnxruntime(module, model, [{"x": lines[k:k + 1]} for k in range(2)])
    assert error <= 1e-4
    with torch.no_grad():
        got = module({"x": torch.from_numpy(lines[:1])})[model.output_names[0]].numpy()
    want = run(model, {"x": lines[:1]})[model.output_names[0]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def _quantize_round_trip(x_value: float, scale: float = 1.0):
    """x -> QuantizeLinear(scale, uint8 zero point 0) -> DequantizeLinear -> y, and its input."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quantize"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequantize")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
                              [onnx.numpy_helper.from_array(np.array(scale, np.float32), "s"),
                               onnx.numpy_helper.from_array(np.array(0, np.uint8), "z")])
    from sculpt.ir.model import Model

    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    return model, {"x": np.array([[x_value, 1.0, 3.0, 4.25]], np.float32)}


def _round_half_up(node, x, scale, zero_point=None):
    """A quantizer that rounds .5 ties up (onnxruntime rounds them to even), plus an offset."""
    return torch.clamp(torch.floor(x / scale + 0.5) + _round_half_up.offset, 0.0, 255.0)


@pytest.mark.parametrize("x_value, offset, accepted", [(2.5, 0.0, True), (2.25, 1.0, False)])
def test_a_qdq_graph_is_checked_node_by_node_where_a_tie_flip_moves_its_outputs(x_value, offset, accepted):
    # onnxruntime rounds 2.5 to 2, this module to 3: the output moves by 1 of 4.25 (0.24 > 1e-4), but
    # the quantizer's input lies on a tie, so the conversion is right; 2.25 moved one step is not
    model, sample = _quantize_round_trip(x_value)
    module = GraphModule(model)
    _round_half_up.offset = offset
    module.nodes[0].handler = _round_half_up
    with torch.no_grad():
        moved = module({"x": torch.from_numpy(sample["x"])})["y"].numpy()
    assert np.abs(moved - run(model, sample)["y"]).max() == 1.0
    if accepted:
        assert check_against_onnxruntime(module, model, [sample]) == 0.0
    else:
        with pytest.raises(UnconvertibleModelError, match="node 'quantize' \\(QuantizeLinear\\).*4 of 4 values up to 1 off"):
            check_against_onnxruntime(module, model, [sample])


def test_node_by_node_names_a_float_node_that_differs():
    model, data = small_net()
    quantized = Pipeline.from_specs(["qdq"], calibration=data, statistics=False).run(model).model
    module = GraphModule(quantized, trainable_initializers(quantized))
    sample = data[0]
    assert node_by_node_error(module, quantized, sample) <= 1e-5
    conv = next(k for k, n in enumerate(module.nodes) if n.op_type == "Conv")
    exact = module.nodes[conv].handler
    module.nodes[conv].handler = lambda node, *args: exact(node, *args) * 1.001
    with pytest.raises(UnconvertibleModelError, match=f"node '{module.nodes[conv].name}' \\(Conv\\)"):
        node_by_node_error(module, quantized, sample)


def test_a_float_graph_beyond_the_tolerance_is_checked_node_by_node():
    """A float graph whose outputs differ from onnxruntime by more than the tolerance while every node
    is right (here: two convs of nearly equal weights subtracted, so their rounding differences are
    large against the small difference) passes node by node, with the node error; a wrong node is
    named."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Sub", ["c1", "c2"], ["y"], name="difference")]
    model = make_model(nodes, [("x", [1, 8, 12, 12])], [("y", [1, 16, 12, 12])],
                       {"w1": w, "w2": (w * (1 + 1e-5 * rng.standard_normal(w.shape))).astype(np.float32)})
    sample = {"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)}
    module = GraphModule(model, trainable_initializers(model))
    with torch.no_grad():
        got = module({"x": torch.from_numpy(sample["x"])})["y"].numpy()
    want = run(model, sample)["y"]
    assert np.abs(got - want).max() > 1e-4 * np.abs(want).max()  # beyond the tolerance as a whole
    error = check_against_onnxruntime(module, model, [sample])
    assert error == node_by_node_error(module, model, sample) <= 1e-5
    exact = module.nodes[1].handler
    module.nodes[1].handler = lambda node, *args: exact(node, *args) * 1.001
    with pytest.raises(UnconvertibleModelError, match="node 'conv2' \\(Conv\\) differs from onnxruntime on 'c2'"):
        check_against_onnxruntime(module, model, [sample])


def test_canonicalized_cls_trains_its_conv_weights():
    from sculpt.models import ppocr_model
    from sculpt.ocr_task import calibration_inputs

    model = create_pass("canonicalize")(ppocr_model("cls")).model
    names = trainable_initializers(model)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert conv_weights <= set(names)
    lines = calibration_inputs("cls", 1)
    assert check_against_onnxruntime(GraphModule(model, names), model, [{"x": lines}]) <= 1e-4


def test_unconvertible_operator_is_refused_in_one_line_naming_it():
    model = make_model([helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
                        helper.make_node("Hardmax", ["h"], ["y"], name="the_hardmax")],
                       [("x", [1, 2, 4, 4])], [("y", [1, 3, 4, 4])], {"w": f32(3, 2, 1, 1)})
    with pytest.raises(UnconvertibleModelError) as e:
        GraphModule(model)
    text = str(e.value)
    assert "'Hardmax'" in text and "'the_hardmax'" in text and "\n" not in text


# ------------------------------------------------------------------------------ a small net
def small_net() -> tuple:
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    rng = np.random.default_rng(7)  # its own generator: the same net whatever ran before

    def normal(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"w1": normal(16, 4, 3, 3, scale=0.4), "b1": normal(16, scale=0.1),
               "w2": normal(16, 16, 3, 3, scale=0.15), "b2": normal(16, scale=0.1),
               "w3": normal(8, 16, 1, 1, scale=0.3), "b3": normal(8, scale=0.1),
               "wf": normal(5, 8, scale=0.5), "bf": normal(5, scale=0.1)}
    model = make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 5])], weights)
    data = CalibrationSet.from_arrays({"x": rng.standard_normal((48, 1, 4, 8, 8)).astype(np.float32)[:, 0]})
    return model, data


DISTILL = "distill:steps=120,batch_size=8,learning_rate=3e-3,progress=false"
PRUNE = "channel-pruning:ratio=0.5,criterion=l2,reconstruct=false"


def run_pipeline(model, data, distill=DISTILL):
    return Pipeline.from_specs([PRUNE, distill], calibration=data, statistics=False).run(model)


@pytest.fixture(scope="module")
def pruned_and_distilled():
    model, data = small_net()
    pruned = Pipeline.from_specs([PRUNE], calibration=data, statistics=False).run(model)
    distilled = run_pipeline(model, data)
    return model, data, pruned, distilled


def test_distillation_recovers_a_pruned_model_on_held_out_data(pruned_and_distilled):
    model, data, pruned, distilled = pruned_and_distilled
    held_out = list(distilled.split.held_out)  # the pipeline's held-out samples: no pass saw them
    before = rms_error(model, pruned.model, held_out)
    after = rms_error(model, distilled.model, held_out)
    assert before > 0.05  # the pruning really hurt
    assert after < 0.6 * before, (before, after)
    record = distilled.records[-1]
    assert record.modified and record.stats["held_out_error_after"] < record.stats["held_out_error_before"]
    assert record.stats["losses"] == {"y": "mse"}


def test_output_graph_is_structurally_identical(pruned_and_distilled):
    _, _, pruned, distilled = pruned_and_distilled
    before, after = pruned.model.proto.graph, distilled.model.proto.graph
    assert [n.SerializeToString() for n in before.node] == [n.SerializeToString() for n in after.node]
    assert [(t.name, list(t.dims), t.data_type) for t in before.initializer] == \
           [(t.name, list(t.dims), t.data_type) for t in after.initializer]
    assert [i.SerializeToString() for i in before.input] == [i.SerializeToString() for i in after.input]
    assert [o.SerializeToString() for o in before.output] == [o.SerializeToString() for o in after.output]
    changed = [t.name for t, u in zip(before.initializer, after.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u))]
    assert changed  # the values trained, in the same tensors
    for t in after.initializer:
        assert np.isfinite(onnx.numpy_helper.to_array(t)).all()
    onnx.checker.check_model(distilled.model.proto, full_check=True)


def test_same_seed_same_weights_other_seed_other_weights(pruned_and_distilled):
    model, data, _, distilled = pruned_and_distilled
    short = "distill:steps=30,batch_size=8,learning_rate=3e-3,progress=false"
    first = run_pipeline(model, data, short + ",seed=3").model
    again = run_pipeline(model, data, short + ",seed=3").model
    other = run_pipeline(model, data, short + ",seed=4").model
    same = [np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
            for a, b in zip(first.graph.initializer, again.graph.initializer)]
    assert all(same)
    assert first.serialize() == again.serialize()
    assert first.serialize() != other.serialize()


def test_only_changed_or_matching_weights_train(pruned_and_distilled):
    model, data, pruned, _ = pruned_and_distilled
    result = run_pipeline(model, data, DISTILL.replace("steps=120", "steps=20") + ",train=[fc]")
    before = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.model.graph.initializer}
    moved = {t.name for t in result.model.graph.initializer
             if not np.array_equal(before[t.name], onnx.numpy_helper.to_array(t))}
    assert moved and moved <= {"wf", "bf"}


def test_the_input_model_as_student_is_returned_unchanged():
    model, data = small_net()
    result = Pipeline.from_specs(["distill:steps=5,progress=false"], calibration=data, statistics=False).run(model)
    assert not result.records[0].modified  # nothing beats a held-out error of 0: never worse than the input
    assert result.model.serialize() == model.serialize()


def test_distill_outside_a_pipeline_needs_a_teacher():
    model, data = small_net()
    with pytest.raises(PassError, match="needs a teacher"):
        create_pass("distill", {"progress": False})(model, PassContext(calibration=data))


def test_unconvertible_operator_fails_the_pass_in_one_line():
    model = make_model([helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
                        helper.make_node("Hardmax", ["h"], ["y"], name="the_hardmax", axis=1)],
                       [("x", [1, 2, 4, 4])], [("y", [1, 3, 4, 4])], {"w": f32(3, 2, 1, 1)})
    data = CalibrationSet.from_arrays({"x": f32(4, 2, 4, 4)})
    with pytest.raises(PipelineError) as e:
        Pipeline.from_specs(["distill:steps=2,progress=false"], calibration=data, statistics=False).run(model)
    text = str(e.value)
    assert "Hardmax" in text and "the_hardmax" in text and "\n" not in text


def test_missing_train_extra_is_one_line_naming_it(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(TrainingUnavailable) as e:
        require_torch("pass 'distill'")
    assert '.[train]' in str(e.value) and "\n" not in str(e.value)
    model, data = small_net()
    with pytest.raises(PipelineError) as e:
        Pipeline.from_specs([PRUNE, "distill:progress=false"], calibration=data, statistics=False).run(model)
    assert "[train]" in str(e.value) and "\n" not in str(e.value)


def test_options_are_checked():
    with pytest.raises(Exception, match="learning_rate"):
        create_pass("distill", {"learning_rate": 0})
    with pytest.raises(Exception, match="held_out_fraction"):
        create_pass("distill", {"held_out_fraction": 1.0})


# ------------------------------------------------------------------------------ iterative pruning
def test_polynomial_schedule_removes_more_early_and_reaches_the_target():
    from sculpt.passes.iterative_pruning import cumulative_fraction

    poly = [cumulative_fraction(i, 4, 0.5, "polynomial", 3.0) for i in range(5)]
    const = [cumulative_fraction(i, 4, 0.5, "constant", 3.0) for i in range(5)]
    assert poly[0] == const[0] == 0 and poly[-1] == pytest.approx(0.5) and const[-1] == pytest.approx(0.5)
    steps = np.diff(poly)
    assert all(steps[:-1] > steps[1:])  # decreasing increments
    assert np.allclose(np.diff(const), 0.125)


def test_iterative_pruning_reaches_the_mac_target_with_recovery():
    from sculpt.ir.cost import cost_of

    model, data = small_net()
    spec = ("iterative-pruning:ratio=0.5,steps=2,pruning=[criterion=l2,reconstruct=false,round_to=1],"
            "distill=[steps=40,learning_rate=3e-3,progress=false]")
    result = Pipeline.from_specs([spec], calibration=data, statistics=False).run(model)
    stats = result.records[0].stats
    assert len(stats["steps"]) == 2
    removed = 1 - cost_of(result.model).macs / cost_of(model).macs
    assert removed == pytest.approx(stats["macs_removed"], abs=1e-4) and 0.4 <= removed <= 0.6
    for step in stats["steps"]:
        before, after = step["distill_held_out"]
        assert after <= before
    one_shot = Pipeline.from_specs([PRUNE + ",round_to=1"], calibration=data, statistics=False).run(model)
    held_out = list(result.split.held_out)
    assert rms_error(model, result.model, held_out) < rms_error(model, one_shot.model, held_out)


# ------------------------------------------------------------------------------ quantization-aware
def test_qat_after_qdq_keeps_the_qdq_layout_that_onnxruntime_fuses(tmp_path):
    import onnxruntime as ort

    model, data = small_net()
    quantized = Pipeline.from_specs(["qdq"], calibration=data, statistics=False).run(model).model
    result = Pipeline.from_specs(["qdq", "distill:steps=100,learning_rate=3e-4,progress=false"], calibration=data,
                                 statistics=False).run(model)
    trained = result.model
    stats = result.records[-1].stats
    assert result.records[-1].modified
    assert stats["held_out_error_after"] < 0.5 * stats["held_out_error_before"]  # fake-quantized graph
    # the same QDQ graph: nodes, initializer names and element types (int8 weights, int32 biases)
    assert [n.SerializeToString() for n in quantized.graph.node] == [n.SerializeToString() for n in trained.graph.node]
    assert [(t.name, t.data_type, list(t.dims)) for t in quantized.graph.initializer] == \
           [(t.name, t.data_type, list(t.dims)) for t in trained.graph.initializer]
    moved = [t.name for t, u in zip(quantized.graph.initializer, trained.graph.initializer)
             if not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u))]
    assert moved and all(t.endswith("_quantized") for t in moved)  # integer weights moved; scales stayed
    onnx.checker.check_model(trained.proto, full_check=True)
    # onnxruntime runs it with its int8 kernels (QLinearConv after its QDQ fusion)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(trained.serialize(), options, providers=["CPUExecutionProvider"])
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    assert any(n.op_type == "QLinearConv" for n in fused.graph.node)
    held_out = list(result.split.held_out)
    assert rms_error(model, trained, held_out) <= rms_error(model, quantized, held_out)


def test_hints_match_tensors_of_the_same_shape_and_pruned_ones_through_their_kept_channels(pruned_and_distilled):
    model, data, _, _ = pruned_and_distilled
    result = run_pipeline(model, data, DISTILL.replace("steps=120", "steps=30") + ",hints=[c*,g],hint_weight=0.5")
    stats = result.records[-1].stats
    assert stats["hints"] == ["c1", "c2", "c3", "g"]  # conv3's output and the pool keep their 8 channels
    assert stats["hints_through_kept_channels"] == ["c1", "c2"]  # pruned from 16 to 8 channels
    assert stats["hints_skipped"] == {}
    assert result.records[-1].modified


def test_a_hint_is_skipped_when_no_kept_channel_record_names_it(pruned_and_distilled):
    from sculpt.passes.channel_pruning import KEPT_CHANNELS_KEY

    model, data, pruned, _ = pruned_and_distilled
    student = pruned.model.clone()
    props = [p for p in student.proto.metadata_props if p.key != KEPT_CHANNELS_KEY]
    del student.proto.metadata_props[:]
    student.proto.metadata_props.extend(props)
    result = create_pass("distill", {"steps": 2, "hints": ["c1", "c3"], "progress": False})(
        student, PassContext(calibration=data, teacher=model))
    assert result.stats["hints"] == ["c3"]
    assert "no kept-channel record" in result.stats["hints_skipped"]["c1"]


def _activations(model, feeds, names):
    from sculpt.runtime import make_session

    session = make_session(model, extra_outputs=names)
    return [dict(zip(names, session.run(names, dict(f)))) for f in feeds]


def test_channel_pruning_records_the_kept_channels_of_the_teacher_through_two_prunings(pruned_and_distilled, tmp_path):
    from sculpt.ir.model import Model
    from sculpt.passes.channel_pruning import kept_channels

    model, data, pruned, _ = pruned_and_distilled
    record = kept_channels(pruned.model)
    assert set(record) == {"c1", "r1", "c2", "r2"}
    assert all(r.axis == 1 and r.size == 16 and len(r.kept) == 8 for r in record.values())
    # a second pruning composes: its indices still point into the input model's 16 channels
    twice = Pipeline.from_specs([PRUNE.replace("ratio=0.5", "ratio=0.5,target=channels,round_to=1")], calibration=data,
                                statistics=False).run(pruned.model).model
    twice.save(tmp_path / "twice.onnx")
    again = kept_channels(Model.load(tmp_path / "twice.onnx"))  # in the file: it survives saving
    assert len(again["r1"].kept) < 8 and set(again["r1"].kept) < set(record["r1"].kept)
    feeds = list(data)[:4]
    # without a refit conv1's kept filters are untouched: its outputs are the input model's kept channels
    for student, kept in [(pruned.model, record), (twice, again)]:
        for got, want in zip(_activations(student, feeds, ["r1"]), _activations(model, feeds, ["r1"])):
            np.testing.assert_array_equal(got["r1"], want["r1"][:, kept["r1"].kept])


def test_a_hint_on_a_pruned_tensor_pulls_it_to_the_teachers_kept_channels(pruned_and_distilled):
    from sculpt.passes.channel_pruning import kept_channels

    model, data, pruned, _ = pruned_and_distilled
    short = DISTILL.replace("steps=120", "steps=60")
    plain = run_pipeline(model, data, short)
    hinted = run_pipeline(model, data, short + ",hints=[c2],hint_weight=1")
    assert hinted.records[-1].stats["hints_through_kept_channels"] == ["c2"]
    kept = kept_channels(pruned.model)["c2"].kept
    held_out = list(hinted.split.held_out)
    teacher = [a["c2"][:, kept] for a in _activations(model, held_out, ["c2"])]

    def hint_error(student):
        got = [a["c2"] for a in _activations(student, held_out, ["c2"])]
        return float(np.sqrt(sum(((g - t) ** 2).sum() for g, t in zip(got, teacher)) /
                             sum((t ** 2).sum() for t in teacher)))

    before, without, with_hint = hint_error(pruned.model), hint_error(plain.model), hint_error(hinted.model)
    assert with_hint < 0.8 * before and with_hint < 0.8 * without, (before, without, with_hint)
    assert rms_error(model, hinted.model, held_out) < 0.8 * rms_error(model, pruned.model, held_out)


def test_samples_stream_a_large_source_is_never_read_whole():
    model, _ = small_net()
    pruned = Pipeline.from_specs([PRUNE], statistics=False).run(model).model
    reads = []

    def sample(k):
        reads.append(k)
        return {"x": np.random.default_rng(k).standard_normal((1, 4, 8, 8)).astype(np.float32)}

    source = CalibrationSet(10_000, sample, "a generated source", ["x"])
    result = create_pass("distill", {"steps": 3, "batch_size": 4, "held_out_fraction": 0.001, "eval_every": 3,
                                     "progress": False})(pruned, PassContext(calibration=source, teacher=model))
    assert result.stats["training_samples"] == 9_990 and result.stats["held_out_samples"] == 10
    assert len(reads) < 60  # the conversion check, 3 batches of 4, the 10 held-out samples twice
