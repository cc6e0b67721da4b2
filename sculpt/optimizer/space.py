"""The search space of `optimize`: knobs, each one independent decision with levels of increasing
compression, and the pipeline of sculpt passes a choice of levels (a plan) stands for.

Knobs: the channel-pruning ratio of one channel group (``prune:<first source layer>``), low-rank
factorization of one layer (``low-rank:<layer>``, MACs cut by the level's factor), depthwise-separable
substitution of one k×k conv (``separable:<layer>``), block sparsity of one layer (``sparsify:<layer>``,
only where the runtime has block-sparse kernels: the TVM build), and int8 for the whole model with the
level's number of most sensitive layers kept in float (``int8``: mixed precision). A plan maps knob
names to levels; its pipeline runs pruning, then the per-layer float substitutions, then sparsity,
then int8, each technique as one pass over the layers the plan names.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from sculpt.errors import OptionError
from sculpt.ir.channels import ChannelGraph
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.passes import create_pass

TECHNIQUES = ("prune", "low-rank", "separable", "sparsify", "int8")
DEFAULT_TECHNIQUES = ("prune", "low-rank", "int8")  # + sparsify on the TVM runtime
PRUNE_LEVELS = (0.25, 0.5)  # fraction of the group's channels removed
LOW_RANK_LEVELS = (2.0, 4.0)  # each factored layer keeps ≤ 1/level of its MACs
SPARSE_LEVELS = (0.5, 0.75)  # fraction of the layer's weight blocks zeroed
INT8_LEVELS = (8, 2, 0)  # most sensitive layers kept in float (fewer: more int8)
SEPARABLE_LEVELS = (1,)  # depthwise filters per input channel
# knobs touching less than this fraction of the model's MACs are not worth a measurement
MIN_MACS_SHARE = 0.01


Plan = Mapping[str, float]


@dataclass(frozen=True)
class Knob:
    name: str
    technique: str
    layer: str  # the node it acts on (a channel group: its first source); "" for the whole model
    levels: tuple
    macs: int  # MACs of the layers it touches
    sources: tuple = field(default=())  # a channel group's source layers

    def describe(self, level) -> str:
        if self.technique == "prune":
            return f"prune {level:.0%} of the channels of {', '.join(self.sources)}"
        if self.technique == "low-rank":
            return f"factor {self.layer} to ≤ 1/{level:g} of its MACs"
        if self.technique == "separable":
            return f"replace {self.layer} by a depthwise-separable pair"
        if self.technique == "sparsify":
            return f"zero {level:.0%} of {self.layer}'s weight blocks"
        return f"int8 with the {int(level)} most sensitive layers in float" if level else "int8 everywhere"

    def as_dict(self) -> dict:
        return {"name": self.name, "technique": self.technique, "layer": self.layer, "levels": list(self.levels),
                "macs": self.macs, "sources": list(self.sources)}


@dataclass
class SearchSpace:
    knobs: list[Knob]
    prune_sources: tuple = ()  # the source layers of every prunable group (those no plan prunes stay)

    def __iter__(self):
        return iter(self.knobs)

    def __len__(self) -> int:
        return len(self.knobs)

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise OptionError(f"plan names an unknown knob '{name}'")


def search_space(model: Model, techniques: Sequence[str] = DEFAULT_TECHNIQUES, *, max_knobs: int = 24,
                 min_share: float = MIN_MACS_SHARE) -> SearchSpace:
    """The knobs of ``model`` (static shapes) for ``techniques``; per-layer knobs ranked by the MACs they
    touch, the largest ``max_knobs`` kept (int8 is always kept)."""
    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        raise OptionError(f"--techniques: unknown '{unknown[0]}' (known: {', '.join(TECHNIQUES)})")
    total = max(1, cost_of(model).macs)
    knobs: list[Knob] = []
    prune_sources: tuple = ()
    if "prune" in techniques:
        prune = _prune_knobs(model)
        prune_sources = tuple(s for k in prune for s in k.sources)
        knobs += prune
    if "low-rank" in techniques:
        layers, _ = create_pass("low-rank", {}).select_layers(model)
        knobs += [Knob(f"low-rank:{lay.node.name}", "low-rank", lay.node.name, LOW_RANK_LEVELS, int(lay.macs))
                  for lay in layers]
    if "separable" in techniques:
        layers, _ = create_pass("depthwise-separable", {}).select_layers(model)
        knobs += [Knob(f"separable:{lay.node.name}", "separable", lay.node.name, SEPARABLE_LEVELS, int(lay.macs))
                  for lay in layers]
    if "sparsify" in techniques:
        layers, _ = create_pass("low-rank", {}).select_layers(model)  # the same Conv/Gemm/MatMul layers
        knobs += [Knob(f"sparsify:{lay.node.name}", "sparsify", lay.node.name, SPARSE_LEVELS, int(lay.macs))
                  for lay in layers]
    per_layer = sorted((k for k in knobs if k.macs >= min_share * total), key=lambda k: (-k.macs, k.name))
    chosen = per_layer[:max_knobs]
    if "int8" in techniques:
        chosen.append(Knob("int8", "int8", "", INT8_LEVELS, total))
    return SearchSpace(chosen, prune_sources)


def _prune_knobs(model: Model) -> list[Knob]:
    cg = ChannelGraph.build(model)
    knobs = []
    for group in cg.prunable_groups():
        sources = tuple(dict.fromkeys(s.node for s in group.sources))
        if not sources:
            continue
        macs = sum(_node_macs(model, name) for name in _touched_nodes(cg, group))
        knobs.append(Knob(f"prune:{sources[0]}", "prune", sources[0], PRUNE_LEVELS, macs, sources))
    return knobs


def _touched_nodes(cg: ChannelGraph, group) -> set[str]:
    names = {s.node for s in group.sources}
    names.update(c.node for c in list(group.consumers) + list(group.partial_consumers))
    return names


_MACS_CACHE: dict[int, dict[str, int]] = {}


def _node_macs(model: Model, name: str) -> int:
    per_node = _MACS_CACHE.get(id(model))
    if per_node is None:
        report = cost_of(model)
        per_node = {lay.name: int(lay.macs or 0) for lay in report.layers}
        _MACS_CACHE.clear()
        _MACS_CACHE[id(model)] = per_node
    return per_node.get(name, 0)


def plan_key(plan: Plan) -> str:
    """The canonical text of a plan (what the cache and the candidate files key on)."""
    return json.dumps({k: plan[k] for k in sorted(plan)}, sort_keys=True)


def plan_pipeline(plan: Plan, space: SearchSpace) -> list[dict]:
    """The passes (``{name: options}``, the pipeline-file form) that apply ``plan``."""
    by_name = {n: space.knob(n) for n in plan}
    chosen = {name: level for name, level in plan.items() if level}
    passes: list[dict] = []

    def of(technique: str) -> list[tuple[Knob, float]]:
        return sorted(((by_name[n], lv) for n, lv in chosen.items() if by_name[n].technique == technique),
                      key=lambda kl: kl[0].name)

    prune = of("prune")
    if prune:
        pruned = {s for k, _ in prune for s in k.sources}
        others = [glob.escape(s) for s in space.prune_sources if s not in pruned]
        passes.append({"channel-pruning": {"target": "channels", "ratio": 0.0,
                                           "layer_ratios": {glob.escape(k.layer): float(lv) for k, lv in prune},
                                           "ignore": others}})
    by_rank: dict[float, list[str]] = {}
    for k, lv in of("low-rank"):
        by_rank.setdefault(float(lv), []).append(glob.escape(k.layer))
    for level, layers in sorted(by_rank.items()):
        passes.append({"low-rank": {"criterion": "compression", "compression": level, "data_aware": True,
                                    "layers": layers}})
    separable = of("separable")
    if separable:
        passes.append({"depthwise-separable": {"layers": [glob.escape(k.layer) for k, _ in separable]}})
    sparse = of("sparsify")
    if sparse:
        passes.append({"sparsify": {"layers": [glob.escape(k.layer) for k, _ in sparse],
                                    "layer_sparsity": {glob.escape(k.layer): float(lv) for k, lv in sparse}}})
    if "int8" in plan:  # level 0 is int8 everywhere: present in the plan means quantized
        passes.append({"qdq": {"keep_float": int(plan["int8"])}})
    return passes
