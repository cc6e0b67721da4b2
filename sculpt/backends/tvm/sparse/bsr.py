"""Block compressed sparse rows (BSR) of a constant weight matrix, with blocks of R output rows × 1 column.

The sparse kernels compute ``Y[o, n] = Σ_k S[o, k] · X[k, n]``; ``S`` is stored block row by block
row: block row ``i`` covers output rows ``i·R … i·R+R-1``, and holds one dense R-vector per input
column ``k`` where any of those R weights is nonzero. Arrays (the layout the kernels read):

- ``data``    float32 [nnzb, R]: the blocks, in block-row order;
- ``indices`` int32 [nnzb]: the input column of each block;
- ``indptr``  int32 [block_rows + 1]: block row ``i`` owns blocks ``indptr[i] … indptr[i+1]-1``.

When the row count is not a multiple of R the last block row is padded with zero rows (the kernels
do not store them). The block analysis (which R fits a matrix's zeros) is ``sculpt.ir.blocks``: the
sparsify pass uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sculpt.ir.blocks import BLOCK_ROWS, block_zero_fraction, blocks_of, detect_block_rows, zero_fraction

__all__ = ["BLOCK_ROWS", "BSRMatrix", "block_zero_fraction", "blocks_of", "detect_block_rows", "pack_bsr",
           "zero_fraction"]


@dataclass(frozen=True)
class BSRMatrix:
    shape: tuple[int, int]  # (rows, columns) of the dense matrix
    block_rows: int
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def nnz_blocks(self) -> int:
        return int(self.indices.size)

    @property
    def n_block_rows(self) -> int:
        return int(self.indptr.size - 1)

    @property
    def density(self) -> float:
        """Fraction of the R×1 blocks that are stored."""
        total = self.n_block_rows * self.shape[1]
        return self.nnz_blocks / total if total else 0.0

    def used_columns(self) -> np.ndarray:
        """Sorted input columns that at least one block reads."""
        return np.unique(self.indices)

    def with_columns_renumbered(self, columns: np.ndarray) -> "BSRMatrix":
        """The same matrix over only ``columns`` (sorted, a superset of the used ones), so a kernel can
        read a gathered input that holds just those rows."""
        position = np.full(self.shape[1], -1, dtype=np.int64)
        position[columns] = np.arange(len(columns))
        new = position[self.indices]
        if (new < 0).any():
            raise ValueError("renumbering drops a column that a block reads")
        return BSRMatrix((self.shape[0], len(columns)), self.block_rows, self.data, new.astype(np.int32), self.indptr)

    def to_dense(self) -> np.ndarray:
        rows, cols = self.shape
        r = self.block_rows
        out = np.zeros((self.n_block_rows * r, cols), dtype=self.data.dtype)
        for i in range(self.n_block_rows):
            lo, hi = self.indptr[i], self.indptr[i + 1]
            out[i * r:(i + 1) * r, self.indices[lo:hi]] = self.data[lo:hi].T
        return out[:rows]

    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data, indices, indptr) as the kernels take them; an empty matrix gets one zero block so that
        no buffer has size 0."""
        if self.nnz_blocks:
            return np.ascontiguousarray(self.data, np.float32), self.indices, self.indptr
        return np.zeros((1, self.block_rows), np.float32), np.zeros(1, np.int32), self.indptr


def pack_bsr(matrix: np.ndarray, block_rows: int) -> BSRMatrix:
    """Pack a dense 2-D weight [rows, cols] into R×1 blocks (R = ``block_rows``); all-zero blocks are
    dropped."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"BSR packing needs a 2-D matrix, got shape {list(matrix.shape)}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be ≥ 1, got {block_rows}")
    blocks = blocks_of(matrix.astype(np.float32), block_rows)
    nonzero = np.any(blocks != 0, axis=2)  # [n, cols]
    indptr = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int32)
    rows, cols = np.nonzero(nonzero)  # row-major: block-row order, columns ascending
    return BSRMatrix(tuple(matrix.shape), block_rows, np.ascontiguousarray(blocks[rows, cols]),
                     cols.astype(np.int32), indptr)
