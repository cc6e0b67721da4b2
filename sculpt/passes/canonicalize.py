"""canonicalize: the exact clean-up passes, run together until nothing changes."""

from __future__ import annotations

from dataclasses import dataclass

from sculpt.ir.model import Model
from sculpt.passes.base import MAX_ROUNDS, MAX_TENSOR_MB, Pass, PassContext, PassResult, check_range, option, register
from sculpt.passes.constant_folding import ConstantFolding
from sculpt.passes.fold_batchnorm import FoldBatchNorm
from sculpt.passes.fold_conv_affine import FoldConvAffine
from sculpt.passes.explicit_pads import ExplicitPads
from sculpt.passes.flush_subnormals import FlushSubnormals
from sculpt.passes.fold_pad_into_conv import FoldPadIntoConv
from sculpt.passes.freeze_initializers import FreezeInitializers
from sculpt.passes.remove_identity import RemoveIdentity
from sculpt.passes.simplify_shapes import SimplifyShapes


@register
@dataclass
class Canonicalize(Pass):
    """Run the exact canonicalization passes until a fixed point: freeze-initializers,
    remove-identity, simplify-shapes (with constant-folding), explicit-pads, fold-pad, fold-batchnorm, fold-conv-affine,
    flush-subnormals.
    Then drop unused tensors, sort nodes topologically and refresh the inferred shapes; a declared
    output shape that contradicts them is dropped (one DeclaredShapeWarning names it).
    The result is what the other passes and the TVM importer expect."""

    name = "canonicalize"
    exact = True

    fold_batchnorm: bool = option(True, help="fold BatchNormalization into the producing Conv/Gemm")
    fold_affine: bool = option(True, help="fold constant per-channel Mul/Div/Add/Sub into the producing Conv")
    fold_pad: bool = option(True, help="a Conv's auto_pad and a constant zero Pad before it as its pads")
    freeze_initializers: bool = option(True, help="initializers listed as graph inputs become constants")
    flush_subnormals: bool = option(True, help="subnormal float constants become zero (slow on Intel cores)")
    max_rounds: int = option(4, help="maximum rounds of the whole sequence")
    max_tensor_mb: float = option(256.0, help="largest tensor constant folding may create (MB)")

    def __post_init__(self):
        check_range("max_rounds", self.max_rounds, 1, MAX_ROUNDS)
        check_range("max_tensor_mb", self.max_tensor_mb, 0, MAX_TENSOR_MB)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        steps: list[Pass] = []
        if self.freeze_initializers:
            steps.append(FreezeInitializers())
        steps += [RemoveIdentity(), ConstantFolding(max_tensor_mb=self.max_tensor_mb), SimplifyShapes()]
        if self.fold_pad:
            steps += [ExplicitPads(), FoldPadIntoConv()]
        if self.fold_batchnorm:
            steps.append(FoldBatchNorm())
        if self.fold_affine:
            steps.append(FoldConvAffine())
        if self.flush_subnormals:  # last: folding can make new ones
            steps.append(FlushSubnormals())
        stats: dict[str, dict] = {}
        modified = False
        nodes_before = len(model.graph.node)
        for _ in range(max(1, self.max_rounds)):
            round_changed = False
            for step in steps:
                result = step(model, ctx, copy=False)
                model = result.model
                if result.modified:
                    round_changed = True
                    acc = stats.setdefault(step.name, {})
                    for k, v in result.stats.items():
                        if isinstance(v, (int, float)):
                            acc[k] = acc.get(k, 0) + v
            modified |= round_changed
            if not round_changed:
                break
        model.remove_unused()
        model.topological_sort()
        del model.graph.value_info[:]
        # a declared output shape the nodes contradict (often visible only now that the shape
        # computations are folded) would fail onnx's full check: dropped, with a warning
        dropped = model.drop_conflicting_shapes()
        if dropped:
            modified = True
            stats["declared-shapes"] = {"dropped": len(dropped)}
        model.infer_shapes()
        stats["nodes"] = {"before": nodes_before, "after": len(model.graph.node)}
        return PassResult(model, modified, stats)
