"""The layer-pruning pass: which Adds are residual blocks, what a removal leaves, the ranking by
measured error, the refit after it, the report, bad options."""

import numpy as np
import onnx
import pytest
from onnx import helper

from graphs import make_model, op_counts
from markers import needs_ppocr
from sculpt.errors import OptionError, PassError
from sculpt.ir.calibration import CalibrationSet
from sculpt.passes import PassContext, create_pass
from sculpt.passes.layer_pruning import Candidate, plain_layers, remove_candidate, residual_blocks
from sculpt.runtime import make_session


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def block_nodes(k, x, out, scale_name):
    """x → Conv 3x3 → Relu → Conv 3x3 → Add(x) → out, named block{k}."""
    return [
        helper.make_node("Conv", [x, f"w{k}a", f"b{k}a"], [f"c{k}a"], name=f"block{k}_conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [f"c{k}a"], [f"r{k}a"], name=f"block{k}_relu"),
        helper.make_node("Conv", [f"r{k}a", f"w{k}b", f"b{k}b"], [f"c{k}b"], name=f"block{k}_conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", [x, f"c{k}b"], [out], name=f"block{k}_add"),
    ]


def resnet(seed=0, weak=2, channels=8):
    """stem Conv → three residual blocks (block ``weak`` has a branch 100x weaker than the others)
    → GlobalAveragePool → Flatten → Gemm → y."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["s"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["s"], ["h0"], name="stem_relu")]
    inits = {"w0": rand(rng, channels, 3, 3, 3, scale=0.3), "b0": rand(rng, channels, scale=0.1)}
    for k in (1, 2, 3):
        nodes += block_nodes(k, f"h{k - 1}", f"a{k}", None)
        nodes.append(helper.make_node("Relu", [f"a{k}"], [f"h{k}"], name=f"block{k}_out"))
        scale = 0.002 if k == weak else 0.2
        inits.update({f"w{k}a": rand(rng, channels, channels, 3, 3, scale=0.2), f"b{k}a": rand(rng, channels, scale=0.1),
                      f"w{k}b": rand(rng, channels, channels, 3, 3, scale=scale), f"b{k}b": rand(rng, channels, scale=scale)})
    nodes += [helper.make_node("GlobalAveragePool", ["h3"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits.update({"wf": rand(rng, 5, channels, scale=0.5), "bf": rand(rng, 5, scale=0.1)})
    return make_model(nodes, [("x", [1, 3, 10, 10])], [("y", [1, 5])], inits)


def with_held_out(calibration, held_out):
    """A pass context with fitting samples and held-out ones (set as an attribute, so that this works
    whether or not PassContext declares ``held_out``)."""
    ctx = PassContext(calibration=calibration)
    ctx.held_out = held_out
    return ctx


def context(model, count=12, held_out=8):
    return with_held_out(CalibrationSet.random(model, count, seed=1), CalibrationSet.random(model, held_out, seed=99))


def outputs(model, feeds):
    sess = make_session(model)
    return [sess.run(None, f)[0] for f in feeds]


def rel_l2(got, ref):
    num = sum(float(((g - r) ** 2).sum()) for g, r in zip(got, ref))
    return (num / sum(float((r ** 2).sum()) for r in ref)) ** 0.5


# ------------------------------------------------------------------ what is a residual block
def test_residual_blocks_are_found_with_their_branches():
    model = resnet()
    model.infer_shapes()
    blocks = residual_blocks(model)
    assert [b.node for b in blocks] == ["block1_add", "block2_add", "block3_add"]
    assert blocks[0].identity_index == 0
    assert set(blocks[0].nodes) == {"block1_conv_a", "block1_relu", "block1_conv_b"}
    assert blocks[0].macs == 2 * 8 * 8 * 9 * 100 + 8 * 100  # two 3x3 convs and the Relu between


def test_adds_that_are_not_residual_blocks_are_left():
    rng = np.random.default_rng(0)
    w = {k: rand(rng, 4, 4, 1, 1) for k in ("wa", "wb", "wc")}
    nodes = [
        # a projection shortcut: both inputs of the Add are branches from x
        helper.make_node("Conv", ["x", "wa"], ["p"], name="proj"),
        helper.make_node("Conv", ["x", "wb"], ["q"], name="main"),
        helper.make_node("Add", ["p", "q"], ["s"], name="two_branches"),
        # a branch whose tensor is also read outside it
        helper.make_node("Conv", ["s", "wc"], ["t"], name="leaky_branch"),
        helper.make_node("Add", ["s", "t"], ["u"], name="leaky_add"),
        helper.make_node("Mul", ["u", "t"], ["y"], name="reads_t"),
    ]
    model = make_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 4, 3, 3])], w)
    model.infer_shapes()
    assert residual_blocks(model) == []
    # a broadcasting Add is no block either
    bias = make_model([helper.make_node("Conv", ["x", "wa"], ["p"], name="c"),
                       helper.make_node("ReduceMean", ["p"], ["m"], name="mean", axes=[2, 3]),
                       helper.make_node("Add", ["p", "m"], ["y"], name="bcast")],
                      [("x", [1, 4, 3, 3])], [("y", [1, 4, 3, 3])], {"wa": w["wa"]})
    bias.infer_shapes()
    assert residual_blocks(bias) == []


def test_plain_layers_have_matching_shapes():
    model = resnet()
    model.infer_shapes()
    names = {c.node for c in plain_layers(model)}
    assert "stem" not in names and "fc" not in names  # 3 → 8 channels; a Gemm 8 → 5
    assert {"block1_conv_a", "block3_conv_b"} <= names


# ------------------------------------------------------------------ what a removal leaves
def test_removal_replaces_the_add_by_its_identity_input(tmp_path):
    model = resnet()
    model.infer_shapes()
    block = next(b for b in residual_blocks(model) if b.node == "block2_add")
    pruned = model.clone()
    assert remove_candidate(pruned, block)
    names = {n.name for n in pruned.graph.node}
    assert not names & {"block2_add", "block2_conv_a", "block2_relu", "block2_conv_b"}
    assert pruned.node_by_name("block2_out").input[0] == "h1"
    assert not {"w2a", "w2b"} & {t.name for t in pruned.graph.initializer}
    # the same function as the network written without the block
    rng = np.random.default_rng(3)
    feeds = [{"x": rand(rng, 1, 3, 10, 10)} for _ in range(3)]
    manual = model.clone()
    manual.proto.graph.ClearField("node")
    for n in model.graph.node:
        if not n.name.startswith("block2_") or n.name == "block2_out":
            manual.proto.graph.node.append(n)
    manual.proto.graph.node[[n.name for n in manual.graph.node].index("block2_out")].input[0] = "h1"
    manual.remove_unused()
    for a, b in zip(outputs(pruned, feeds), outputs(manual, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    pruned.save(tmp_path / "p.onnx")
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)


def test_a_join_that_is_a_graph_output_keeps_its_name():
    rng = np.random.default_rng(1)
    model = make_model(block_nodes(1, "x", "y", None), [("x", [1, 4, 5, 5])], [("y", [1, 4, 5, 5])],
                       {"w1a": rand(rng, 4, 4, 3, 3), "b1a": rand(rng, 4), "w1b": rand(rng, 4, 4, 3, 3),
                        "b1b": rand(rng, 4)})
    r = create_pass("layer-pruning", {"count": 1, "refit": False})(model, context(model))
    assert op_counts(r.model) == {"Identity": 1} and r.model.output_names == ["y"]
    x = rand(rng, 1, 4, 5, 5)
    np.testing.assert_array_equal(outputs(r.model, [{"x": x}])[0], x)
    onnx.checker.check_model(r.model.proto, full_check=True)


# ------------------------------------------------------------------ ranking, report, refit
def test_the_weakest_block_goes_first_and_the_report_is_measured():
    model = resnet(weak=2)
    ctx = context(model)
    r = create_pass("layer-pruning", {"count": 1, "refit": False})(model, ctx)
    assert [x["node"] for x in r.stats["removed"]] == ["block2_add"]
    assert r.stats["kept"] == ["block1_add", "block3_add"] and r.stats["candidates"] == 3
    assert op_counts(r.model)["Conv"] == op_counts(model)["Conv"] - 2
    assert r.stats["macs_after"] == r.stats["macs_before"] - (2 * 8 * 8 * 9 * 100 + 2 * 8 * 100)  # + the Add
    # the reported errors are those of the pruned model on the samples named
    held = list(ctx.held_out)
    assert r.stats["held_out_error"] == pytest.approx(rel_l2(outputs(r.model, held), outputs(model, held)), rel=1e-5)
    ranking = list(ctx.calibration)[-r.stats["ranking_samples"]:]
    removed = r.stats["removed"][0]
    assert removed["error_after"] == pytest.approx(rel_l2(outputs(r.model, ranking), outputs(model, ranking)), rel=1e-5)
    # the weak block costs far less than the others would
    assert removed["error_alone"] < 0.05


def test_ratio_count_and_max_error():
    model = resnet()
    ctx = context(model)
    r = create_pass("layer-pruning", {"ratio": 0.67, "refit": False})(model, ctx)
    assert len(r.stats["removed"]) == 2 and r.stats["removed"][0]["node"] == "block2_add"
    errors = [x["error_after"] for x in r.stats["removed"]]
    assert errors == sorted(errors)
    r = create_pass("layer-pruning", {"count": 3, "max_error": errors[0] * 1.01, "refit": False})(model, ctx)
    assert len(r.stats["removed"]) == 1 and "max_error" in r.stats["stopped"]
    r = create_pass("layer-pruning", {"count": 1, "ignore": ["block2*"], "refit": False})(model, ctx)
    assert r.stats["candidates"] == 2 and r.stats["removed"][0]["node"] != "block2_add"


def test_refit_lowers_the_held_out_error():
    model = resnet(weak=0)  # no weak block: removing one costs
    ctx = context(model, count=16)
    plain = create_pass("layer-pruning", {"count": 1, "refit": False})(model, ctx)
    refit = create_pass("layer-pruning", {"count": 1})(model, ctx)
    report = refit.stats["refit"]
    assert report["layers"] >= 1 and report["kept"]
    assert report["error_after"] < report["error_before"]
    assert refit.stats["held_out_error"] < plain.stats["held_out_error"]
    assert np.isfinite(refit.stats["held_out_error"])


def test_plain_layers_option():
    model = resnet()
    r = create_pass("layer-pruning", {"count": 1, "plain_layers": True, "refit": False})(model, context(model))
    assert r.stats["candidates"] == 3 + 6
    assert r.stats["removed"][0]["kind"] in ("residual", "layer")


def test_no_candidates_leaves_the_model():
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [("x", [1, 2, 4, 4])],
                       [("y", [1, 3, 4, 4])], {"w": rand(rng, 3, 2, 1, 1)})
    r = create_pass("layer-pruning")(model, context(model))
    assert not r.modified and r.stats["removed"] == [] and "no residual block" in r.stats["reason"]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("options,message", [
    ({"ratio": "1.5"}, "ratio must be"),
    ({"count": "-1"}, "count must be"),
    ({"holdout": "1"}, "holdout must be"),
    ({"samples": "1"}, "samples must be"),
    ({"ratio": "0"}, "nothing to remove"),
    ({"ridge": "0"}, "ridge must be"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(OptionError, match=message) as e:
        create_pass("layer-pruning", options)
    assert "\n" not in str(e.value)


def test_needs_calibration_and_static_shapes():
    with pytest.raises(PassError, match="calibration"):
        create_pass("layer-pruning")(resnet())
    dynamic = resnet()
    dynamic.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(PassError, match="layer-pruning"):
        create_pass("layer-pruning")(dynamic, context(resnet()))


# ------------------------------------------------------------------ a real model
@needs_ppocr
def test_ppocr_cls_blocks_and_orientation_accuracy(tmp_path):
    from sculpt import ocr_task
    from sculpt.models import ppocr_model
    from sculpt.passes import Pipeline

    base = Pipeline.from_specs(["canonicalize"], input_shapes={"x": ocr_task.input_shape("cls")},
                               statistics=False).run(ppocr_model("cls")).model
    cal = CalibrationSet.from_arrays({"x": ocr_task.calibration_inputs("cls", 12)})
    held = CalibrationSet.from_arrays({"x": ocr_task.calibration_inputs("cls", 4, seed=7)})
    r = create_pass("layer-pruning", {"count": 1})(base, with_held_out(cal, held))
    assert r.stats["candidates"] == 7 and len(r.stats["removed"]) == 1
    assert r.stats["macs_after"] < r.stats["macs_before"]
    data = ocr_task.cls_set(60)
    before = ocr_task.evaluate_cls(base, data, threads=1).accuracy
    after = ocr_task.evaluate_cls(r.model, data, threads=1).accuracy
    assert after >= before - 2 / 60  # measured: 99% → 99% on 200 lines
    r.model.save(tmp_path / "cls.onnx")
    onnx.checker.check_model(str(tmp_path / "cls.onnx"), full_check=True)


def test_candidate_is_a_value():
    c = Candidate("a", "residual", 0, ("b",), 10)
    assert c == Candidate("a", "residual", 0, ("b",), 10)
