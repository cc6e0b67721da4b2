"""channel-pruning policy: criteria, ratio targets, rounding, ignore lists, reconstruction."""

import numpy as np
import onnx
import pytest

from graphs import op_counts
from sculpt.runtime import compare_models
from sculpt.errors import OptionError, PassError
from sculpt.examples import tiny_convnet
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.channels import ChannelGraph
from sculpt.ir.cost import cost_of
from sculpt.passes import PassContext, create_pass

SHAPE = {"input": [1, 3, 32, 32]}


@pytest.fixture(scope="module")
def canonical():
    return create_pass("canonicalize")(tiny_convnet().fix_input_shapes(SHAPE)).model


@pytest.fixture(scope="module")
def calibration(canonical):
    return CalibrationSet.random(canonical, count=8, low=0.0, high=1.0)


def prune(model, cal, **opts):
    opts.setdefault("round_to", 1)  # the tiny model's 16/32-channel groups need fine steps
    return create_pass("channel-pruning", opts)(model, PassContext(calibration=cal))


def channels(model, node_name):
    node = model.node_by_name(node_name)
    return model.get_constant(node.input[1]).shape[0]


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale", "activation", "reconstruction"])
def test_every_criterion_hits_the_mac_target(canonical, calibration, criterion, tmp_path):
    res = prune(canonical, calibration, ratio=0.3, criterion=criterion, min_channels=2)
    base, after = cost_of(canonical).macs, cost_of(res.model).macs
    assert abs((1 - after / base) - 0.3) <= 0.05, (criterion, 1 - after / base)
    assert res.stats["macs_after"] == after
    path = tmp_path / "p.onnx"
    res.model.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    # the residual group (conv1, depthwise conv2, conv3, the Add) shrinks as one
    assert channels(res.model, "conv1") == channels(res.model, "conv3") == channels(res.model, "conv2")
    assert channels(res.model, "conv1") < 16
    cmp = compare_models(canonical, res.model, list(calibration.take(2)))
    assert cmp.outputs[0].shape_match and np.isfinite(cmp.max_abs)


def test_reconstruction_reduces_the_error(canonical, calibration):
    feeds = [CalibrationSet.random(canonical, count=1, seed=100 + s, low=0.0, high=1.0)[0] for s in range(4)]
    plain = prune(canonical, calibration, ratio=0.3, criterion="l2", reconstruct=False, min_channels=2)
    refit = prune(canonical, calibration, ratio=0.3, criterion="l2", reconstruct=True, min_channels=2)
    e_plain = compare_models(canonical, plain.model, feeds).max_abs
    e_refit = compare_models(canonical, refit.model, feeds).max_abs
    assert refit.stats["refit"]["layers"] >= 2
    assert e_refit < e_plain * 0.7, (e_plain, e_refit)


def test_channel_target_and_rounding(canonical, calibration):
    res = prune(canonical, calibration, target="channels", ratio=0.5, round_to=4, criterion="l2", reconstruct=False,
                min_channels=2)
    for g in res.stats["groups"]:
        assert g["channels_after"] % 4 == 0 or g["channels_after"] == g["channels_before"]
        assert g["channels_after"] < g["channels_before"]
    assert channels(res.model, "conv1") == 8  # 16 channels, half removed
    assert channels(res.model, "conv4") == 16


def test_ignore_and_layer_ratios(canonical, calibration):
    res = prune(canonical, calibration, target="channels", ratio=0.5, ignore=["conv4"], criterion="l2",
                reconstruct=False, min_channels=2)
    assert channels(res.model, "conv4") == 32 and channels(res.model, "conv1") == 8
    res = prune(canonical, calibration, target="channels", ratio=0.5, layer_ratios={"conv4": 0.25},
                criterion="l2", reconstruct=False, min_channels=2)
    assert channels(res.model, "conv4") == 24 and channels(res.model, "conv1") == 8


def test_limits_are_respected(canonical, calibration):
    res = prune(canonical, calibration, target="channels", ratio=0.95, max_group_ratio=0.5, min_channels=2,
                criterion="l2", reconstruct=False)
    assert channels(res.model, "conv1") == 8 and channels(res.model, "conv4") == 16
    res = prune(canonical, calibration, target="channels", ratio=0.75, min_channels=12, criterion="l2",
                reconstruct=False)
    assert channels(res.model, "conv1") == 12


def test_unreachable_target_is_reported(canonical, calibration):
    res = prune(canonical, calibration, ratio=0.9, max_group_ratio=0.5, criterion="l2", reconstruct=False,
                min_channels=2)
    assert res.stats["macs_reduction"] < 0.9  # frozen fc/softmax and the cap keep MACs
    assert res.modified


def test_needs_calibration_unless_weight_only(canonical):
    with pytest.raises(PassError, match="calibration"):
        create_pass("channel-pruning")(canonical)
    res = create_pass("channel-pruning", {"criterion": "l1", "reconstruct": False, "min_channels": 2,
                                          "round_to": 1})(canonical)
    assert res.modified


@pytest.mark.parametrize("opts", [{"ratio": 1.5}, {"ratio": -0.1}, {"max_group_ratio": 1.0}, {"round_to": 0},
                                  {"criterion": "magic"}, {"target": "flops"}])
def test_bad_options(opts):
    with pytest.raises(OptionError):
        create_pass("channel-pruning", opts)


def test_groups_stay_consistent_after_pruning(canonical, calibration):
    res = prune(canonical, calibration, ratio=0.4, min_channels=2)
    cg = ChannelGraph.build(res.model.clone())
    for a, b, kind, _args, _op in cg._edges:
        if kind == "eq":
            assert cg.sizes[a] == cg.sizes[b], (a, b)
    assert op_counts(res.model) == op_counts(canonical)
