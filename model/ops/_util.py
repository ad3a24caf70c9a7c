"""Small shared helpers for the ops: argument checks and Triton launch configuration."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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


# ---- programmatic dependent launch (PDL, sm_90+) ---------------------------------------------
# Every decode kernel is launched with the PDL attribute and starts with pdl_wait(USE_GDC): the
# next kernel's programs are scheduled while this one drains and block in griddepcontrol.wait until
# it has completed and its writes are visible, so the launch latency between the ~400 dependent
# kernels of a step overlaps the previous kernel's tail (stream capture keeps these as programmatic
# graph edges). A kernel reads or writes nothing produced by earlier kernels before its wait; since
# each kernel completes only after its own wait returned, the ordering is transitive. Off under the
# interpreter, before sm_90, where Triton lacks the instructions, or with MODEL_PDL=0.
try:
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch, gdc_wait as _gdc_wait
    HAVE_GDC = True
except ImportError:   # an older Triton
    HAVE_GDC = False
_PDL_OFF = {"USE_GDC": False}
_PDL_ON = {"USE_GDC": True, "launch_pdl": True}
_pdl_by_device: dict[int, dict] = {}


def pdl(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking USE_GDC, for the device of tensor `t`."""
    if t.device.type != "cuda":
        return _PDL_OFF
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    opts = _pdl_by_device.get(idx)
    if opts is None:
        on = (HAVE_GDC and not INTERPRET and os.environ.get("MODEL_PDL", "1") != "0"
              and torch.cuda.get_device_capability(idx)[0] >= 9)
        opts = _pdl_by_device[idx] = _PDL_ON if on else _PDL_OFF
    return opts


@triton.jit
def pdl_wait(USE_GDC: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one be scheduled."""
    if USE_GDC:
        _gdc_wait()
        _gdc_launch()
