"""The CuPy adapter's private pool routing on the CPU (CuPy's memory types replaced by stand-ins):
a block allocated while capturing keeps its private pool alive, so an output that a caller keeps
after closing the handle (which drops the pool) never points at memory the pool has freed."""
import gc
import types
import weakref
from contextlib import nullcontext

from cuda.bindings import runtime as rt

from tests import _fake_cupy


class _Memory:
    def __init__(self, size):
        self.size = size


class _Pointer:
    def __init__(self, mem, offset, ptr=4096, device_id=0):
        self.mem, self.ptr, self.device_id = mem, ptr + offset, device_id


class _Unowned(_Memory):
    def __init__(self, ptr, size, owner, device_id=-1):
        super().__init__(size)
        self.ptr, self._owner, self.device_id = ptr, owner, device_id


class _CupyPool:
    def malloc(self, nbytes):
        return _Pointer(_Memory(-(-nbytes // 512) * 512), 0)


def _install_memory_types(cp):
    cp.cuda.Device = lambda device=None: nullcontext()
    cp.cuda.MemoryPool = _CupyPool
    cp.cuda.UnownedMemory = _Unowned
    cp.cuda.MemoryPointer = lambda mem, offset: _Pointer(mem, offset, mem.ptr, mem.device_id)


def test_a_pool_block_keeps_its_private_pool_alive(monkeypatch):
    with _fake_cupy.installed(monkeypatch) as cp:
        _install_memory_types(cp)
        from cugraph_rt import cupy_interop as ci

        ok = rt.cudaError_t.cudaSuccess
        monkeypatch.setattr(ci, "_rt", types.SimpleNamespace(
            cudaThreadExchangeStreamCaptureMode=lambda mode: (ok, mode)))
        pool = ci.PrivatePool(0)
        alive = weakref.ref(pool)
        routing = ci._Routing(0, pool)
        block = routing._malloc(100)
        assert block.ptr == 4096 and block.mem.size == 512 and routing.allocations() == 1
        del pool, routing
        gc.collect()
        assert alive() is not None, "the private pool died while one of its blocks is still in use"
        del block
        gc.collect()
        assert alive() is None, "the block kept its pool after it was dropped"
