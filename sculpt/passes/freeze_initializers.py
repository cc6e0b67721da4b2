"""freeze-initializers: initializers listed as graph inputs become plain constants."""

from __future__ import annotations

from dataclasses import dataclass

from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, register


@register
@dataclass
class FreezeInitializers(Pass):
    """Drop graph inputs that are backed by an initializer (the IR < 4 convention of overridable
    defaults, common in old exporters). With the default values fed, outputs are unchanged; the
    weights become constants that the other passes can fold and prune."""

    name = "freeze-initializers"
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        inits = {t.name for t in model.graph.initializer}
        keep = [vi for vi in model.graph.input if vi.name not in inits]
        dropped = len(model.graph.input) - len(keep)
        if dropped:
            del model.graph.input[:]
            model.graph.input.extend(keep)
            model.graph_edited(nodes=False)
            if model.proto.ir_version < 4:
                model.proto.ir_version = 4  # initializers need not be inputs from IR 4 on
        return PassResult(model, dropped > 0, {"frozen_inputs": dropped})
