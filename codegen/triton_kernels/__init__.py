"""Triton kernels, one module per op. Imported only when a Triton kernel runs (see `SparseOp.triton`)."""
