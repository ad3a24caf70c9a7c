"""The CuPy adapter (see cugraph_rt.framework), imported only when CuPy is used: device arrays are
``cupy.ndarray``, host arrays ``numpy.ndarray`` (host inputs, pinned host outputs), our stream
becomes CuPy's current stream through ``cupy.cuda.ExternalStream``, and allocations made while
capturing go to a private ``cupy.cuda.MemoryPool`` kept until the last graph using it is closed
(CuPy's default pool would hand memory the graph still writes to later eager code)."""
from __future__ import annotations

import contextlib

import cupy
import numpy as np

from cuda.bindings import runtime as _rt

from .errors import check
from .framework import Adapter, ArrayDesc

__all__ = ["CupyAdapter", "PrivatePool"]

_ndarray = cupy.ndarray
_RELAXED = _rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed


def _external(stream):
    """``stream`` (a cugraph_rt.Stream) as a cupy ExternalStream, made once per Stream."""
    view = stream._views.get("cupy")
    if view is None:
        try:
            view = cupy.cuda.ExternalStream(stream.handle, stream.device)
        except TypeError:   # a CuPy without device_id
            view = cupy.cuda.ExternalStream(stream.handle)
        stream._views["cupy"] = view
    return view


@contextlib.contextmanager
def _on_stream(stream):
    with cupy.cuda.Device(stream.device), _external(stream):
        yield


def _allocator_backend() -> str:
    owner = getattr(cupy.cuda.get_allocator(), "__self__", None)
    async_pool = getattr(cupy.cuda, "MemoryAsyncPool", None)
    return "cudaMallocAsync" if async_pool is not None and isinstance(owner, async_pool) else "native"


def _current_stream(device: int) -> int:
    try:
        return int(cupy.cuda.get_current_stream(device).ptr)
    except TypeError:       # a CuPy whose get_current_stream takes no device
        return int(cupy.cuda.get_current_stream().ptr)


class PrivatePool:
    """A cupy.cuda.MemoryPool shared by the captures of one handle, with a count of the captures
    (graphs) that use it: its free blocks may still be written by a live graph, so they are freed
    only when the last user is released (or the pool is dropped)."""

    def __init__(self, device: int):
        with cupy.cuda.Device(device):
            self.pool = cupy.cuda.MemoryPool()
        self.uses = 0

    def release(self) -> None:
        self.uses -= 1
        if self.uses <= 0:
            self.uses = 0
            self.pool.free_all_blocks()


def _keeping_pool(mp, pool):
    """``mp`` (from a CuPy pool) as a pointer whose memory also holds ``pool``: CuPy's pooled memory
    refers to its pool only weakly, and its blocks die with the pool, so an output a caller keeps
    after closing the handle (which drops the private pool) would point at freed memory. The owner
    tuple is released last item first: the block goes back to the pool, then the pool may go."""
    owner = (pool, mp)
    mem = cupy.cuda.UnownedMemory(mp.ptr, mp.mem.size, owner, mp.device_id)
    return cupy.cuda.MemoryPointer(mem, 0)


class _Routing:
    """While begun, CuPy allocations on this thread come from the private pool (and are counted)."""

    def __init__(self, device: int, pool: PrivatePool):
        self.device = device
        self.pool = pool
        self._count = 0
        self._cm = None

    def _malloc(self, nbytes):
        self._count += 1
        # A new block is a cudaMalloc, which a thread-local or global capture refuses
        # (cudaErrorStreamCaptureUnsupported). It is not stream-ordered, so it is safe to make it
        # in relaxed mode for this thread, as torch's caching allocator does; the pool keeps the
        # block for the graphs that use it.
        err, previous = _rt.cudaThreadExchangeStreamCaptureMode(_RELAXED)
        check((err,), "cudaThreadExchangeStreamCaptureMode")
        try:
            return _keeping_pool(self.pool.pool.malloc(nbytes), self.pool)
        finally:
            check(_rt.cudaThreadExchangeStreamCaptureMode(previous)[:1], "cudaThreadExchangeStreamCaptureMode")

    def begin(self) -> None:
        if _allocator_backend() == "cudaMallocAsync":
            # stream-ordered allocations already become graph memory nodes: leave them be
            raise RuntimeError("CuPy's current allocator is stream-ordered: no pool routing")
        self._cm = cupy.cuda.using_allocator(self._malloc)
        self._cm.__enter__()
        self.pool.uses += 1

    def end(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def allocations(self) -> int:
        return self._count


def device_copies(slots, given):
    """Adapter.device_copies for cupy arrays (the replay fast path: keep it lean)."""
    copies = []
    for name, shape, dtype, dev, dst, nbytes in slots:
        a = given.get(name)
        if type(a) is not _ndarray or a.dtype != dtype or a.shape != shape \
                or not a.flags.c_contiguous or a.device.id != dev:
            return None
        copies.append((dst, a.data.ptr, nbytes))
    return copies


class CupyAdapter(Adapter):
    name = "cupy"
    array_word = "a cupy or numpy array"

    def __init__(self):
        self._available = None

    def is_array(self, x) -> bool:
        return isinstance(x, (_ndarray, np.ndarray))

    def describe(self, x):
        if isinstance(x, _ndarray):
            dev = int(x.device.id)
            return ArrayDesc(tuple(x.shape), x.dtype, "cuda", dev, bool(x.flags.c_contiguous),
                             tuple(x.strides), f"cuda:{dev}")
        if isinstance(x, np.ndarray):
            return ArrayDesc(tuple(x.shape), x.dtype, "cpu", None, bool(x.flags.c_contiguous),
                             tuple(x.strides), "cpu")
        return None

    def resolve_dtype(self, dtype):
        try:
            return np.dtype(dtype)
        except TypeError:
            raise TypeError(f"unknown dtype {dtype!r} (a numpy dtype or its name, e.g. "
                            f"'float32')") from None

    def itemsize(self, dtype) -> int:
        return int(np.dtype(dtype).itemsize)

    def pointer(self, x) -> int:
        return int(x.data.ptr) if isinstance(x, _ndarray) else int(x.ctypes.data)

    def on_device(self, x) -> bool:
        return isinstance(x, _ndarray)

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    def wrap_device(self, buf, dtype, shape):
        mem = cupy.cuda.UnownedMemory(buf.ptr, buf.nbytes, buf, buf.device)
        return _ndarray(tuple(shape), dtype=dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))

    def wrap_host(self, buf, dtype, shape):
        return buf.numpy(dtype, tuple(shape))

    def to_device(self, x, device: int):
        with cupy.cuda.Device(int(device)):
            return cupy.asarray(x)

    def narrow(self, x, dim: int, n: int):
        return x[(slice(None),) * dim + (slice(0, n),)]

    def contiguous(self, x):
        return cupy.ascontiguousarray(x)

    def caller_stream_fn(self):
        return _current_stream

    def stream_context(self, stream):
        return _on_stream(stream)

    def allocator_backend(self) -> str:
        return _allocator_backend()

    def new_pool(self, device: int):
        return PrivatePool(device)

    def pool_routing(self, device: int, pool):
        if not isinstance(pool, PrivatePool):
            raise TypeError(f"a CuPy capture pool must be a cugraph_rt.cupy_interop.PrivatePool "
                            f"(from new_pool); got {type(pool).__name__}")
        return _Routing(device, pool)

    def release_pool(self, device: int, pool) -> None:
        pool.release()

    def memory_reserved(self, device: int) -> int:
        try:
            return int(cupy.get_default_memory_pool().total_bytes())
        except Exception:  # noqa: BLE001
            return 0

    def available(self) -> bool:
        if not self._available:
            try:
                self._available = cupy.cuda.runtime.getDeviceCount() > 0
            except Exception:  # noqa: BLE001
                self._available = False
        return self._available

    device_copies = staticmethod(device_copies)
