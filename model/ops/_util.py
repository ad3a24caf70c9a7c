"""Small shared helpers for the ops: argument checks and Triton launch configuration (hardware
facts come from the device's profile, model/ops/hardware.py; settings from model/settings.py)."""
from __future__ import annotations

import contextlib
import contextvars

import torch
import triton
import triton.language as tl

from ..settings import SETTINGS
from .hardware import DeviceProfile, profile_for

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


def check_info(info, device) -> None:
    """The prefill ops' chunk descriptor: an int64 tensor [3] = (row, start, n_valid) on the ops'
    device (the kernels read it there; its values are checked by the references only)."""
    if not isinstance(info, torch.Tensor) or info.dtype != torch.int64:
        raise TypeError(f"info must be an int64 tensor [3] = (row, start, n_valid), got "
                        f"{getattr(info, 'dtype', type(info).__name__)}")
    if tuple(info.shape) != (3,):
        raise ValueError(f"info must be an int64 tensor [3] = (row, start, n_valid), got shape {tuple(info.shape)}")
    if info.device != torch.device(device):
        raise ValueError(f"info must be on {device} (the kernels read it there), got {info.device}")


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round an fp32 tensor through `dtype` and back (a model-dtype rounding point)."""
    return x.to(dtype).to(torch.float32)


# Under Triton's CPU interpreter programs run one after another: launch configs then skip the
# "enough programs to fill the GPU" shrinking (results are identical, tests much faster).
INTERPRET = SETTINGS.interpret


def fill_programs(t: torch.Tensor) -> int:
    """Programs that fill the GPU tensor ``t`` is on (two per SM; 1 under the interpreter)."""
    return profile_for(t).fill_programs


def _import_fill_programs() -> int:
    """FILL_PROGRAMS: fill_programs() of the current device, read once at import; 264 (two per
    SM of an H100/H200) where no GPU is visible. New code should prefer fill_programs(t), which
    follows the device of its tensors."""
    if INTERPRET:
        return 1
    try:
        if torch.cuda.is_available():
            import cugraph_rt
            from .hardware import _device_profile
            return _device_profile(int(cugraph_rt.device.current_device())).fill_programs
    except Exception:  # noqa: BLE001 - a missing or broken driver: the fallback below
        pass
    return 2 * 132


FILL_PROGRAMS = _import_fill_programs()


# ---- programmatic dependent launch (PDL, sm_90+) ---------------------------------------------
# Every decode kernel is launched with the PDL attribute and starts with pdl_wait(USE_GDC): the
# next kernel's programs are scheduled while this one drains and block in griddepcontrol.wait until
# it has completed and its writes are visible, so the launch latency between the ~400 dependent
# kernels of a step overlaps the previous kernel's tail (stream capture keeps these as programmatic
# graph edges). A kernel reads or writes nothing produced by earlier kernels before its wait; since
# each kernel completes only after its own wait returned, the ordering is transitive. Off where the
# device profile has no PDL (before sm_90, the interpreter), where Triton lacks the instructions, or
# with MODEL_PDL=0.
try:
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch, gdc_wait as _gdc_wait
    HAVE_GDC = True
except ImportError:   # an older Triton
    HAVE_GDC = False
_PDL_OFF = {"USE_GDC": False}
_PDL_ON = {"USE_GDC": True, "launch_pdl": True}


_pdl_allowed = contextvars.ContextVar("model_pdl_allowed", default=True)


@contextlib.contextmanager
def pdl_allowed(allowed: bool):
    """Launches inside the block (and a capture of them) use PDL only if `allowed` (and PDL is on
    at all): a prefill step turns it off for its many-wave kernels (SETTINGS.prefill_pdl)."""
    token = _pdl_allowed.set(bool(allowed) and _pdl_allowed.get())
    try:
        yield
    finally:
        _pdl_allowed.reset(token)


def pdl_allowed_here() -> bool:
    """False inside a pdl_allowed(False) block (tools/launch_audit.py records it per launch)."""
    return _pdl_allowed.get()


def pdl_options(profile: DeviceProfile) -> dict:
    """Launch keywords for a kernel taking USE_GDC, on a device of this profile."""
    on = HAVE_GDC and SETTINGS.pdl and profile.supports_pdl and pdl_allowed_here()
    return _PDL_ON if on else _PDL_OFF


def pdl(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking USE_GDC, for the device of tensor `t`."""
    return pdl_options(profile_for(t))


@triton.jit
def pdl_wait(USE_GDC: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one be scheduled."""
    if USE_GDC:
        _gdc_wait()
        _gdc_launch()
