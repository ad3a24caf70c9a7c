"""Device queries: is_available(), device_info(), the current device, memory info."""
from __future__ import annotations

from cuda.bindings import runtime as _rt

from .errors import CudaUnavailableError, call, driver_too_old, driver_version, unavailable_reason

__all__ = ["is_available", "device_info", "current_device", "mem_get_info", "require_cuda"]


def require_cuda() -> None:
    """Raise CudaUnavailableError (saying why: no driver, a driver too old for cuda-bindings' CUDA
    major version (naming both), no device) unless usable."""
    if driver_version() == 0 or driver_too_old():
        raise CudaUnavailableError(unavailable_reason(), call="cudaDriverGetVersion")
    n = call(_rt.cudaGetDeviceCount)
    if int(n) == 0:
        raise CudaUnavailableError(unavailable_reason(_rt.cudaError_t.cudaErrorNoDevice),
                                   call="cudaGetDeviceCount")


def is_available() -> bool:
    """True when a driver and at least one CUDA device are usable. Never raises."""
    try:
        require_cuda()
        return True
    except Exception:  # noqa: BLE001
        return False


def current_device() -> int:
    require_cuda()
    return int(call(_rt.cudaGetDevice))


def device_info(device: int | None = None) -> dict:
    """Name, compute capability, SM count, memory, driver and runtime versions of a device."""
    dev = current_device() if device is None else int(device)
    props = call(_rt.cudaGetDeviceProperties, dev)
    name = props.name
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    free, total = call(_rt.cudaMemGetInfo)
    return {
        "device": dev,
        "name": name,
        "compute_capability": (int(props.major), int(props.minor)),
        "multiprocessors": int(props.multiProcessorCount),
        "total_memory": int(total),
        "free_memory": int(free),
        "driver_version": driver_version(),
        "runtime_version": int(call(_rt.cudaRuntimeGetVersion)),
    }


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the current device (cudaMemGetInfo)."""
    free, total = call(_rt.cudaMemGetInfo)
    return int(free), int(total)
