"""iterative-pruning: reach a MAC reduction in several steps, with recovery between them.

Each step runs ``channel-pruning`` (its least-squares refit included unless the pruning options say
``reconstruct=false``) to the step's share of the final target, then, with ``recovery=distill``, the
``distill`` pass (teacher: the pipeline's input model). The cumulative fraction of MACs removed after
step i of n follows the schedule: ``constant`` (equal steps, final·i/n) or ``polynomial`` (TF-MOT's
PolynomialDecay from 0 to the final fraction: final·(1 − (1 − i/n)^power), large steps first while
the network has redundancy to spare, small ones at the end). Each step's ``channel-pruning`` ratio is
computed from the MACs the model really has, so rounding in an earlier step is made up later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sculpt.errors import OptionError, PassError
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, check_range, create_pass, option, parse_pass_spec, register

MAX_STEPS = 100


def cumulative_fraction(step: int, steps: int, final: float, schedule: str, power: float) -> float:
    """The fraction of the original MACs removed after ``step`` of ``steps``."""
    t = step / steps
    if schedule == "constant":
        return final * t
    return final * (1.0 - (1.0 - t) ** power)


@register
@dataclass
class IterativePruning(Pass):
    """Channel pruning to a final MAC reduction in several steps, recovering (refit or distill) between steps."""

    name = "iterative-pruning"
    exact = False
    needs_calibration = True
    needs_static_shapes = True

    ratio: float = option(0.5, help="final fraction of the input model's MACs to remove")
    steps: int = option(3, help="pruning steps")
    schedule: Literal["polynomial", "constant"] = option("polynomial", help="how the removed fraction grows per step")
    power: float = option(3.0, help="exponent of the polynomial schedule (TF-MOT's PolynomialDecay default: 3)")
    recovery: Literal["distill", "refit"] = option(
        "distill", help="after each step: distill (then the refit of channel-pruning) or the refit alone")
    pruning: str = option("", help="channel-pruning options for every step, KEY=VALUE,... (not ratio); on the CLI in brackets")
    distill: str = option("steps=100", help="distill options for every step, KEY=VALUE,...; on the CLI in brackets")

    def __post_init__(self):
        check_range("ratio", self.ratio, 0, 1, low_open=True, high_open=True)
        check_range("steps", self.steps, 1, MAX_STEPS)
        check_range("power", self.power, 0, 100, low_open=True)
        self._pruning_options = self._sub_options("channel-pruning", self.pruning)
        self._distill_options = self._sub_options("distill", self.distill)
        if "ratio" in self._pruning_options or "target" in self._pruning_options:
            raise ValueError("pruning options may not set ratio or target: the schedule sets them")
        # refuse a bad option now, before any step has run
        create_pass("channel-pruning", dict(self._pruning_options, ratio=0.1))
        create_pass("distill", self._distill_options)

    @staticmethod
    def _sub_options(name: str, text: str) -> dict[str, str]:
        text = text.strip()
        if text.startswith("[") and text.endswith("]"):  # brackets keep the commas inside one CLI option
            text = text[1:-1]
        if not text.strip():
            return {}
        try:
            return parse_pass_spec(f"{name}:{text}")[1]
        except OptionError as e:
            raise ValueError(str(e)) from None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        shapes = ctx.input_shapes or None
        original = cost_of(model, shapes).macs
        if not original:
            raise PassError(self.name, "the model has no MACs to remove")
        history = []
        for step in range(1, self.steps + 1):
            goal = cumulative_fraction(step, self.steps, self.ratio, self.schedule, self.power)
            current = cost_of(model, shapes).macs
            step_ratio = 1.0 - (1.0 - goal) * original / current
            entry = {"step": step, "goal_removed": round(goal, 4)}
            if step_ratio > 1e-3:
                pruning = create_pass("channel-pruning", dict(self._pruning_options, ratio=min(step_ratio, 0.95)))
                model = pruning(model, ctx).model
                entry["pruning_ratio"] = round(step_ratio, 4)
            if self.recovery == "distill":
                result = create_pass("distill", self._distill_options)(model, ctx)
                model = result.model
                entry["distill_held_out"] = [result.stats.get("held_out_error_before"),
                                             result.stats.get("held_out_error_after")]
            entry["removed"] = round(1.0 - cost_of(model, shapes).macs / original, 4)
            history.append(entry)
        return PassResult(model, True, {"steps": history, "macs_removed": history[-1]["removed"]})
