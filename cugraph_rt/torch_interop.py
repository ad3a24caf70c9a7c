"""Everything torch-specific, imported only when torch is used: the stream view, tensor views of
our buffers, the allocator backend, and routing torch allocations to a private pool while a
capture runs (what torch.cuda.graph does internally)."""
from __future__ import annotations

import math

import torch

__all__ = [
    "external_stream", "tensor_from_device_buffer", "tensor_from_host_buffer",
    "allocator_backend", "new_pool", "PoolRouting", "allocation_count", "current_raw_stream",
    "is_tensor",
]


def is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def external_stream(handle: int, device: int):
    return torch.cuda.ExternalStream(int(handle), device=torch.device("cuda", int(device)))


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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


def new_pool():
    """A fresh private memory-pool id (torch.cuda.graph_pool_handle())."""
    return torch.cuda.graph_pool_handle()


class PoolRouting:
    """Route torch allocations made on the current stream to a private pool, for one capture.

    begin() must run while the capturing stream is torch's current stream. release() (once the
    graph using the pool is destroyed) hands the pool back to torch.
    """

    def __init__(self, device: int, pool):
        self.device = int(device)
        self.pool = pool
        self.active = False

    def begin(self) -> None:
        torch._C._cuda_beginAllocateCurrentStreamToPool(self.device, self.pool)
        self.active = True

    def end(self) -> None:
        if self.active:
            self.active = False
            torch._C._cuda_endAllocateToPool(self.device, self.pool)


def release_pool(device: int, pool) -> None:
    torch._C._cuda_releasePool(int(device), pool)


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
