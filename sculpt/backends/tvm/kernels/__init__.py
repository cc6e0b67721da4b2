"""sculpt's CPU kernels for the TVM backend (x86 AVX2/AVX-512, aarch64 NEON): register-tiled
conv2d / 1x1 / depthwise / matmul / pooling schedules applied to the legalized and fused Relax
module, with tile sizes from a per-target heuristic or a cached quick local search."""

from sculpt.backends.tvm.kernels.pipeline import compile_with_kernels, sculpt_relax_pipeline
from sculpt.backends.tvm.kernels.rules import schedule_module
from sculpt.backends.tvm.kernels.target_traits import TargetTraits, host_target, traits_of

__all__ = ["compile_with_kernels", "sculpt_relax_pipeline", "schedule_module", "TargetTraits",
           "host_target", "traits_of"]
