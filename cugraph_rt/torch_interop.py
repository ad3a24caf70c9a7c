"""The torch adapter (see cugraph_rt.framework), imported only when torch is used: tensor views of
our buffers, the stream view, the allocator backend, and routing torch allocations to a private
pool while a capture runs (what torch.cuda.graph does internally). Every private ``torch._C``
call of the library is in this module."""
from __future__ import annotations

import math

import torch

from .framework import Adapter, ArrayDesc

__all__ = [
    "TorchAdapter", "external_stream", "tensor_from_device_buffer", "tensor_from_host_buffer",
    "allocator_backend", "new_pool", "PoolRouting", "release_pool", "allocation_count",
    "current_raw_stream", "stream_context", "is_tensor",
]


def is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def external_stream(handle: int, device: int):
    return torch.cuda.ExternalStream(int(handle), device=torch.device("cuda", int(device)))


def _itemsize(dtype) -> int:
    size = getattr(dtype, "itemsize", None)
    return int(size) if size is not None else torch.empty((), dtype=dtype).element_size()


def _shape(nbytes: int, dtype, shape):
    item = _itemsize(dtype)
    if shape is None:
        shape = (nbytes // item,)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    need = math.prod(shape) * item
    if need > nbytes:
        raise ValueError(f"tensor of shape {shape} and dtype {dtype} needs {need} bytes; "
                         f"the buffer holds {nbytes}")
    return shape, need


def tensor_from_device_buffer(buf, dtype, shape=None):
    shape, need = _shape(buf.nbytes, dtype, shape)
    raw = torch.as_tensor(buf.view("uint8", (max(need, 1),)),
                          device=torch.device("cuda", buf.device))
    return raw[:need].view(dtype).view(shape)


def tensor_from_host_buffer(buf, dtype, shape=None):
    shape, need = _shape(buf.nbytes, dtype, shape)
    raw = torch.from_numpy(buf.numpy("uint8", (max(need, 1),)))
    return raw[:need].view(dtype).view(shape)


def allocator_backend() -> str:
    """'native' or 'cudaMallocAsync' (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync)."""
    try:
        return torch.cuda.get_allocator_backend()
    except Exception:  # noqa: BLE001
        return "native"


def new_pool(device: int | None = None):
    """A fresh private memory pool: a ``torch.cuda.MemPool`` where torch has it (dropping the last
    reference frees that pool's cached memory, and only that pool's), else a pool id from
    ``torch.cuda.graph_pool_handle()`` (its memory is freed by torch's next empty_cache)."""
    mem_pool = getattr(torch.cuda, "MemPool", None)
    if mem_pool is not None:
        try:
            with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
                return mem_pool()
        except Exception:  # noqa: BLE001 - e.g. an allocator backend without pools
            pass
    return torch.cuda.graph_pool_handle()


def _pool_id(pool):
    return pool.id if hasattr(pool, "id") else pool


class PoolRouting:
    """Route torch allocations made on the current stream to a private pool, for one capture.

    begin() must run while the capturing stream is torch's current stream; it raises RuntimeError
    where the allocator backend cannot route (allocations then stay stream-ordered), and the
    allocation count still works. release_pool() (once the graph using the pool is destroyed)
    hands the pool's use back to torch.
    """

    def __init__(self, device: int, pool):
        self.device = int(device)
        self.pool = pool
        self.active = False
        self._count0 = None

    def begin(self) -> None:
        self._count0 = allocation_count(self.device)
        torch._C._cuda_beginAllocateCurrentStreamToPool(self.device, _pool_id(self.pool))
        self.active = True

    def end(self) -> None:
        if self.active:
            self.active = False
            torch._C._cuda_endAllocateToPool(self.device, _pool_id(self.pool))

    def allocations(self) -> int | None:
        """torch allocations on the device since begin() (None when torch cannot say)."""
        now = allocation_count(self.device)
        return None if now is None or self._count0 is None else now - self._count0


def release_pool(device: int, pool) -> None:
    torch._C._cuda_releasePool(int(device), _pool_id(pool))


def allocation_count(device: int) -> int | None:
    """Cumulative count of torch allocations on a device, or None if torch cannot say."""
    try:
        return int(torch.cuda.memory_stats(int(device)).get("allocation.all.allocated", 0))
    except Exception:  # noqa: BLE001
        return None


def current_raw_stream(device: int) -> int:
    """Handle of torch's current stream on ``device`` (cheap)."""
    try:
        return int(torch._C._cuda_getCurrentRawStream(int(device)))
    except Exception:  # noqa: BLE001
        return int(torch.cuda.current_stream(int(device)).cuda_stream)


def stream_context(stream):
    """``with torch.cuda.stream(our_stream.torch)``: torch and Triton launch on our stream."""
    return torch.cuda.stream(stream.torch)


def device_copies(slots, given):
    """Adapter.device_copies for torch tensors (the replay fast path: keep it lean)."""
    copies = []
    for name, shape, dtype, dev, dst, nbytes in slots:
        t = given.get(name)
        # get_device() is -1 for a CPU tensor, so it also refuses host inputs (staging path)
        if getattr(t, "dtype", None) is not dtype or t.shape != shape \
                or t.get_device() != dev or not t.is_contiguous():
            return None
        copies.append((dst, t.data_ptr(), nbytes))
    return copies


class TorchAdapter(Adapter):
    name = "torch"
    array_word = "a tensor"

    def __init__(self):
        self._available = None

    def is_array(self, x) -> bool:
        return isinstance(x, torch.Tensor)

    def describe(self, x):
        if not isinstance(x, torch.Tensor):
            return None
        dev = x.device
        return ArrayDesc(tuple(x.shape), x.dtype, dev.type, dev.index, x.is_contiguous(),
                         tuple(x.stride()), str(dev))

    def resolve_dtype(self, dtype):
        if isinstance(dtype, torch.dtype):
            return dtype
        if isinstance(dtype, str):
            resolved = getattr(torch, dtype, None)
            if isinstance(resolved, torch.dtype):
                return resolved
            raise TypeError(f"unknown dtype name {dtype!r} (a torch dtype name, e.g. 'bfloat16')")
        raise TypeError(f"dtype must be a torch.dtype or its name; got {dtype!r}")

    def itemsize(self, dtype) -> int:
        return _itemsize(dtype)

    def pointer(self, x) -> int:
        return int(x.data_ptr())

    def on_device(self, x) -> bool:
        return bool(x.is_cuda)

    def nbytes(self, x) -> int:
        return x.numel() * x.element_size()

    def wrap_device(self, buf, dtype, shape):
        return tensor_from_device_buffer(buf, dtype, shape)

    def wrap_host(self, buf, dtype, shape):
        return tensor_from_host_buffer(buf, dtype, shape)

    def to_device(self, x, device: int):
        return x.to(torch.device("cuda", int(device)), non_blocking=False)

    def narrow(self, x, dim: int, n: int):
        return x.narrow(dim, 0, n)

    def contiguous(self, x):
        return x.contiguous()

    def caller_stream_fn(self):
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        return raw if raw is not None else current_raw_stream

    def stream_context(self, stream):
        return stream_context(stream)

    def allocator_backend(self) -> str:
        return allocator_backend()

    def new_pool(self, device: int):
        return new_pool(device)

    def pool_routing(self, device: int, pool):
        return PoolRouting(device, pool)

    def release_pool(self, device: int, pool) -> None:
        release_pool(device, pool)

    def memory_reserved(self, device: int) -> int:
        try:
            return int(torch.cuda.memory_reserved(int(device)))
        except Exception:  # noqa: BLE001 - not every allocator backend reports it
            return 0

    def available(self) -> bool:
        if not self._available:
            try:
                self._available = bool(torch.cuda.is_available())
            except Exception:  # noqa: BLE001
                self._available = False
        return self._available

    device_copies = staticmethod(device_copies)
