"""Small shared helpers for the ops: argument checks and Triton launch configuration."""
from __future__ import annotations

import os

import torch

MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_rows(name: str, t: torch.Tensor, rows: int, cols: int) -> None:
    """`t` is a [rows, >=cols] matrix whose rows are contiguous (a row may be a slice of a wider
    buffer, e.g. a column range of a fused projection output)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{rows}, {cols}], got shape {tuple(t.shape)}")
    if t.shape[0] != rows or t.shape[1] != cols:
        raise ValueError(f"{name} must have shape [{rows}, {cols}], got {tuple(t.shape)}")
    if cols > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim, got strides {t.stride()}")


def as_rows(name: str, t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """View `t` ([rows, ...] with contiguous trailing dims) as [rows, cols]."""
    if t.dim() > 2:
        if t[0].numel() != cols or not t[0].is_contiguous():
            raise ValueError(f"{name}: trailing dims must be contiguous with {cols} elements, "
                             f"got shape {tuple(t.shape)} strides {t.stride()}")
        t = t.view(t.shape[0], -1) if t.is_contiguous() else t.as_strided((t.shape[0], cols), (t.stride(0), 1))
    check_rows(name, t, rows, cols)
    return t


def check_contiguous(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round an fp32 tensor through `dtype` and back (a model-dtype rounding point)."""
    return x.to(dtype).to(torch.float32)


# Under Triton's CPU interpreter programs run one after another: launch configs then skip the
# "enough programs to fill 132 SMs" shrinking (results are identical, tests much faster).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FILL_PROGRAMS = 1 if INTERPRET else 2 * 132
