"""The options and layer selection shared by the passes that replace layers by cheaper structures
fitted on calibration data (low-rank, depthwise-separable, fire-module). Not a pass itself: each
pass subclasses it and adds the options of its own method; the mechanism they share is in
``sculpt.ir.substitution``, the calibration capture and the refit of the replacements here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sculpt.errors import PassError
from sculpt.ir.model import Model
from sculpt.ir.refit import layer_rows
from sculpt.ir.substitution import name_selected
from sculpt.passes.base import MAX_POSITIONS, MAX_RIDGE, Pass, check_range, option
from sculpt.passes.refit import sequential_refit
from sculpt.runtime import sampled_activations


@dataclass
class LayerSubstitutionPass(Pass):
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

    def _require_calibration(self, ctx, what: str, alternative: str = "") -> None:
        if ctx.calibration is None:
            raise PassError(self.name, f"{what} needs calibration data: give --calibration (an .npz, an image "
                                       f"folder or random:N){', ' + alternative if alternative else ''}")

    def _pattern_ok(self, name: str) -> bool:
        return name_selected(name, self.layers, self.ignore)


def capture_patches(model: Model, layers: list[dict], calibration, samples: int, positions: int, seed: int = 0):
    """im2col patches [S, C·kh·kw] of each layer's input at sampled output positions (layer['rows'])."""
    inputs = [lay["node"].input[0] for lay in layers]
    for acts, per, rng in sampled_activations(model, inputs, calibration, samples, positions, seed):
        for lay in layers:
            x = acts[lay["node"].input[0]]
            lay["rows"].append(layer_rows(lay["node"], x, lay["y_shape"], lay["w"].shape, per, rng).astype(np.float32))


def refit_last_layers(original: Model, model: Model, jobs, calibration, *, samples: int, positions: int,
                      ridge: float = 1e-3, holdout: float = 0.25) -> dict:
    """Sequential ridge refit (sculpt.passes.refit.sequential_refit) of the replacements' last layers, so
    that the error of one replaced layer is compensated by the next instead of compounding. A
    quarter of the samples is held out first: a layer whose refit does not lower the error on them
    (too few rows for its unknowns) keeps its fitted weights."""
    data = [s for _, s in zip(range(samples), calibration)]
    return sequential_refit(original, model, jobs, data, positions=positions, ridge=ridge, holdout=holdout)
