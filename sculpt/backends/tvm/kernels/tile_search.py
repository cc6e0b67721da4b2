"""Quick local tile search on the host, remembered in a cache keyed by kernel shape and target.

For every register-tiled kernel of a module, the few best tiles of the heuristic's ranking are
built on their own and timed here (a handful of runs each: seconds per model, not minutes); the
fastest is stored in ``<cache>/kernel_tiles.json`` (``~/.cache/sculpt`` or ``$SCULPT_CACHE_DIR``)
under a key made of the target's traits, the kernel kind, its output shape, its reduction extents and
a structural hash of the PrimFunc. Every later build for the same target (``build(...,
kernels="sculpt")``) picks the cached tile up; kernels without an entry use the heuristic.

The channel-blocked convs (blocked_conv) are chosen before fusion, per conv shape and input/output
layout: each distinct one of a module is built alone (the conv without its epilogue) with the best
tiles of ``tiling.conv_tile_ranking`` and the heuristic's own with its loop order flipped, and the
fastest is cached under ``conv_cache_key``; ``cached_conv_policy`` hands it to the layout plan. A
search keeps a measured tile only when it beats the heuristic's by ``MIN_GAIN`` (for every kernel:
the heuristic's own tile is always the first one timed): the runs are short and the host may be
busy, and a tile picked on noise would be worse than the heuristic.

Only host targets can be measured here; for a cross target (arm64) the heuristic decides."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sculpt.backends.tvm.kernels.target_traits import TargetTraits, traits_of
from sculpt.backends.tvm.kernels.tiling import Tile

CACHE_FILE = "kernel_tiles.json"
CACHE_VERSION = 1


def cache_path() -> Path:
    from sculpt.backends.tvm.runtime_libs import cache_dir

    return cache_dir() / CACHE_FILE


def cache_key(anatomy, traits: TargetTraits, func) -> str:
    import tvm_ffi

    reduce = "x".join(str(a.extent) for a in anatomy.reduce)
    shape = "x".join(str(d) for d in anatomy.output_shape)
    return f"{traits.key}|{anatomy.kind}|{shape}|r{reduce}|{tvm_ffi.structural_hash(func) & 0xFFFFFFFF:08x}"


class TileCache:
    """The tiles found by the search, keyed by ``cache_key``; read once, written atomically."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == CACHE_VERSION:
                self.entries = dict(data.get("tiles", {}))
        except (OSError, ValueError, AttributeError):
            self.entries = {}

    def get(self, key: str) -> Tile | None:
        entry = self.entries.get(key)
        return Tile(*entry["tile"]) if entry else None

    def put(self, key: str, tile: Tile, ms: float) -> None:
        self.entries[key] = {"tile": tile.as_list(), "ms": round(ms, 5)}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kernel_tiles.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "tiles": self.entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


# a measured tile replaces the heuristic's only when faster by this fraction (or more)
MIN_GAIN = 0.03


def conv_cache_key(shape, traits: TargetTraits, in_block: int, out_block: int) -> str:
    """The cache key of a channel-blocked conv: target traits, shape (groups), strides, padding, layouts."""
    s = shape
    dims = "x".join(str(d) for d in (s.batch, s.in_channels, s.height, s.width, s.out_channels))
    if s.groups > 1:
        dims += f"g{s.groups}"
    geometry = "_".join("x".join(str(v) for v in t) for t in (s.kernel, s.strides, s.dilation, s.padding))
    return f"{traits.key}|conv2d_blocked|{dims}|{geometry}|i{in_block}|o{out_block}"


def cached_conv_policy(cache: TileCache | None = None):
    """A blocked-conv policy (blocked_conv.ConvPolicy): the measured tile of a conv if the search
    found one for these layouts, else ``tiling.conv_tile``."""
    from sculpt.backends.tvm.kernels.blocked_conv import ConvTile
    from sculpt.backends.tvm.kernels.tiling import conv_tile

    cache = cache if cache is not None else TileCache()

    def policy(shape, traits, in_block: int = 0, out_block: int = 0):
        entry = cache.entries.get(conv_cache_key(shape, traits, in_block, out_block)) if cache.entries else None
        if entry is not None:
            return ConvTile(*entry["tile"])
        return conv_tile(shape, traits, in_block, out_block)

    return policy


def cached_chooser(cache: TileCache | None = None):
    """A TileChooser: the cached tile of a kernel if the search found one, else the heuristic."""
    from sculpt.backends.tvm.kernels.rules import heuristic_chooser

    cache = cache if cache is not None else TileCache()

    def choose(anatomy, traits, func=None):
        if func is not None and cache.entries:
            tile = cache.get(cache_key(anatomy, traits, func))
            if tile is not None:
                return tile
        return heuristic_chooser(anatomy, traits)

    return choose


@dataclass
class SearchResult:
    func: str
    kind: str
    key: str
    tried: list[tuple[list[int], float]]  # (tile, median ms)
    best: list[int]
    heuristic_ms: float
    best_ms: float


def _time_ms(lib, args, number: int, repeat: int) -> float:
    import tvm

    timer = lib.jit().time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
    return float(min(timer(*args).results)) * 1e3


def _random_args(func) -> list:
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(np.asarray(rng.standard_normal([int(d) for d in p.shape])).astype(p.dtype), tvm.cpu())
            for p in func.params]


def time_blocked_conv(shape, tile, target, *, number: int = 3, repeat: int = 3) -> float:
    """Milliseconds of one blocked conv kernel alone (no epilogue) with ``tile``, single-threaded
    schedule, on this machine (best of ``repeat``)."""
    import tvm
    from tvm import s_tir

    from sculpt.backends.tvm.kernels.blocked_conv import blocked_conv_func, schedule_blocked_conv

    func = blocked_conv_func(shape, tile)
    sch = s_tir.Schedule(func)
    lanes = tile.lanes or traits_of(target).vector_lanes
    schedule_blocked_conv(sch, sch.mod["main"], sch.get_sblock(tile.name), tile, lanes, parallel=False)
    lib = tvm.compile(sch.mod, target=target)
    return _time_ms(lib, _random_args(func), number, repeat)


def search_conv_tiles(mod, target, *, candidates: int = 4, number: int = 3, repeat: int = 3,
                      cache: TileCache | None = None, progress=None) -> list[SearchResult]:
    """Time the heuristic tile and the ``candidates`` best-ranked others of every distinct
    channel-blocked conv of the Relax module ``mod`` (in the layouts the plan gives it) and cache the
    fastest when it beats the heuristic's by ``MIN_GAIN`` (see the module docstring)."""
    import dataclasses

    import tvm

    from sculpt.backends.tvm.kernels.lane_policy import conv_traits_for
    from sculpt.backends.tvm.kernels.pipeline import legalized_and_fused
    from sculpt.backends.tvm.kernels.tiling import conv_tile, conv_tile_ranking

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    traits = conv_traits_for(mod, traits_of(target))  # the vector width the plan gives this model's convs
    cache = cache if cache is not None else TileCache()
    decisions: list = []
    legalized_and_fused(mod, target, conv_tile, decisions)
    results = []
    for shape, heuristic in dict.fromkeys(decisions):
        tiles = [heuristic, dataclasses.replace(heuristic, rows_outer=1 - heuristic.rows_outer)]
        for tile in conv_tile_ranking(shape, traits, heuristic.in_block, heuristic.out_block, candidates + 1):
            tile = dataclasses.replace(tile, lanes=heuristic.lanes)
            if tile not in tiles:
                tiles.append(tile)
        tiles = tiles[:candidates + 1]
        tried = []
        for tile in tiles:
            try:
                tried.append((tile, time_blocked_conv(shape, tile, target, number=number, repeat=repeat)))
            except Exception:  # noqa: BLE001 - a candidate TVM cannot schedule or build is not a choice
                if tile is heuristic:
                    raise
        best_tile, best_ms = min(tried, key=lambda t: t[1])
        key = conv_cache_key(shape, traits, heuristic.in_block, heuristic.out_block)
        if best_ms < tried[0][1] * (1 - MIN_GAIN):
            cache.put(key, best_tile, best_ms)
        else:
            best_tile, best_ms = heuristic, tried[0][1]
            cache.put(key, heuristic, best_ms)
        results.append(SearchResult(f"conv {shape.in_channels}->{shape.out_channels} k{shape.kernel[0]}x"
                                    f"{shape.kernel[1]} s{shape.strides[0]} @{shape.height}x{shape.width}",
                                    "conv2d_blocked", key, [(t.as_list(), ms) for t, ms in tried],
                                    best_tile.as_list(), tried[0][1], best_ms))
        if progress:
            progress(f"{results[-1].func}: {best_tile.as_list()} {best_ms:.3f} ms (heuristic {tried[0][1]:.3f} ms)")
    cache.save()
    return results


def search_tiles(mod, target, *, candidates: int = 4, number: int = 3, repeat: int = 3,
                 cache: TileCache | None = None, progress=None) -> list[SearchResult]:
    """Time the ``candidates`` best-ranked tiles of every channel-blocked conv (search_conv_tiles)
    and of every register-tiled kernel of the Relax module ``mod`` on this machine and cache the
    fastest (see the module docstring)."""
    import tvm
    from tvm import s_tir, tirx

    from sculpt.backends.tvm.kernels.block_analysis import analyze_reduction
    from sculpt.backends.tvm.kernels.pipeline import legalized_and_fused
    from sculpt.backends.tvm.kernels.rules import (blocked_kernel, heuristic_chooser, main_reduction, schedule_func,
                                                   tile_ranking)

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    traits = traits_of(target)
    cache = cache if cache is not None else TileCache()
    results = search_conv_tiles(mod, target, candidates=candidates, number=number, repeat=repeat, cache=cache,
                                progress=progress)
    for gv, func in legalized_and_fused(mod, target, cached_conv_policy(cache)).functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        main = main_reduction(sch)
        anatomy = analyze_reduction(sch, main) if main is not None else None
        if anatomy is None or blocked_kernel(sch.get(main).name_hint):
            continue  # the blocked kernels' tiles are fixed before fusion (search_conv_tiles)
        # the heuristic's own tile first (a matrix-vector product's streaming tile is not in the ranking)
        heuristic = heuristic_chooser(anatomy, traits)
        tiles = [heuristic] + [t for t in tile_ranking(anatomy, traits, candidates) if t != heuristic]
        tiles = tiles[:candidates + 1]
        args = _random_args(func)
        tried = []
        for tile in tiles:
            scheduled, _ = schedule_func(func, traits, lambda a, t, f, tile=tile: tile, gv.name_hint)
            if scheduled is None:
                continue
            lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)
            tried.append((tile, _time_ms(lib, args, number, repeat)))
        if not tried:
            continue
        best_tile, best_ms = min(tried, key=lambda t: t[1])
        if tried[0][0] == heuristic and best_ms >= tried[0][1] * (1 - MIN_GAIN):
            best_tile, best_ms = tried[0]  # not clearly faster than the heuristic: keep it
        key = cache_key(anatomy, traits, func)
        cache.put(key, best_tile, best_ms)
        results.append(SearchResult(gv.name_hint, anatomy.kind, key, [(t.as_list(), ms) for t, ms in tried],
                                    best_tile.as_list(), tried[0][1], best_ms))
        if progress:
            progress(f"{gv.name_hint}: {best_tile.as_list()} {best_ms:.3f} ms (heuristic {tried[0][1]:.3f} ms)")
    cache.save()
    return results


def timed_search(mod, target, **kwargs) -> tuple[list[SearchResult], float]:
    start = time.perf_counter()
    results = search_tiles(mod, target, **kwargs)
    return results, time.perf_counter() - start
