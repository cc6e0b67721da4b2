"""Quick local tile search on the host, remembered in a cache keyed by kernel shape and target.

For every register-tiled kernel of a module, the few best tiles of the heuristic's ranking are
built on their own and timed here (a handful of runs each: seconds per model, not minutes); the
fastest is stored in ``<cache>/kernel_tiles.json`` (``~/.cache/sculpt`` or ``$SCULPT_CACHE_DIR``)
under a key made of the target's traits, the kernel kind, its output shape, its reduction extents and
a structural hash of the PrimFunc. Every later build for the same target (``build(...,
kernels="sculpt")``) picks the cached tile up; kernels without an entry use the heuristic.

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


def search_tiles(mod, target, *, candidates: int = 4, number: int = 3, repeat: int = 3,
                 cache: TileCache | None = None, progress=None) -> list[SearchResult]:
    """Time the ``candidates`` best-ranked tiles of every register-tiled kernel of the Relax module
    ``mod`` on this machine and cache the fastest (see the module docstring)."""
    import numpy as np
    import tvm
    from tvm import s_tir, tirx

    from sculpt.backends.tvm.kernels.block_analysis import analyze_reduction
    from sculpt.backends.tvm.kernels.pipeline import legalized_and_fused
    from sculpt.backends.tvm.kernels.rules import main_reduction, schedule_func, tile_ranking

    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    traits = traits_of(target)
    cache = cache if cache is not None else TileCache()
    dev = tvm.cpu()
    results = []
    for gv, func in legalized_and_fused(mod, target).functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        main = main_reduction(sch)
        anatomy = analyze_reduction(sch, main) if main is not None else None
        if anatomy is None:
            continue
        tiles = tile_ranking(anatomy, traits, candidates)
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(np.asarray(rng.standard_normal([int(d) for d in p.shape])).astype(p.dtype), dev)
                for p in func.params]
        tried = []
        for tile in tiles:
            scheduled, _ = schedule_func(func, traits, lambda a, t, f, tile=tile: tile, gv.name_hint)
            if scheduled is None:
                continue
            lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)
            timer = lib.jit().time_evaluator("main", dev, number=number, repeat=repeat)
            tried.append((tile, float(min(timer(*args).results)) * 1e3))
        if not tried:
            continue
        best_tile, best_ms = min(tried, key=lambda t: t[1])
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
