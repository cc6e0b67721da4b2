"""The per-model choice of channel-block width (lane_policy) and the injective functions of several
blocks collapsed into one vectorized loop (rules.inlined_copies)."""

from __future__ import annotations

import numpy as np
import pytest

from sculpt.backends.tvm.kernels import host_target
from sculpt.backends.tvm.kernels import onnx_cases as cases
from sculpt.backends.tvm.kernels.blocked_conv import ConvShape, ConvTile, tile_from_block_name
from sculpt.backends.tvm.kernels import lane_policy
from sculpt.backends.tvm.kernels.lane_policy import conv_shapes, conv_traits_for, wide_share
from sculpt.backends.tvm.kernels.target_traits import traits_of
from sculpt.ir.model import Model

import tvm  # noqa: E402

from sculpt.backends.tvm.kernels.pipeline import compile_with_kernels  # noqa: E402
from sculpt.backends.tvm.relax_import import import_to_relax, run_relax  # noqa: E402
from sculpt.runtime import make_session  # noqa: E402

ZEN4 = traits_of({"kind": "llvm", "mcpu": "znver4"})
AVX2 = traits_of({"kind": "llvm", "mattr": ["+avx2", "+fma"]})


def _shape(cin, cout, hw=14, k=3, groups=1):
    return ConvShape(1, cin, hw, hw, cout, (k, k), (1, 1), (1, 1), (k // 2,) * 4, groups)


def test_wide_share_counts_the_macs_of_convs_whose_channels_are_whole_wide_blocks():
    stem = _shape(3, 32, hw=112)            # reads an image: its 3 input channels do not count against it
    wide = _shape(32, 64)
    narrow = _shape(24, 40)                 # a mobile net's channels: blocks of 8 only
    depthwise = _shape(1, 1, groups=64)     # 64 channels: whole blocks of 16
    grouped = _shape(34, 34, k=1, groups=4)  # ShuffleNet's 34 channels a group
    assert wide_share([stem, wide, depthwise], 16) == 1.0
    assert wide_share([narrow, grouped], 16) == 0.0
    macs = {s: s.groups * s.out_channels * s.in_channels * 9 * 14 * 14 for s in (wide, narrow)}
    assert wide_share([wide, narrow], 16) == pytest.approx(macs[wide] / (macs[wide] + macs[narrow]))
    assert wide_share([], 16) == 0.0
    # output channels that wide blocks pad by a few count (SqueezeNet's classifier computes 1008 of
    # 1000); a third more do not (PP-OCRv6 det's 24-channel convs compute 32)
    assert wide_share([_shape(512, 1000, hw=13, k=1)], 16) == 1.0
    assert wide_share([_shape(96, 24, hw=184)], 16) == 0.0


def test_only_a_target_with_wider_vectors_widens_and_only_for_models_whose_channels_allow_it():
    assert ZEN4.vector_lanes == 8 and ZEN4.wide_lanes == 16 and ZEN4.widened().vector_lanes == 16
    assert AVX2.widened() is AVX2
    wide_model = import_to_relax(Model.wrap(cases.conv_model([cases.ConvCase("a", 16, 32, (3, 3), pads=(1, 1, 1, 1)),
                                                              cases.ConvCase("b", 16, 64, (1, 1))], (1, 16, 12, 12))))
    narrow_model = import_to_relax(Model.wrap(cases.conv_model([cases.ConvCase("a", 24, 40, (3, 3)),
                                                                cases.ConvCase("b", 24, 32, (1, 1))], (1, 24, 12, 12))))
    assert len(conv_shapes(wide_model)) == 2
    assert conv_traits_for(wide_model, ZEN4).vector_lanes == 16
    assert conv_traits_for(wide_model, AVX2) is AVX2
    assert conv_traits_for(narrow_model, ZEN4) is ZEN4  # 24 input channels: no wide blocks at all


def test_a_core_with_two_512_bit_units_widens_every_model_but_the_smallest():
    """Zen 4 keeps a mobile net's 24- and 40-channel convs in blocks of 8 (its 512-bit ops take two
    cycles); a Sapphire Rapids core widens them, unless the model's convs are under FULL_RATE_MIN_MACS."""
    sapphire = traits_of({"kind": "llvm", "mcpu": "sapphirerapids"})
    assert sapphire.wide_at_full_rate and not ZEN4.wide_at_full_rate
    narrow = [cases.ConvCase("a", 24, 40, (3, 3), pads=(1, 1, 1, 1)), cases.ConvCase("b", 24, 24, (1, 1))]
    big = import_to_relax(Model.wrap(cases.conv_model(narrow, (1, 24, 112, 112))))
    small = import_to_relax(Model.wrap(cases.conv_model(narrow, (1, 24, 28, 28))))
    macs = lambda mod: sum(lane_policy.conv_macs(s) for s in conv_shapes(mod))  # noqa: E731
    assert macs(big) >= lane_policy.FULL_RATE_MIN_MACS > macs(small)
    assert wide_share(conv_shapes(big), 16) == 0.0
    assert conv_traits_for(big, sapphire).vector_lanes == 16
    assert conv_traits_for(small, sapphire) is sapphire
    assert conv_traits_for(big, ZEN4) is ZEN4
    # the matmul kernels likewise: 16 lanes and panels of 32 columns on the two-unit core only
    assert sapphire.for_matmuls().vector_lanes == 16 and ZEN4.for_matmuls() is ZEN4 and AVX2.for_matmuls() is AVX2


def test_a_tile_carries_the_vector_width_it_was_chosen_for_in_its_block_name():
    tile = ConvTile(16, 1, 4, 0, 0, 16, 16, 16)
    assert tile_from_block_name(f"x_{tile.name}_y") == tile
    old = ConvTile(8, 1, 4, 0, 0, 8, 8)  # no width: the target's default (names cached before widths)
    assert old.name.endswith("_o8") and tile_from_block_name(old.name) == old


def test_a_model_with_wide_channels_compiles_in_wide_blocks_on_an_avx512_host_and_matches_onnxruntime():
    traits = traits_of(host_target("llvm"))
    proto = cases.residual_chain_model(nchw_branch=False)
    model = Model.wrap(proto)
    decisions = []
    exe = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")), decisions=decisions)
    x = np.random.default_rng(5).standard_normal((1, 8, 20, 19)).astype(np.float32)
    got = run_relax(exe, {"x": x}, ["x"])[0]
    ref = make_session(model).run(None, {"x": x})[0]
    assert float(np.abs(got - ref).max()) <= 2e-5 * float(np.abs(ref).max())
    lanes = {d.tile[7] for d in decisions if d.kind == "conv2d_blocked"}
    share = wide_share(conv_shapes(import_to_relax(model)), traits.wide_lanes or traits.vector_lanes)
    macs = sum(lane_policy.conv_macs(s) for s in conv_shapes(import_to_relax(model)))
    widens = share >= lane_policy.WIDE_SHARE or (traits.wide_at_full_rate and macs >= lane_policy.FULL_RATE_MIN_MACS)
    expected = traits.wide_lanes if traits.wide_lanes and widens else traits.vector_lanes
    assert lanes == {expected}, (lanes, share)


def test_a_shuffle_units_slice_add_and_shuffle_run_as_one_vectorized_loop_and_match_onnxruntime():
    """The grouped conv's padded channels sliced off, the bias and ReLU, and the channel shuffle
    (reshape, transpose, reshape): one block after the indices are simplified, vectorized along the
    width, where it was seven blocks of scalar loops. (68-channel groups at 14x14: ShuffleNet's
    34-channel groups at 28x28 run as matmuls, test_tvm_grouped_pointwise_matmul.py, with nothing
    to slice.)"""
    proto = cases.shuffle_unit_model(272, 4, (14, 14))
    model = Model.wrap(proto)
    target = tvm.target.Target(host_target("llvm"))
    from sculpt.backends.tvm.kernels.block_analysis import root_blocks
    from sculpt.backends.tvm.kernels.pipeline import legalized_and_fused
    from sculpt.backends.tvm.kernels.rules import inlined_copies, schedule_module

    mod = legalized_and_fused(import_to_relax(model), target)
    shuffles = [(gv.name_hint, f) for gv, f in mod.functions_items() if "transpose" in gv.name_hint]
    assert shuffles
    for name, func in shuffles:
        assert len(root_blocks(tvm.s_tir.Schedule(func))) > 3, name
        assert len(root_blocks(tvm.s_tir.Schedule(inlined_copies(func)))) == 1, name
    scheduled, _ = schedule_module(mod, target)
    for name, _ in shuffles:
        assert "T.vectorized" in scheduled[name].script(), name
    exe = compile_with_kernels(import_to_relax(model), target)
    x = np.random.default_rng(7).standard_normal((1, 272, 14, 14)).astype(np.float32)
    got = run_relax(exe, {"x": x}, ["x"])[0]
    ref = make_session(model).run(None, {"x": x})[0]
    assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())
