"""Block-sparse (BSR) TVM kernels for weights pruned by the ``sparsify`` pass.

- :mod:`.bsr`: packing a constant weight into R×1 blocks (R = 1, 4, 8, 16 output channels);
- :mod:`.kernels`: scheduled TIR — the BSR × dense panel kernel (1×1 conv, k×k conv through im2col,
  MatMul/Gemm), the dense kernel of the same shape and style, im2col;
- :mod:`.rewrite`: ``apply_sparse_kernels(mod, target, mode)``, the Relax rewrite with a per-layer
  decision report;
- :mod:`.timing`: measuring kernels on the host, and the cost model for targets that cannot be
  measured here.

Imported lazily: nothing here loads TVM until a kernel is built.
"""

from sculpt.backends.tvm.sparse.bsr import BLOCK_ROWS, BSRMatrix, detect_block_rows, pack_bsr
from sculpt.backends.tvm.sparse.rewrite import LayerDecision, apply_sparse_kernels, layer_names_from_onnx, weight_key

__all__ = ["BLOCK_ROWS", "BSRMatrix", "LayerDecision", "apply_sparse_kernels", "detect_block_rows",
           "layer_names_from_onnx", "pack_bsr", "weight_key"]
