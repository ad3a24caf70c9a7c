"""DeviceBuffer (cudaMalloc, or cudaMallocAsync on a stream / from a pool), HostBuffer (pinned),
zero-copy views for any array library, and cudaMemcpyAsync copies in every direction."""
from __future__ import annotations

import ctypes
import math

from cuda.bindings import runtime as _rt

from ._args import check_int
from ._lifetime import Owned
from .device import require_cuda
from .errors import call

__all__ = ["DeviceBuffer", "HostBuffer", "copy_async", "memset_async", "live_allocations"]

import threading

_live_lock = threading.Lock()
_live = {"device_buffers": 0, "device_bytes": 0, "host_buffers": 0, "host_bytes": 0}


def _count(kind: str, nbytes: int, sign: int) -> None:
    with _live_lock:
        _live[f"{kind}_buffers"] += sign
        _live[f"{kind}_bytes"] += sign * nbytes


def live_allocations() -> dict:
    """Buffers this library has allocated and not yet released (DeviceBuffer: device_*,
    HostBuffer, pinned: host_*), counts and bytes: a leak check needing no driver query."""
    with _live_lock:
        return dict(_live)

_DEFAULT = _rt.cudaMemcpyKind.cudaMemcpyDefault


def _ptr(x, name: str = "pointer") -> int:
    """Device/host address of a buffer, a torch tensor, an int, or an array-interface object."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an address, a buffer or an array; got {x!r}")
    if isinstance(x, int):
        return x
    if isinstance(x, (DeviceBuffer, HostBuffer)):
        return x.ptr
    if hasattr(x, "data_ptr"):
        return int(x.data_ptr())
    for attr in ("__cuda_array_interface__", "__array_interface__"):
        iface = getattr(x, attr, None)
        if iface is not None:
            return int(iface["data"][0])
    raise TypeError(f"{name}: cannot take the address of {type(x).__name__}")


def copy_async(dst, src, nbytes: int, stream) -> None:
    """cudaMemcpyAsync of ``nbytes`` (direction inferred through unified addressing)."""
    from .stream import stream_handle
    nbytes = check_int(nbytes, "nbytes", minimum=0)
    handle = stream_handle(stream)
    call(_rt.cudaMemcpyAsync, _ptr(dst, "dst"), _ptr(src, "src"), nbytes, _DEFAULT, handle)


def memset_async(dst, value: int, nbytes: int, stream) -> None:
    """cudaMemsetAsync of ``nbytes`` bytes to ``value`` (0..255)."""
    from .stream import stream_handle
    value = check_int(value, "value", minimum=0)
    if value > 255:
        raise ValueError(f"value must be a byte (0..255); got {value}")
    nbytes = check_int(nbytes, "nbytes", minimum=0)
    handle = stream_handle(stream)
    call(_rt.cudaMemsetAsync, _ptr(dst, "dst"), value, nbytes, handle)


def _typestr(dtype) -> tuple[str, int]:
    import numpy as np
    dt = np.dtype(dtype)
    return dt.str, dt.itemsize


class _CudaArrayView:
    """A typed window on device memory exposing ``__cuda_array_interface__`` (v3)."""

    def __init__(self, owner, ptr: int, shape, dtype, stream: int | None):
        self._owner = owner  # keeps the memory alive
        typestr, itemsize = _typestr(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.__cuda_array_interface__ = {
            "shape": self.shape, "typestr": typestr, "data": (int(ptr), False),
            "strides": None, "version": 3,
            **({"stream": int(stream)} if stream else {}),
        }


def _view_shape(nbytes: int, dtype, shape) -> tuple[tuple[int, ...], int]:
    _, itemsize = _typestr(dtype)
    if shape is None:
        shape = (nbytes // itemsize,)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    need = math.prod(shape) * itemsize
    if need > nbytes:
        raise ValueError(f"view of shape {shape} and dtype {dtype} needs {need} bytes; "
                         f"the buffer holds {nbytes}")
    return shape, itemsize


def _free(ptr: int, nbytes: int) -> None:
    _count("device", nbytes, -1)
    _rt.cudaFree(ptr)


def _free_async(ptr: int, stream, nbytes: int) -> None:
    """Stream-ordered free on the allocating stream; if that Stream was closed meanwhile, a plain
    cudaFree (which also frees stream-ordered memory, after synchronising)."""
    _count("device", nbytes, -1)
    if getattr(stream, "closed", False):
        _rt.cudaFree(ptr)
    else:
        _rt.cudaFreeAsync(ptr, int(stream))


def _free_host(ptr: int, nbytes: int) -> None:
    _count("host", nbytes, -1)
    _rt.cudaFreeHost(ptr)


class _Copyable(Owned):
    """Stream-ordered copies between this buffer and any pointer (cudaMemcpyDefault: host or
    device, the runtime tells which from the address)."""
    ptr: int
    nbytes: int

    def copy_from(self, src, nbytes: int | None = None, *, stream) -> None:
        self._check_open()
        copy_async(self.ptr, src, self.nbytes if nbytes is None else nbytes, stream)

    def copy_to(self, dst, nbytes: int | None = None, *, stream) -> None:
        self._check_open()
        copy_async(dst, self.ptr, self.nbytes if nbytes is None else nbytes, stream)


class DeviceBuffer(_Copyable):
    """Device memory: ``cudaMalloc`` by default; ``cudaMallocAsync`` on ``stream`` (from ``pool``
    when given, a ``cudaMemPool_t`` handle), then freed stream-ordered on that stream."""

    def __init__(self, nbytes: int, *, stream=None, pool=None):
        nbytes = check_int(nbytes, "nbytes", minimum=0)
        if stream is not None:
            from .stream import stream_handle
            stream_handle(stream)
        if pool is not None:
            check_int(pool, "pool", minimum=1)
        require_cuda()
        self.nbytes = nbytes
        self.device = int(call(_rt.cudaGetDevice))
        n = max(self.nbytes, 1)
        if stream is None:
            if pool is not None:
                raise ValueError("a pool allocation is stream-ordered: pass stream= too")
            self.ptr = int(call(_rt.cudaMalloc, n))
            _count("device", n, 1)
            self._own(_free, self.ptr, n)
        else:
            from .stream import stream_handle
            handle = stream_handle(stream)
            if pool is not None:
                self.ptr = int(call(_rt.cudaMallocFromPoolAsync, n, int(pool), handle))
            else:
                self.ptr = int(call(_rt.cudaMallocAsync, n, handle))
            _count("device", n, 1)
            # a Stream object rides along with the release, so it outlives the buffer (a dropped
            # stream and buffer may be finalized in any order)
            from .stream import Stream
            keep = stream if isinstance(stream, Stream) else handle
            self._own(_free_async, self.ptr, keep, n)

    def __repr__(self) -> str:
        return f"<DeviceBuffer {self.nbytes} B at 0x{self.ptr:x}{' closed' if self.closed else ''}>"

    def view(self, dtype="uint8", shape=None, stream=None) -> _CudaArrayView:
        """A ``__cuda_array_interface__`` view (CuPy, Numba, torch.as_tensor ...), no copy."""
        self._check_open()
        shape, _ = _view_shape(self.nbytes, dtype, shape)
        return _CudaArrayView(self, self.ptr, shape, dtype, stream)

    @property
    def __cuda_array_interface__(self):
        return self.view().__cuda_array_interface__

    def as_tensor(self, dtype, shape=None):
        """A torch tensor on this memory (no copy). ``dtype`` is a torch dtype."""
        self._check_open()
        from .torch_interop import tensor_from_device_buffer
        return tensor_from_device_buffer(self, dtype, shape)

    def fill_zero(self, *, stream) -> None:
        self._check_open()
        memset_async(self.ptr, 0, self.nbytes, stream)


class HostBuffer(_Copyable):
    """Pinned (page-locked) host memory from ``cudaHostAlloc``: async copies run at full speed.

    ``mapped=True`` also maps it into the device's address space (``cudaHostAllocMapped``):
    kernels read and write it through ``device_ptr`` / ``device_view()`` / ``as_device_tensor()``,
    and the host sees a kernel's writes without a copy or a synchronisation (a device-written
    token stream, a progress counter). Device accesses cross the bus: keep them few and small."""

    def __init__(self, nbytes: int, *, mapped: bool = False):
        nbytes = check_int(nbytes, "nbytes", minimum=0)
        if not isinstance(mapped, bool):
            raise TypeError(f"mapped must be a bool, got {mapped!r}")
        require_cuda()
        self.nbytes, self.mapped = nbytes, mapped
        n = max(self.nbytes, 1)
        flags = int(_rt.cudaHostAllocPortable) | (int(_rt.cudaHostAllocMapped) if mapped else 0)
        self.ptr = int(call(_rt.cudaHostAlloc, n, flags))
        _count("host", n, 1)
        self._own(_free_host, self.ptr, n)
        self.device_ptr = self.device = None
        if mapped:
            self.device = int(call(_rt.cudaGetDevice))
            self.device_ptr = int(call(_rt.cudaHostGetDevicePointer, self.ptr, 0))

    def __repr__(self) -> str:
        kind = "mapped " if self.mapped else ""
        return f"<HostBuffer {kind}{self.nbytes} B at 0x{self.ptr:x}{' closed' if self.closed else ''}>"

    def _check_mapped(self) -> None:
        self._check_open()
        if not self.mapped:
            raise ValueError("this HostBuffer is not mapped into the device: make it with HostBuffer(n, mapped=True)")

    def device_view(self, dtype="uint8", shape=None) -> _CudaArrayView:
        """A ``__cuda_array_interface__`` view of a mapped buffer at its device address."""
        self._check_mapped()
        shape, _ = _view_shape(self.nbytes, dtype, shape)
        return _CudaArrayView(self, self.device_ptr, shape, dtype, None)

    def as_device_tensor(self, dtype, shape=None):
        """A torch CUDA tensor on a mapped buffer (no copy): what kernels write, the host sees."""
        self._check_mapped()
        from .torch_interop import tensor_from_device_buffer
        return tensor_from_device_buffer(_MappedWindow(self), dtype, shape)

    def numpy(self, dtype="uint8", shape=None):
        """A numpy array on this memory (no copy); it keeps the buffer alive."""
        import numpy as np
        self._check_open()
        shape, itemsize = _view_shape(self.nbytes, dtype, shape)
        count = math.prod(shape)
        raw = (ctypes.c_char * max(count * itemsize, 1)).from_address(self.ptr)
        arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
        return _KeepAlive(arr, self).arr

    @property
    def __array_interface__(self):
        self._check_open()
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "version": 3}

    def as_tensor(self, dtype, shape=None):
        """A torch CPU tensor on this pinned memory (no copy). ``dtype`` is a torch dtype."""
        self._check_open()
        from .torch_interop import tensor_from_host_buffer
        return tensor_from_host_buffer(self, dtype, shape)


class _MappedWindow:
    """A mapped HostBuffer seen as device memory (what tensor_from_device_buffer reads)."""

    def __init__(self, buf: HostBuffer):
        self.buf, self.nbytes, self.device = buf, buf.nbytes, buf.device

    def view(self, dtype="uint8", shape=None):
        return self.buf.device_view(dtype, shape)


class _KeepAlive:
    """Ties a numpy array's base to the HostBuffer so the pinned memory outlives the array."""

    def __init__(self, arr, owner):
        import numpy as np
        # A 0-copy array whose .base chain ends in an object referencing the owner.
        holder = _Holder(arr, owner)
        self.arr = np.asarray(holder)


class _Holder:
    def __init__(self, arr, owner):
        self._arr = arr
        self._owner = owner
        self.__array_interface__ = arr.__array_interface__
