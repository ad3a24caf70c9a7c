"""Device queries: is_available(), device_info(), the current device, memory info."""
from __future__ import annotations

from cuda.bindings import runtime as _rt

from ._args import check_int
from .errors import CudaUnavailableError, call, driver_too_old, driver_version, unavailable_reason

__all__ = ["is_available", "device_info", "device_attributes", "current_device", "mem_get_info",
           "require_cuda"]


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


def _device_arg(device) -> int:
    if device is not None:
        device = check_int(device, "device", minimum=0)
    dev = current_device() if device is None else device
    count = int(call(_rt.cudaGetDeviceCount))
    if dev >= count:
        raise ValueError(f"device must be < {count} (the devices here); got {dev}")
    return dev


def device_attributes(device: int | None = None) -> dict:
    """The launch-relevant facts of a device, read from its properties (no context is created,
    no memory queried): name, compute capability, SM count, shared memory per block (with
    opt-in), L2 size, threads per block, warp size, total memory."""
    dev = _device_arg(device)
    props = call(_rt.cudaGetDeviceProperties, dev)
    name = props.name
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    return {
        "device": dev,
        "name": name,
        "compute_capability": (int(props.major), int(props.minor)),
        "multiprocessors": int(props.multiProcessorCount),
        # (0 where a cuda-bindings release lacks the field)
        "shared_memory_per_block_optin": int(getattr(props, "sharedMemPerBlockOptin", 0)),
        "l2_cache_bytes": int(getattr(props, "l2CacheSize", 0)),
        "max_threads_per_block": int(getattr(props, "maxThreadsPerBlock", 0)),
        "warp_size": int(getattr(props, "warpSize", 0)),
        "total_memory": int(getattr(props, "totalGlobalMem", 0)),
    }


def device_info(device: int | None = None) -> dict:
    """device_attributes() plus free memory, driver and runtime versions of a device."""
    info = device_attributes(device)
    current = int(call(_rt.cudaGetDevice))
    if current != info["device"]:   # cudaMemGetInfo reports the current device
        call(_rt.cudaSetDevice, info["device"])
    try:
        free, total = call(_rt.cudaMemGetInfo)
    finally:
        if current != info["device"]:
            call(_rt.cudaSetDevice, current)
    info.update({
        "total_memory": int(total),
        "free_memory": int(free),
        "driver_version": driver_version(),
        "runtime_version": int(call(_rt.cudaRuntimeGetVersion)),
    })
    return info


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the current device (cudaMemGetInfo)."""
    free, total = call(_rt.cudaMemGetInfo)
    return int(free), int(total)
