"""The one device kernel cugraph_rt compiles itself: it sets a conditional node's handle from an
int32 flag in device memory (``cudaGraphSetConditional(handle, *flag != 0)``).

Compiled at run time with NVRTC (``cuda.bindings.nvrtc``) to a cubin for the device's arch (PTX
for the newest arch NVRTC knows where it does not know the device's), cached per arch; loaded
once per device with the driver API and launched with ``cuLaunchKernel`` on a stream, so inside a
capture it becomes one kernel node (grid 1, block 1).

``cudaGraphSetConditional`` is a device-runtime builtin that ptxas resolves: the source declares it
itself, so no CUDA headers and no device-runtime link are needed (checked: NVRTC 13.5 compiles it
whole-program to an sm_90 cubin on a machine with no GPU).
"""
from __future__ import annotations

import ctypes
import threading

from ._args import check_int
from .errors import CudaError, CudaUnavailableError, unavailable_reason

__all__ = ["CONDITION_KERNEL_NAME", "CONDITION_KERNEL_SOURCE", "nvrtc_version", "compile_condition_kernel",
           "condition_kernel", "launch_set_condition"]

CONDITION_KERNEL_NAME = "cugraph_rt_set_condition"

# The handle is a 64-bit integer (cudaGraphConditionalHandle); the flag's meaning is the caller's.
CONDITION_KERNEL_SOURCE = r"""
typedef unsigned long long cugraph_rt_cond_handle;
extern "C" __device__ void cudaGraphSetConditional(cugraph_rt_cond_handle handle, unsigned int value);

extern "C" __global__ void cugraph_rt_set_condition(cugraph_rt_cond_handle handle, const int* flag)
{
    if (blockIdx.x == 0 && threadIdx.x == 0)
        cudaGraphSetConditional(handle, *flag != 0 ? 1u : 0u);
}
"""

_lock = threading.Lock()
_images: dict = {}     # arch (e.g. 90) -> (kind "cubin" | "ptx", bytes)
_functions: dict = {}  # (device ordinal, arch) -> (CUmodule, CUfunction)


def _nvrtc():
    """cuda.bindings.nvrtc, after checking that libnvrtc loads; CudaUnavailableError otherwise."""
    try:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # noqa: BLE001 - the loader raises its own types
        raise CudaUnavailableError(
            f"NVRTC (libnvrtc) cannot be loaded: {exc}. Conditional nodes compile their condition "
            "kernel at run time: install the NVRTC that matches the CUDA major version "
            "(pip install nvidia-cuda-nvrtc; a CUDA build of torch brings it)",
            call="nvrtcVersion") from exc
    if int(err) != 0:
        raise CudaUnavailableError(f"nvrtcVersion failed: {err}", call="nvrtcVersion")
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC that cuda.bindings loads; CudaUnavailableError where none."""
    nvrtc = _nvrtc()
    _, major, minor = nvrtc.nvrtcVersion()
    return int(major), int(minor)


def _supported_archs(nvrtc) -> list[int]:
    try:
        err, archs = nvrtc.nvrtcGetSupportedArchs()
        return sorted(int(a) for a in archs) if int(err) == 0 else []
    except Exception:  # noqa: BLE001
        return []


def _program_log(nvrtc, prog) -> str:
    try:
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * int(n)
        nvrtc.nvrtcGetProgramLog(prog, buf)
        return buf.rstrip(b"\x00 ").decode(errors="replace")
    except Exception:  # noqa: BLE001
        return "(no log)"


def _compile(nvrtc, option: bytes, want_cubin: bool) -> bytes:
    err, prog = nvrtc.nvrtcCreateProgram(CONDITION_KERNEL_SOURCE.encode(), b"cugraph_rt_cond.cu",
                                         0, [], [])
    if int(err) != 0:
        raise CudaError(f"nvrtcCreateProgram failed: {err}", call="nvrtcCreateProgram")
    try:
        opts = [option, b"--std=c++17"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            raise CudaError(f"NVRTC could not compile the condition kernel ({option.decode()}): "
                            f"{err}; log: {_program_log(nvrtc, prog)}", call="nvrtcCompileProgram")
        size_fn, get_fn = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if want_cubin
                           else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        err, n = size_fn(prog)
        if int(err) != 0 or int(n) == 0:
            raise CudaError(f"NVRTC produced no {'cubin' if want_cubin else 'PTX'} for "
                            f"{option.decode()}: {err}", call=size_fn.__name__)
        buf = b" " * int(n)
        (err,) = get_fn(prog, buf)
        if int(err) != 0:
            raise CudaError(f"{get_fn.__name__} failed: {err}", call=get_fn.__name__)
        return buf
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_condition_kernel(arch: int) -> tuple[str, bytes]:
    """("cubin", image) for ``arch`` (compute capability as major*10+minor, e.g. 90), or
    ("ptx", text) for the newest arch NVRTC knows below it where it does not know ``arch``.
    Cached per arch; needs libnvrtc but no GPU."""
    arch = check_int(arch, "arch", minimum=50)
    with _lock:
        hit = _images.get(arch)
        if hit is not None:
            return hit
    nvrtc = _nvrtc()
    archs = _supported_archs(nvrtc)
    if not archs or arch in archs:
        image = ("cubin", _compile(nvrtc, f"--gpu-architecture=sm_{arch}".encode(), True))
    else:
        older = [a for a in archs if a <= arch]
        if not older:
            raise CudaUnavailableError(
                f"NVRTC {'.'.join(map(str, nvrtc_version()))} supports archs {archs}, none at or "
                f"below the device's sm_{arch}", call="nvrtcGetSupportedArchs")
        # PTX the driver JIT-compiles for the device: forward compatible, unlike a cubin
        image = ("ptx", _compile(nvrtc, f"--gpu-architecture=compute_{older[-1]}".encode(), False))
    with _lock:
        _images.setdefault(arch, image)
        return _images[arch]


def _drv(result, name: str):
    code = result[0]
    if int(code) != 0:
        from .errors import check
        return check(result, name)   # raises the typed error with the driver's name and text
    return result[1] if len(result) == 2 else result[1:]


def _relaxed_capture_mode():
    """A context in which this thread's calls are not checked against a capture underway: module
    loading may count as an unsafe call, and must not invalidate the capture that asked for it."""
    from cuda.bindings import runtime as _rt

    class _Relaxed:
        def __enter__(self):
            err, self.prev = _rt.cudaThreadExchangeStreamCaptureMode(
                _rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed)
            self.ok = int(err) == 0
            return self

        def __exit__(self, *exc):
            if self.ok:
                _rt.cudaThreadExchangeStreamCaptureMode(self.prev)
            return False

    return _Relaxed()


def condition_kernel(device: int | None = None):
    """The loaded condition kernel (a driver ``CUfunction``) of ``device`` (default: the current
    one), compiled and loaded on first use. Call it once before a capture to keep NVRTC and the
    module load out of the captured region (they are allowed inside one: the load runs with the
    thread's capture checks relaxed)."""
    from cuda.bindings import driver as _dr
    from cuda.bindings import runtime as _rt

    from .errors import call
    if device is not None:
        device = check_int(device, "device", minimum=0)
    from .device import require_cuda
    require_cuda()
    current = int(call(_rt.cudaGetDevice))
    dev = current if device is None else device
    A = _rt.cudaDeviceAttr
    major = int(call(_rt.cudaDeviceGetAttribute, A.cudaDevAttrComputeCapabilityMajor, dev))
    minor = int(call(_rt.cudaDeviceGetAttribute, A.cudaDevAttrComputeCapabilityMinor, dev))
    arch = major * 10 + minor
    key = (dev, arch)
    with _lock:
        hit = _functions.get(key)
    if hit is not None:
        return hit[1]
    kind, image = compile_condition_kernel(arch)   # host work only
    # the module load may count as an unsafe call during a capture: relax this thread's checks
    with _relaxed_capture_mode():
        # cudaSetDevice (CUDA 12+) makes the device's primary context current for the driver API
        call(_rt.cudaSetDevice, dev)
        try:
            try:
                module = _drv(_dr.cuModuleLoadData(image), "cuModuleLoadData")
            except CudaError as exc:
                raise CudaError(f"{exc} (loading the condition kernel's {kind} for sm_{arch}; "
                                f"{unavailable_reason()})", call="cuModuleLoadData") from exc
            func = _drv(_dr.cuModuleGetFunction(module, CONDITION_KERNEL_NAME.encode()),
                        "cuModuleGetFunction")
        finally:
            if dev != current:
                call(_rt.cudaSetDevice, current)
    with _lock:
        _functions.setdefault(key, (module, func))
        return _functions[key][1]


def launch_set_condition(handle: int, flag_ptr: int, stream: int) -> None:
    """Launch the condition kernel on ``stream`` (a raw handle): inside a capture, one kernel node
    that sets ``handle`` to ``*(int32*)flag_ptr != 0`` each time it runs."""
    from cuda.bindings import driver as _dr
    handle = check_int(handle, "handle", minimum=0)
    flag_ptr = check_int(flag_ptr, "flag_ptr", minimum=1)
    stream = check_int(stream, "stream", minimum=0)
    func = condition_kernel()
    args = ((handle, flag_ptr), (ctypes.c_ulonglong, ctypes.c_void_p))
    _drv(_dr.cuLaunchKernel(func, 1, 1, 1, 1, 1, 1, 0, _dr.CUstream(stream), args, 0),
         "cuLaunchKernel")
