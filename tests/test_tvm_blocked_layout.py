"""Activations in NCHW<lanes>c between the blocked convs (sculpt.backends.tvm.kernels.blocked_layout):
the plan keeps a tensor blocked only where no layout transform is needed, and whole chains (residual
adds, clips, per-channel constants, channel concats, strides, padded widths and channels) match
onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from sculpt.runtime import make_session
from sculpt.backends.tvm import import_to_relax, run_relax
from sculpt.backends.tvm.kernels import compile_with_kernels, host_target, traits_of
from sculpt.backends.tvm.kernels import onnx_cases as cases
from sculpt.backends.tvm.kernels.blocked_layout import blocked_constant
from sculpt.ir.model import Model


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCULPT_CACHE_DIR", str(tmp_path / "cache"))


def _compile_and_compare(proto, cin, hw, all_decisions: list | None = None):
    import tvm

    model = Model.wrap(proto)
    x = np.random.default_rng(1).standard_normal((1, cin, *hw)).astype(np.float32)
    decisions = []
    executable = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")),
                                      decisions=decisions)
    if all_decisions is not None:
        all_decisions.extend(decisions)
    names = [o.name for o in proto.graph.output]
    got = run_relax(executable, {"x": x}, ["x"])
    ref = make_session(model).run(names, {"x": x})
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert float(np.abs(g - r).max()) <= 2e-5 * float(np.abs(r).max())
    return [d.tile for d in decisions if d.kind == "conv2d_blocked"]


def _planned_lanes(tiles) -> int:
    """The channel block the layout plan used: every blocked conv's tile carries the vector width it
    was chosen for, the target's default or (lane_policy) its wide vectors."""
    traits = traits_of(host_target("llvm"))
    stamped = {t[7] for t in tiles}
    assert len(stamped) == 1 and stamped <= {traits.vector_lanes, traits.wide_lanes or traits.vector_lanes}, tiles
    return stamped.pop()


def test_a_residual_chain_stays_blocked_between_convs_and_matches_onnxruntime():
    tiles = _compile_and_compare(cases.residual_chain_model(nchw_branch=False), 8, (20, 19))
    lanes = _planned_lanes(tiles)
    assert len(tiles) == 6
    # (ob, th, tw, rc, rows_outer, in_block, out_block): the graph's input and output stay NCHW
    assert sum(1 for t in tiles if t[5] == lanes) == 5  # every conv but the first reads blocked input
    assert sum(1 for t in tiles if t[6] == lanes) == 5  # every conv but the last writes blocked output


def test_a_large_tensor_an_nchw_op_reads_stays_nchw_and_matches(monkeypatch):
    from sculpt.backends.tvm.kernels import blocked_layout

    monkeypatch.setattr(blocked_layout, "CONVERT_MAX_ELEMENTS", 0)  # no tensor is small enough to copy
    tiles = _compile_and_compare(cases.residual_chain_model(nchw_branch=True), 8, (20, 19))
    # the pooled copy of the first relu feeds the flatten: the pool, conv a, b and the residual add are NCHW
    assert sum(1 for t in tiles if t[6]) == 3  # c, d (into the concat) and e
    assert sum(1 for t in tiles if t[5]) == 2  # e and y read blocked input; b, c and d the NCHW clip


def test_a_small_tensor_an_nchw_op_reads_gets_an_nchw_copy_and_the_chain_stays_blocked():
    tiles = _compile_and_compare(cases.residual_chain_model(nchw_branch=True), 8, (20, 19))
    assert sum(1 for t in tiles if t[5]) == 5 and sum(1 for t in tiles if t[6]) == 5  # as without the flatten


def test_a_residual_chain_read_by_an_nchw_op_stays_blocked_and_the_last_add_gets_an_nchw_copy():
    """ddddocr's last stage: the transpose into a sequence reads the last residual add. Turning that
    add NCHW would turn its inputs NCHW too, and so every residual block of the stage; a copy of the
    small sum keeps every conv blocked in and out (but the first, reading the graph's input)."""
    tiles = _compile_and_compare(cases.residual_stage_to_sequence_model(), 8, (6, 10))
    lanes = _planned_lanes(tiles)
    assert len(tiles) == 3  # one per kernel function: the two residual blocks' convs share theirs
    assert all(t[6] == lanes for t in tiles), tiles
    assert sum(1 for t in tiles if t[5] == lanes) == 2, tiles


def test_rows_outer_with_blocked_input_pads_one_band_at_a_time(monkeypatch):
    from sculpt.backends.tvm.kernels import tiling

    monkeypatch.setattr(tiling, "_rows_outer", lambda *a: True)
    tiles = _compile_and_compare(cases.residual_chain_model(nchw_branch=False), 8, (20, 19))
    assert all(t[4] == 1 for t in tiles) and any(t[5] for t in tiles)


def test_a_mobile_block_stays_blocked_through_depthwise_convs_squeeze_and_excitation_pools_and_resize(monkeypatch):
    from sculpt.backends.tvm.kernels import lane_policy

    # the plan in the target's default blocks (16 and 8 channels: wide blocks would leave e1, e2 NCHW)
    monkeypatch.setattr(lane_policy, "WIDE_SHARE", 1.01)
    decisions = []
    tiles = _compile_and_compare(cases.mobile_block_model(), 8, (14, 21), decisions)
    kinds = [d.kind for d in decisions]
    assert kinds.count("depthwise_blocked") == 2, kinds
    assert sum(1 for d in decisions if d.kind == "pool" and len(d.shape) == 5) == 3  # both pools and the mean
    assert any("resize" in d.func for d in decisions)
    assert sum(1 for t in tiles if t[5]) == 4  # p2, e1 (the mean), e2 and y read blocked input
    assert sum(1 for t in tiles if t[6]) == 4  # p1, p2, e1 and e2 write it; y is the output


def test_blocked_constants():
    per_channel = np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1)
    blocked = blocked_constant(per_channel, 8, 16)
    assert blocked.shape == (1, 2, 1, 1, 8)
    assert blocked[0, 1, 0, 0, 3] == 11
    full = np.arange(2 * 16 * 3 * 4, dtype=np.float32).reshape(2, 16, 3, 4)
    blocked = blocked_constant(full, 8, 16)
    assert blocked.shape == (2, 2, 3, 4, 8)
    assert blocked[1, 1, 2, 3, 5] == full[1, 13, 2, 3]
    assert blocked_constant(np.float32(2.0), 8, 16) == 2.0
    assert blocked_constant(np.ones((1, 1, 3, 4), np.float32), 8, 16) is None  # not per channel


def test_a_batch_norm_after_a_concat_is_a_per_channel_affine_that_stays_blocked():
    decisions = []
    tiles = _compile_and_compare(cases.dense_block_model(), 8, (12, 13), decisions)
    assert not any("batch_norm" in d.func for d in decisions)
    assert sum(1 for t in tiles if t[6]) == 2 and sum(1 for t in tiles if t[5]) == 1  # a, b write; y reads


@pytest.mark.parametrize("per_plane", [0, 1])
def test_blocked_depthwise_pads_per_plane_or_per_band_of_rows_and_matches(per_plane, monkeypatch):
    from dataclasses import replace

    from sculpt.backends.tvm.kernels import blocked_depthwise

    chosen = blocked_depthwise.depthwise_tile
    monkeypatch.setattr(blocked_depthwise, "depthwise_tile",
                        lambda *a, **k: replace(chosen(*a, **k), per_plane=per_plane))
    decisions = []
    _compile_and_compare(cases.mobile_block_model(), 8, (14, 21), decisions)
    tiles = [d.tile for d in decisions if d.kind == "depthwise_blocked"]  # th, tw, per_plane
    assert len(tiles) == 2 and all(t[2] == per_plane for t in tiles)


def test_a_depthwise_over_fewer_channel_blocks_than_a_parallel_loop_needs_pads_per_band_of_rows():
    """A 3x3 stride-1 depthwise pads per plane, its parallel loop over (n, channel block) -- unless
    it has fewer than PER_PLANE_MIN_PLANES planes (a stem's one 16-channel block at 160x160 ran in one
    thread): then per band of rows, the bands in parallel."""
    from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
    from sculpt.backends.tvm.kernels.blocked_depthwise import depthwise_tile
    from sculpt.backends.tvm.kernels.tiling import PER_PLANE_MIN_PLANES

    def shape(channels, batch=1):
        return ConvShape(batch, channels, 160, 160, channels, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))

    assert depthwise_tile(shape(16 * PER_PLANE_MIN_PLANES), 16).per_plane == 1
    assert depthwise_tile(shape(16 * (PER_PLANE_MIN_PLANES - 1)), 16).per_plane == 0
    assert depthwise_tile(shape(16), 16).per_plane == 0
    assert depthwise_tile(shape(16, batch=PER_PLANE_MIN_PLANES), 16).per_plane == 1


def test_a_measured_conv_tile_search_is_cached_and_later_builds_use_it():
    """search_tiles times the blocked convs in the layouts the plan gives them and caches a tile per
    conv; a build then takes the cached tile (planted here: one the heuristic does not pick) and
    still matches onnxruntime."""
    import json

    import tvm

    from sculpt.backends.tvm.kernels.blocked_conv import ConvTile
    from sculpt.backends.tvm.kernels.tile_search import TileCache, cache_path, search_tiles

    proto = cases.residual_chain_model(nchw_branch=False)
    target = tvm.target.Target(host_target("llvm"))
    heuristic = _compile_and_compare(proto, 8, (20, 19))
    results = [r for r in search_tiles(import_to_relax(Model.wrap(proto)), target, candidates=2, number=1, repeat=1)
               if r.kind == "conv2d_blocked"]
    # one result per distinct conv (shape and layouts); each tried the heuristic's tile first
    assert results and len({r.key for r in results}) == len(results)
    assert all(len(r.tried) >= 2 and r.tried[0][1] == r.heuristic_ms for r in results)
    assert all(r.best_ms <= r.heuristic_ms for r in results)
    assert {tuple(r.tried[0][0]) for r in results} == {tuple(t) for t in heuristic}
    stored = json.loads(cache_path().read_text())["tiles"]
    assert all(stored[r.key]["tile"] == r.best for r in results)
    # plant a tile for every conv: one column per register tile, the heuristic's layouts
    cache = TileCache()
    planted = {}
    for r in results:
        ob, _, _, rc, rows_outer, in_block, out_block, lanes = r.tried[0][0]
        planted[r.key] = ConvTile(ob, 1, 1, rc, rows_outer, in_block, out_block, lanes)
        cache.put(r.key, planted[r.key], 1.0)
    cache.save()
    tiles = _compile_and_compare(proto, 8, (20, 19))
    assert len(tiles) == len(heuristic)
    assert {tuple(t) for t in tiles} == {tuple(p.as_list()) for p in planted.values()}
