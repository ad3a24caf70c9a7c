"""The one error funnel for every cuda.bindings call, and the library's exceptions.

cuda.bindings calls return tuples whose first element is the error code: ``(err,)``,
``(err, value)`` or ``(err, a, b, ...)``. :func:`check` turns a failure into an exception that
names the call, the CUDA error name and its text, and returns the value(s) otherwise.
"""
from __future__ import annotations

from cuda.bindings import runtime as _rt

__all__ = [
    "CugraphRtError", "CudaError", "CudaUnavailableError", "CaptureError", "ClosedError",
    "InputError", "InputTypeError", "check", "call", "driver_call",
]


class CugraphRtError(RuntimeError):
    """Base class of every error this library raises on its own account."""


class CudaError(CugraphRtError):
    """A CUDA call failed. ``call`` names the call, ``name``/``text`` the CUDA error."""

    def __init__(self, message: str, *, call: str | None = None, code=None,
                 name: str | None = None, text: str | None = None):
        super().__init__(message)
        self.call = call
        self.code = code
        self.name = name
        self.text = text


class CudaUnavailableError(CudaError):
    """No usable CUDA: no driver, a driver too old, or no device. The message says which."""


class CaptureError(CudaError):
    """A stream capture was invalidated, is unsupported, or captured nothing."""


class ClosedError(CugraphRtError):
    """An object was used after ``close()``."""


class InputError(CugraphRtError, ValueError):
    """A call's inputs do not match what the handle was built for (shape, device, layout).
    Also a ValueError; raised before anything is copied, so the rejected call changes nothing."""


class InputTypeError(InputError, TypeError):
    """A call's inputs have the wrong names, types or dtypes (also a TypeError)."""


_E = _rt.cudaError_t


def _codes(*names: str) -> frozenset:
    """Error codes by name, skipping any a cuda-bindings release lacks (12.9 through 13.x)."""
    return frozenset(getattr(_E, n) for n in names if hasattr(_E, n))


_UNAVAILABLE = _codes(
    "cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorSystemDriverMismatch",
    "cudaErrorCallRequiresNewerDriver", "cudaErrorIncompatibleDriverContext",
)
_CAPTURE = _codes(
    "cudaErrorStreamCaptureUnsupported", "cudaErrorStreamCaptureInvalidated",
    "cudaErrorStreamCaptureMerge", "cudaErrorStreamCaptureUnmatched",
    "cudaErrorStreamCaptureUnjoined", "cudaErrorStreamCaptureIsolation",
    "cudaErrorStreamCaptureImplicit", "cudaErrorStreamCaptureWrongThread",
    "cudaErrorCapturedEvent",
)

CAPTURE_HINT = (
    "A stream capture breaks when the captured code synchronizes with the host "
    "(.item(), .cpu(), .tolist(), torch.cuda.synchronize(), cudaStreamSynchronize), runs a "
    "Triton autotune (run every autotune key during warmup), makes a blocking allocation or "
    "cudaMemcpy, or uses the legacy default stream. Move that work out of the captured step."
)


def _error_strings(code) -> tuple[str, str]:
    """(name, text) of a runtime or driver error code; never raises."""
    try:
        if isinstance(code, _E):
            name = _rt.cudaGetErrorName(code)[1]
            text = _rt.cudaGetErrorString(code)[1]
        else:  # driver CUresult
            from cuda.bindings import driver as _dr
            name = _dr.cuGetErrorName(code)[1]
            text = _dr.cuGetErrorString(code)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        return name, text
    except Exception:  # noqa: BLE001 - error reporting must not fail
        return getattr(code, "name", str(code)), "(no description available)"


def driver_version() -> int:
    """The installed driver's CUDA version as an int (12040 = 12.4); 0 where no driver."""
    try:
        err, v = _rt.cudaDriverGetVersion()
        return int(v) if err == _E.cudaSuccess else 0
    except Exception:  # noqa: BLE001
        return 0


def _fmt_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def runtime_version() -> int:
    """The CUDA runtime version cuda-bindings implements (13050 = 13.5); 0 where unknown."""
    try:
        err, v = _rt.cudaRuntimeGetVersion()
        return int(v) if err == _E.cudaSuccess else 0
    except Exception:  # noqa: BLE001
        return 0


def driver_too_old(drv: int | None = None, rtv: int | None = None) -> bool:
    """True where a driver is installed but supports an older CUDA major version than the runtime
    cuda-bindings implements (minor versions within one major are compatible)."""
    drv = driver_version() if drv is None else drv
    rtv = runtime_version() if rtv is None else rtv
    return 0 < drv and 0 < rtv and drv // 1000 < rtv // 1000


def _too_old_reason(drv: int, rtv: int) -> str:
    try:
        from cuda import bindings
        pkg = f"cuda-bindings {bindings.__version__}"
    except Exception:  # noqa: BLE001
        pkg = "cuda-bindings"
    major = drv // 1000
    return (f"the NVIDIA driver is too old: it supports CUDA {_fmt_version(drv)}, and {pkg} needs a driver "
            f"for CUDA {rtv // 1000}.0 or newer; update the driver, or install the cuda-bindings major "
            f"version that matches it (pip install 'cuda-bindings>={major}.0,<{major + 1}') together with a "
            f"torch built for CUDA {major}")


def unavailable_reason(code=None) -> str:
    """Why CUDA is unusable, naming the driver and runtime versions (and, for a driver too old,
    the version needed)."""
    drv = driver_version()
    rtv = runtime_version()
    versions = f"driver CUDA version {_fmt_version(drv)}, runtime {_fmt_version(rtv)}"
    if drv == 0:
        return f"no NVIDIA driver found ({versions}): CUDA graphs need an NVIDIA GPU and driver"
    if driver_too_old(drv, rtv):
        return _too_old_reason(drv, rtv)
    if code == _E.cudaErrorNoDevice:
        return f"the NVIDIA driver is installed but no CUDA device is visible ({versions})"
    if code in _UNAVAILABLE:
        return f"the NVIDIA driver is too old for this call or runtime ({versions})"
    return f"CUDA is unusable ({versions})"


def _raise(code, call: str | None):
    name, text = _error_strings(code)
    try:  # a failed call also sets the runtime's last error: read it, so no later call sees it
        _rt.cudaGetLastError()
    except Exception:  # noqa: BLE001
        pass
    where = f"{call} failed" if call else "CUDA call failed"
    if code in _UNAVAILABLE:
        raise CudaUnavailableError(f"{where}: {name} ({text}); {unavailable_reason(code)}",
                                   call=call, code=code, name=name, text=text)
    if code in _CAPTURE:
        raise CaptureError(f"{where}: {name} ({text}). {CAPTURE_HINT}",
                           call=call, code=code, name=name, text=text)
    raise CudaError(f"{where}: {name} ({text})", call=call, code=code, name=name, text=text)


def _is_success(code) -> bool:
    return int(code) == 0


def check(result, call: str | None = None):
    """Raise for a failed cuda.bindings result tuple, else return its value(s).

    ``(err,)`` gives None, ``(err, v)`` gives v, ``(err, a, b, ...)`` gives ``(a, b, ...)``.
    """
    if not isinstance(result, tuple) or not result:
        raise TypeError(f"check() expects a cuda.bindings result tuple (err, ...); got {result!r}")
    code = result[0]
    if not _is_success(code):
        _raise(code, call)
    if len(result) == 1:
        return None
    if len(result) == 2:
        return result[1]
    return result[1:]


def call(fn, *args):
    """``check(fn(*args), fn.__name__)``: a runtime call through the funnel, named."""
    return check(fn(*args), getattr(fn, "__name__", None))


def driver_call(fn, *args):
    """A driver-API call through the funnel; a missing driver library becomes
    CudaUnavailableError rather than the loader's exception."""
    name = getattr(fn, "__name__", None)
    try:
        result = fn(*args)
    except CugraphRtError:
        raise
    except Exception as exc:  # noqa: BLE001 - the loader raises its own types
        if "driver" in str(exc).lower() or "libcuda" in str(exc).lower():
            raise CudaUnavailableError(f"{name} failed: {exc}; {unavailable_reason()}",
                                       call=name) from exc
        raise
    return check(result, name)
