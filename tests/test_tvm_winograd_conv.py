"""3x3 convs by F(2x2, 3x3) (sculpt.backends.tvm.kernels.winograd_conv): the transform constants
reproduce a direct conv in numpy; compiled chains (odd maps, no padding, one-sided padding, residual
add, clip) match onnxruntime; the policy keeps small convs direct."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sculpt.backends.tvm import import_to_relax, run_relax
from sculpt.backends.tvm.kernels import compile_with_kernels, host_target, traits_of
from sculpt.backends.tvm.kernels import onnx_cases as cases
from sculpt.backends.tvm.kernels import tiling, winograd_conv
from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
from sculpt.backends.tvm.kernels.target_traits import TargetTraits
from sculpt.ir.model import Model
from sculpt.runtime import make_session


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCULPT_CACHE_DIR", str(tmp_path / "cache"))


def _direct(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Valid 3x3 conv of x [C, H, W] by w [K, C, 3, 3] in float64."""
    c, h, wd = x.shape
    out = np.zeros((w.shape[0], h - 2, wd - 2))
    for r in range(3):
        for q in range(3):
            out += np.einsum("kc,chw->khw", w[:, :, r, q], x[:, r:r + h - 2, q:q + wd - 2])
    return out


def test_the_transforms_reproduce_a_direct_conv_in_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 10, 8))  # 8x6 outputs: 4x3 tiles of 2x2
    w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)
    u = winograd_conv.transformed_weight(w).reshape(4, 4, 7, 5).astype(np.float64)
    bt, at = np.asarray(winograd_conv.B_T, float), np.asarray(winograd_conv.A_T, float)
    y = np.zeros((7, 8, 6))
    for th in range(4):
        for tw in range(3):
            d = x[:, 2 * th:2 * th + 4, 2 * tw:2 * tw + 4]
            v = np.einsum("ar,crq,bq->abc", bt, d, bt)
            m = np.einsum("abkc,abc->abk", u, v)
            y[:, 2 * th:2 * th + 2, 2 * tw:2 * tw + 2] = np.einsum("ia,abk,jb->kij", at, m, at)
    ref = _direct(x, w.astype(np.float64))
    # U is stored in float32: the rest of the error is its rounding
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()


def _compile(model, x):
    import tvm

    decisions = []
    executable = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")),
                                      decisions=decisions)
    return run_relax(executable, {"x": x}, ["x"]), decisions


def test_a_chain_of_3x3_convs_by_winograd_matches_onnxruntime(winograd_rewrites, monkeypatch):
    proto = cases.winograd_chain_model()
    model = Model.wrap(proto)
    x = np.random.default_rng(1).standard_normal((1, 16, 13, 11)).astype(np.float32)
    got, decisions = _compile(model, x)
    # w1..w5 read and write blocked tensors: each is an input transform, a product, an output
    # transform (w4 and w5 read the same input: one input transform function serves both)
    assert [(i, o) for _, i, o in winograd_rewrites] == [(False, False)] * 5, winograd_rewrites
    kinds = [d.kind for d in decisions]
    assert kinds.count("wino_in") == 4 and kinds.count("wino_out") >= 4, kinds
    ref = make_session(model).run([o.name for o in proto.graph.output], {"x": x})
    assert got[0].shape == ref[0].shape == (1, 16, 12, 10)
    scale = float(np.abs(ref[0]).max())
    assert float(np.abs(got[0] - ref[0]).max()) <= 2e-5 * scale
    # direct, the same chain is as close: F(2x2, 3x3) adds rounding only
    monkeypatch.setattr(tiling, "WINOGRAD_MIN_MACS", 1 << 60)
    direct, decisions = _compile(model, x)
    assert not any(d.kind.startswith("wino") for d in decisions)
    assert float(np.abs(direct[0] - ref[0]).max()) <= 2e-5 * scale


@pytest.mark.parametrize("case", ["edges", "single"])
def test_3x3_convs_reading_or_writing_nchw_by_winograd_match_onnxruntime(case, winograd_rewrites):
    """The transforms read an NCHW input (the graph's) and write an NCHW output (the graph's); a
    lone conv does both (AlexNet's 256->384 between NCHW ops)."""
    if case == "edges":
        proto = cases.winograd_edges_model()
    else:
        proto = cases.conv_model([cases.ConvCase("k3", 16, 32, (3, 3), pads=(1, 1, 1, 1), epilogue="relu")],
                                 (1, 16, 13, 11))
    model = Model.wrap(proto)
    x = np.random.default_rng(2).standard_normal((1, 16, 13, 11)).astype(np.float32)
    got, _ = _compile(model, x)
    layouts = [(i, o) for _, i, o in winograd_rewrites]
    assert layouts == ([(True, False), (False, True)] if case == "edges" else [(True, True)]), layouts
    ref = make_session(model).run([o.name for o in proto.graph.output], {"x": x})
    assert got[0].shape == ref[0].shape
    assert float(np.abs(got[0] - ref[0]).max()) <= 2e-5 * float(np.abs(ref[0]).max())


@pytest.mark.parametrize("full_rate", [False, True])
def test_the_policy_keeps_small_convs_direct(full_rate):
    traits = TargetTraits("avx512", 16, 32, 48 << 10, 2 << 20, wide_at_full_rate=full_rate)
    big = ConvShape(1, 256, 28, 28, 256, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    assert tiling.winograd_worth(big, traits)
    assert not tiling.winograd_worth(ConvShape(1, 32, 7, 7, 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), traits)
    assert not tiling.winograd_worth(ConvShape(1, 8, 56, 56, 64, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), traits)
    # SqueezeNet's 16->64 at 55x55: Winograd unless the direct kernel runs at twice the rate
    squeeze = ConvShape(1, 16, 55, 55, 64, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    assert tiling.winograd_worth(squeeze, traits) is not full_rate
    # PP-OCRv6 det's 96->24 at 184x184 and SqueezeNet's 32->128 at 27x27: Winograd on both kinds
    assert tiling.winograd_worth(ConvShape(1, 96, 184, 184, 24, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), traits)
    assert tiling.winograd_worth(ConvShape(1, 32, 27, 27, 128, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), traits)
    # weights over L2 on a small map: ResNet's 512->512 at 7x7 direct, its 256->256 at 14x14 Winograd,
    # DenseNet's 128->32 at 7x7 (transformed weights of 256 KB) Winograd
    assert not tiling.winograd_worth(ConvShape(1, 512, 7, 7, 512, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), traits)
    assert tiling.winograd_worth(ConvShape(1, 256, 14, 14, 256, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), traits)
    assert tiling.winograd_worth(ConvShape(1, 128, 7, 7, 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), traits)
    # the mechanism's own limits: stride, dilation, groups, layouts
    assert winograd_conv.winograd_applies(big, 16)
    assert not winograd_conv.winograd_applies(replace(big, out_channels=40), 16)  # no whole blocks
    # integer weights: the int8 lowering's exact float32 units, which must stay exact
    weights = np.random.default_rng(0).integers(-127, 128, (256, 256, 3, 3)).astype(np.float32)
    assert not winograd_conv.winograd_applies(big, 16, weights)
    assert winograd_conv.winograd_applies(big, 16, weights / 7)
    for other in (dict(strides=(2, 2)), dict(dilation=(2, 2)), dict(kernel=(5, 5)), dict(groups=2)):
        assert not winograd_conv.winograd_applies(replace(big, **other), 16), other
