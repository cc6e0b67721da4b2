"""R×1 blocks of a 2-D weight matrix (R output rows × 1 input column): the unit the sparsify pass
prunes and the block-sparse kernels (``sculpt.backends.tvm.sparse``) skip."""

from __future__ import annotations

import numpy as np

BLOCK_ROWS = (1, 4, 8, 16)  # the block shapes sculpt prunes and packs: R×1 along output channels


def blocks_of(matrix: np.ndarray, block_rows: int) -> np.ndarray:
    """[rows, cols] → [block_rows_count, cols, R], zero-padding the last block row."""
    rows, cols = matrix.shape
    n = -(-rows // block_rows)
    padded = np.zeros((n * block_rows, cols), dtype=matrix.dtype)
    padded[:rows] = matrix
    return padded.reshape(n, block_rows, cols).transpose(0, 2, 1)


def zero_fraction(matrix: np.ndarray) -> float:
    matrix = np.asarray(matrix)
    return float(np.mean(matrix == 0)) if matrix.size else 0.0


def block_zero_fraction(matrix: np.ndarray, block_rows: int) -> float:
    """Fraction of the R×1 blocks of a 2-D matrix that are entirely zero (padding rows count as zero)."""
    blocks = blocks_of(np.asarray(matrix), block_rows)
    return float(np.mean(~np.any(blocks != 0, axis=2))) if blocks.size else 0.0


def detect_block_rows(matrix: np.ndarray, tolerance: float = 0.01) -> int:
    """The largest R in :data:`BLOCK_ROWS` (not above the row count) whose R×1 blocks capture the
    matrix's zeros: block zero fraction ≥ element zero fraction − ``tolerance``. 1 if none does."""
    matrix = np.asarray(matrix)
    zeros = zero_fraction(matrix)
    for r in sorted(BLOCK_ROWS, reverse=True):
        if r <= matrix.shape[0] and _zero_block_element_fraction(matrix, r) >= zeros - tolerance:
            return r
    return 1


def _zero_block_element_fraction(matrix: np.ndarray, block_rows: int) -> float:
    """Fraction of the matrix's elements that lie in all-zero R×1 blocks. Unlike the block count, it
    weighs a short last block row (rows not a multiple of R) by the rows it really has."""
    if matrix.size == 0:
        return 0.0
    zero_blocks = ~np.any(blocks_of(matrix, block_rows) != 0, axis=2)  # [block rows, columns]
    rows = np.full(zero_blocks.shape[0], block_rows)
    rows[-1] = matrix.shape[0] - block_rows * (zero_blocks.shape[0] - 1)
    return float((zero_blocks * rows[:, None]).sum() / matrix.size)
