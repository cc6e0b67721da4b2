"""Passes over the sculpt IR. Importing this package registers the built-in passes."""

from sculpt.passes.base import (Pass, PassContext, PassResult, create_pass, get_pass_class, parse_pass_spec,
                                register, registered_passes, registered_temporarily)
from sculpt.passes.canonicalize import Canonicalize
from sculpt.passes.channel_pruning import ChannelPruning
from sculpt.passes.constant_folding import ConstantFolding
from sculpt.passes.dead_channel_elimination import DeadChannelElimination
from sculpt.passes.fire_module import FireModule
from sculpt.passes.group_shuffle import GroupShuffle
from sculpt.passes.depthwise_separable import DepthwiseSeparable
from sculpt.passes.fold_batchnorm import FoldBatchNorm
from sculpt.passes.fold_conv_affine import FoldConvAffine
from sculpt.passes.fold_pad_into_conv import FoldPadIntoConv
from sculpt.passes.explicit_pads import ExplicitPads
from sculpt.passes.flush_subnormals import FlushSubnormals
from sculpt.passes.low_rank import LowRank
from sculpt.passes.freeze_initializers import FreezeInitializers
from sculpt.passes.remove_identity import RemoveIdentity
from sculpt.passes.simplify_shapes import SimplifyShapes
from sculpt.passes.sparsify import Sparsify
from sculpt.passes.qdq import QDQ
from sculpt.passes.cross_layer_equalization import CrossLayerEqualization
from sculpt.passes.dynamic_quantization import DynamicQuantization
from sculpt.passes.layer_pruning import LayerPruning
from sculpt.passes.distill import Distill
from sculpt.passes.iterative_pruning import IterativePruning
from sculpt.passes.weight_quantization import WeightQuantization
from sculpt.passes.pipeline import Pipeline, PipelineResult

__all__ = [
    "Pass", "PassContext", "PassResult", "Pipeline", "PipelineResult", "create_pass", "get_pass_class",
    "parse_pass_spec", "register", "registered_passes", "registered_temporarily", "Canonicalize", "ConstantFolding", "FoldBatchNorm",
    "FoldConvAffine", "FreezeInitializers", "DeadChannelElimination", "ChannelPruning", "RemoveIdentity", "SimplifyShapes",
    "QDQ", "CrossLayerEqualization", "DynamicQuantization", "LayerPruning", "WeightQuantization", "Distill",
]
