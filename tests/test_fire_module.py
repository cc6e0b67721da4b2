"""fire-module: structure, exactness where the fire module can represent the conv, the data fit,
shape conditions, real models."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import assert_exact, op_counts
from sculpt.runtime import compare_models
from sculpt.errors import OptionError, PassError
from sculpt.ir.cost import cost_of
from sculpt.passes import PassContext, create_pass
from test_low_rank import cnn, correlated_calibration

EXACT = {"fit": "weights", "squeeze_ratio": 0.5, "expand_split": 0.25, "force": True, "round_to": 1, "ridge": 1e-10}


def centre_model(permute: bool):
    """A 3×3 conv whose 8 of 32 output channels use only the centre tap (first, or scattered)."""
    m = cnn(cin=16, cout=32, stride=2)
    w = m.get_constant("w").copy()
    w[:8] = 0
    w[:8, :, 1, 1] = np.random.default_rng(0).standard_normal((8, 16))
    if permute:
        w = w[np.random.default_rng(1).permutation(32)]
    m.set_initializer("w", w)
    return m


@pytest.mark.parametrize("permute", [False, True])
def test_structure_and_exact(permute, tmp_path):
    m = centre_model(permute)
    r = create_pass("fire-module", EXACT)(m)
    counts = op_counts(r.model)
    assert counts["Conv"] == 4 and counts["Concat"] == 1 and counts.get("Gather", 0) == int(permute)
    layer = r.stats["layers"][0]
    assert (layer["squeeze"], layer["expand1x1"], layer["expand_kxk"], layer["reordered"]) == (16, 8, 24, permute)
    convs = [n for n in r.model.graph.node if n.op_type == "Conv"]
    shapes = [r.model.get_constant(n.input[1]).shape for n in convs[:3]]
    assert shapes == [(16, 16, 1, 1), (8, 16, 1, 1), (24, 16, 3, 3)]
    assert any(n.output[0] == "c1" for n in r.model.graph.node)  # output name kept
    # squeeze = C and the 1×1 branch gets exactly the centre-only channels: the fire module is exact
    assert_exact(m, r.model, rtol=1e-5, atol=1e-5, tmp_path=tmp_path)
    first = create_pass("fire-module", dict(EXACT, assign="first"))(m)
    assert op_counts(first.model).get("Gather", 0) == 0
    if permute:  # the first 8 channels are not centre-only: no longer exact
        assert compare_models(m, first.model, count=2).max_rel > 1e-3


def test_data_fit_beats_weights():
    m = cnn(cin=16, cout=32)
    cal = correlated_calibration(m)
    held = correlated_calibration(m, count=3, seed=5)
    ctx = PassContext(calibration=cal)
    w = create_pass("fire-module", {"fit": "weights", "expand_split": 0.25})(m, ctx)
    d = create_pass("fire-module", {"fit": "data", "expand_split": 0.25})(m, ctx)
    lw, ld = w.stats["layers"][0], d.stats["layers"][0]
    assert ld["error"] < 0.85 * lw["error"], (ld, lw)
    assert ld["macs_after"] == 12 * 12 * (8 * 16 + 8 * 8 + 24 * 8 * 9) < ld["macs_before"]
    feeds = [held[k] for k in range(3)]
    assert compare_models(m, d.model, feeds).max_rel < compare_models(m, w.model, feeds).max_rel
    assert cost_of(m).macs - cost_of(d.model).macs == ld["macs_before"] - ld["macs_after"]


def test_shape_conditions():
    # not 'same' padding: a 1×1 branch would not line up with the kernel's centre
    def reasons(r):
        return {s["layer"]: s["reason"] for s in r.stats["skipped"]}

    r = create_pass("fire-module", {"fit": "weights", "force": True})(cnn(pads=(0, 0, 0, 0)))
    assert not r.modified and "not 'same'" in reasons(r)["c1"] and reasons(r)["c2"] == "1×1 kernel"
    r = create_pass("fire-module", {"fit": "weights", "force": True})(cnn(k=(2, 2), pads=(0, 0, 1, 1)))
    assert not r.modified and "even kernel" in reasons(r)["c1"]
    r = create_pass("fire-module", {"fit": "weights", "force": True})(cnn(dilation=2, pads=(2, 2, 2, 2)))
    assert r.modified  # dilated 'same' padding lines up


def test_needs_calibration_and_options():
    with pytest.raises(PassError, match="calibration"):
        create_pass("fire-module")(cnn())
    with pytest.raises(OptionError):
        create_pass("fire-module", {"expand_split": 1.0})
    with pytest.raises(OptionError):
        create_pass("fire-module", {"assign": "random"})
