"""The prefill's dense GEMM, out = x @ w.T through cuBLAS (torch.mm), shared by the bf16 path and the
int4 reference (which dequantizes first), so that both round alike.

An output width that is not a multiple of 8 (router + shared expert: 1,281 at 35b-a3b) is two
GEMMs, the aligned rows and the rest: cuBLAS takes a slow kernel for the whole (H100, 4,096 tokens:
282 us, 80 TFLOP/s, also with the output rows 16-byte aligned, where the other projections run at
~780 TFLOP/s). Write into rows padded to a multiple of 8 to keep the aligned part's rows aligned."""
from __future__ import annotations

import torch

__all__ = ["ALIGN", "aligned_width", "mm_rows_aligned"]

ALIGN = 8   # output columns: 16 bytes of bf16, the alignment cuBLAS's fast kernels want


def aligned_width(n: int) -> int:
    """n rounded up to a multiple of ALIGN: the row width of a buffer mm_rows_aligned writes into."""
    return -(-n // ALIGN) * ALIGN


def mm_rows_aligned(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out = x @ w.T, as one torch.mm when w's rows are a multiple of ALIGN (or fewer), else two."""
    n = w.shape[0]
    n8 = n // ALIGN * ALIGN
    if n8 in (0, n):
        torch.mm(x, w.t(), out=out)
    else:
        torch.mm(x, w[:n8].t(), out=out[:, :n8])
        torch.mm(x, w[n8:].t(), out=out[:, n8:])
