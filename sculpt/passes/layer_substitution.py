"""The skeleton of the passes that replace layers by cheaper structures fitted on calibration data
(low-rank, depthwise-separable, fire-module), and the options they share. Not a pass itself: each
pass subclasses ``LayerSubstitutionPass``, adds the options of its own method and fills in the
per-technique steps; the mechanism they share (candidate Convs, patch algebra, fresh names,
splicing, the MAC report) is in ``sculpt.ir.substitution``, the calibration capture and the refit
of the replacements here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx

from sculpt.errors import PassError
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.ir.refit import RefitJob, layer_rows
from sculpt.ir.substitution import (CandidateLayer, NameAllocator, conv_candidates, name_selected, splice,
                                    substitution_stats)
from sculpt.passes.base import (MAX_POSITIONS, MAX_RIDGE, Pass, PassContext, PassResult, allow_plain_initializers,
                                check_range, option)
from sculpt.passes.refit import sequential_refit
from sculpt.runtime import sampled_activations


@dataclass
class FittedReplacement:
    """One layer's replacement, fitted and not built yet: what the pass's ``build_replacement``
    needs (``params``, the pass's own form) and the layer's row of the report."""

    params: Any
    report: dict


@dataclass
class LayerSubstitutionPass(Pass):
    """One skeleton for every substitution pass, in ``run``:

    1. select: ``select_layers`` → the candidate layers and the skipped ones with a reason;
    2. capture: with calibration data, ``capture_inputs`` samples each layer's input rows;
    3. fit: ``fit_replacement`` per layer → a ``FittedReplacement``, or the reason to leave the
       layer alone;
    4. splice: ``build_replacement`` → the nodes standing in the layer's place (its output keeps its
       name); all of them are spliced in at once;
    5. refit: when ``refit_wanted``, the nodes named by ``refit_jobs`` (default: each replacement's
       last node) are refit in network order on the compressed model's own inputs.

    The stats: ``candidates``, ``count_key`` (how many layers were replaced), MACs and params before
    and after, the per-layer report rows, the skipped layers, and ``refit`` when it ran."""

    count_key: ClassVar[str] = "replaced"
    # False: when no layer qualifies the stats name none and no cost is computed (low-rank's report)
    report_cost_without_candidates: ClassVar[bool] = True

    layers: list[str] = option(default_factory=list, help="node-name patterns (fnmatch) of layers to replace; "
                                                          "empty: all")
    ignore: list[str] = option(default_factory=list, help="node-name patterns (fnmatch) of layers left alone")
    min_macs: int = option(0, help="only layers with at least this many MACs")
    min_saving: float = option(0.1, help="leave a layer alone unless the replacement saves this fraction of its MACs")
    max_error: float = option(1.0, help="leave a layer alone if its fitted relative output error exceeds this")
    force: bool = option(False, help="replace the chosen layers even where it does not cut MACs")
    samples: int = option(8, help="calibration samples for the fit of each layer")
    positions: int = option(2048, help="sampled output positions per layer")
    ridge: float = option(1e-4, help="least-squares regularization, relative to the mean diagonal")
    refit_samples: int = option(32, help="calibration samples for the refit (it solves for whole layers: more rows "
                                         "than the fit of one layer needs)")

    def __post_init__(self):
        if self.samples < 1 or self.positions < 1 or self.refit_samples < 1:
            raise ValueError("samples, positions and refit_samples must be ≥ 1")
        if not 0 <= self.min_saving < 1:
            raise ValueError(f"min_saving must be in [0, 1), got {self.min_saving}")
        check_range("max_error", self.max_error, 0, low_open=True)
        check_range("positions", self.positions, 1, MAX_POSITIONS)
        check_range("ridge", self.ridge, 0, MAX_RIDGE, low_open=True)

    # ------------------------------------------------------------------ the skeleton
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        allow_plain_initializers(model)
        model.infer_shapes(refresh=True)
        layers, skipped = self.select_layers(model)
        stats: dict[str, Any] = {"candidates": len(layers)}
        if not layers and not self.report_cost_without_candidates:
            stats.update({self.count_key: 0, "layers": [], "skipped": skipped})
            return PassResult(model, False, stats)
        original = model.clone() if layers and self.refit_wanted(ctx) else None
        if layers and ctx.calibration is not None:
            self.capture_inputs(model, layers, ctx)
        before = cost_of(model)
        names = NameAllocator(model)
        replacements: dict[str, list[onnx.NodeProto]] = {}
        jobs: list[RefitJob] = []
        report: list[dict] = []
        for layer in layers:
            fitted = self.fit_replacement(layer)
            layer.rows = []  # the sampled inputs have served
            if isinstance(fitted, str):
                skipped.append({"layer": layer.node.name, "reason": fitted})
                continue
            nodes = replacements[layer.node.name] = self.build_replacement(model, layer, fitted.params, names)
            jobs += self.refit_jobs(layer, fitted.params, nodes)
            report.append(fitted.report)
        splice(model, replacements)
        stats.update(substitution_stats(before, model, self.count_key, report, skipped, bool(replacements)))
        if replacements and original is not None:
            stats["refit"] = refit_last_layers(original, model, jobs, ctx.calibration, samples=self.refit_samples,
                                               positions=self.positions)
        return PassResult(model, bool(replacements), stats)

    # ------------------------------------------------------------------ the per-technique steps
    def select_layers(self, model: Model) -> tuple[list[CandidateLayer], list[dict]]:
        """The layers to try, and the skipped ones as {"layer", "reason"}."""
        raise NotImplementedError

    def capture_inputs(self, model: Model, layers: list[CandidateLayer], ctx: PassContext) -> None:
        """Fill each layer's ``rows`` from the calibration data."""
        raise NotImplementedError

    def fit_replacement(self, layer: CandidateLayer) -> FittedReplacement | str:
        """The layer's replacement fitted (on ``layer.rows`` when there are any), or why the layer is
        left alone."""
        raise NotImplementedError

    def build_replacement(self, model: Model, layer: CandidateLayer, params: Any,
                          names: NameAllocator) -> list[onnx.NodeProto]:
        """The nodes that replace the layer (new initializers are added to ``model`` through
        ``names``); the layer's output keeps its name."""
        raise NotImplementedError

    def refit_wanted(self, ctx: PassContext) -> bool:
        """Whether the replacements are refit on the compressed model's own inputs."""
        raise NotImplementedError

    def refit_jobs(self, layer: CandidateLayer, params: Any, nodes: list[onnx.NodeProto]) -> list[RefitJob]:
        """Which replacement nodes the refit solves again, towards which original output: by default
        the last node, towards the whole layer's output."""
        return [RefitJob(nodes[-1].name, layer.node.output[0])]

    # ------------------------------------------------------------------ shared by the steps
    def require_calibration(self, ctx: PassContext, what: str, alternative: str = "") -> None:
        if ctx.calibration is None:
            raise PassError(self.name, f"{what} needs calibration data: give --calibration (an .npz, an image "
                                       f"folder or random:N){', ' + alternative if alternative else ''}")

    def is_selected(self, name: str) -> bool:
        """In ``layers`` (or ``layers`` is empty) and not in ``ignore``."""
        return name_selected(name, self.layers, self.ignore)

    def macs_not_cut_enough(self, layer: CandidateLayer, macs_after: int) -> str | None:
        """Why the layer is left alone when its replacement saves less than ``min_saving`` of its MACs
        (None: it saves enough, or ``force``)."""
        if macs_after > layer.macs * (1 - self.min_saving) and not self.force:
            return f"would not cut MACs enough ({layer.macs} → {macs_after})"
        return None

    def error_too_large(self, error: float | None) -> str | None:
        """Why the layer is left alone when its fitted relative output error exceeds ``max_error``
        (None: within it, not measured, or ``force``)."""
        if error is not None and error > self.max_error and not self.force:
            return f"relative output error {error:.3g} > max_error"
        return None


class ConvSubstitutionPass(LayerSubstitutionPass):
    """A substitution of k×k Convs fitted on their im2col patches (depthwise-separable, fire-module):
    the candidates are ``sculpt.ir.substitution.conv_candidates``, the capture samples patches. The
    subclass declares the options ``fit`` ("data": fitted on calibration patches, which it then
    needs; "weights": on the weights alone) and ``refit`` (after fit=data)."""

    def requires(self, model, ctx):
        super().requires(model, ctx)
        if self.fit == "data":
            self.require_calibration(ctx, "fit=data", "or use fit=weights")

    def refit_wanted(self, ctx: PassContext) -> bool:
        return self.refit and self.fit == "data" and ctx.calibration is not None

    def select_layers(self, model: Model) -> tuple[list[CandidateLayer], list[dict]]:
        """The k×k Convs chosen by ``layers`` / ``ignore`` with at least ``min_macs``."""
        return conv_candidates(model, self.is_selected, min_macs=self.min_macs)

    def capture_inputs(self, model: Model, layers: list[CandidateLayer], ctx: PassContext) -> None:
        capture_patches(model, layers, ctx.calibration, self.samples, self.positions, ctx.seed)


def capture_patches(model: Model, layers: list[CandidateLayer], calibration, samples: int, positions: int,
                    seed: int = 0):
    """im2col patches [S, C·kh·kw] of each layer's input at sampled output positions (layer.rows)."""
    inputs = [layer.node.input[0] for layer in layers]
    for acts, per, rng in sampled_activations(model, inputs, calibration, samples, positions, seed):
        for layer in layers:
            x = acts[layer.node.input[0]]
            layer.rows.append(layer_rows(layer.node, x, layer.y_shape, layer.w.shape, per, rng).astype(np.float32))


def refit_last_layers(original: Model, model: Model, jobs, calibration, *, samples: int, positions: int,
                      ridge: float = 1e-3, holdout: float = 0.25) -> dict:
    """Sequential ridge refit (sculpt.passes.refit.sequential_refit) of the replacements' last layers, so
    that the error of one replaced layer is compensated by the next instead of compounding. A
    quarter of the samples is held out first: a layer whose refit does not lower the error on them
    (too few rows for its unknowns) keeps its fitted weights."""
    data = [s for _, s in zip(range(samples), calibration)]
    return sequential_refit(original, model, jobs, data, positions=positions, ridge=ridge, holdout=holdout)
