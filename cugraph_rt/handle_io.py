"""GraphHandle's input/output plumbing: static device input buffers, cudaMemcpyAsync of each
call's inputs into them (host inputs through pinned staging, device inputs device-to-device,
padding to a bucket), and pinned host copies of outputs."""
from __future__ import annotations

import ctypes

from cuda.bindings import runtime as _rt

from .buckets import pad_copy_geometry
from .errors import check
from .memory import DeviceBuffer, HostBuffer
from .stream import Event

_KIND = _rt.cudaMemcpyKind.cudaMemcpyDefault
_memcpy = _rt.cudaMemcpyAsync
_memcpy2d = _rt.cudaMemcpy2DAsync
_memset = _rt.cudaMemsetAsync
_memset2d = _rt.cudaMemset2DAsync


def _ok(result, name):
    if result[0]:
        check(result, name)


class StaticInput:
    """One static input of one bucket: the DeviceBuffer and the framework's array viewing it."""

    def __init__(self, shape, dtype, adapter):
        itemsize = adapter.itemsize(dtype)
        n = 1
        for s in shape:
            n *= s
        self.shape = tuple(shape)
        self.dtype = dtype
        self.itemsize = itemsize
        self.nbytes = n * itemsize
        self.buffer = DeviceBuffer(self.nbytes)
        self.tensor = adapter.wrap_device(self.buffer, dtype, self.shape)
        self.ptr = self.buffer.ptr

    def close(self):
        self.tensor = None
        self.buffer.close()


class Staging:
    """Pinned staging for host inputs; an event guards reuse while a copy is in flight."""

    def __init__(self):
        self.buffers: dict[str, HostBuffer] = {}
        self.event: Event | None = None
        self.pending = False

    def get(self, name: str, nbytes: int) -> HostBuffer:
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.close()
            buf = self.buffers[name] = HostBuffer(nbytes)
        return buf

    def wait_free(self) -> None:
        if self.pending:
            self.event.synchronize()
            self.pending = False

    def mark(self, stream: int) -> None:
        if self.event is None:
            self.event = Event(timing=False)
        self.event.record(stream)
        self.pending = True

    def close(self):
        for buf in self.buffers.values():
            buf.close()
        self.buffers.clear()
        if self.event is not None:
            self.event.close()


def copy_inputs(statics: dict, given: dict, *, n, bucket_dim: int, stream: int,
                staging: Staging, adapter, bucketed: frozenset | None = None) -> None:
    """Copy each given array (validated) into its static buffer on ``stream`` (padding with zeros
    up to the bucket size along ``bucket_dim`` where n is smaller; only the inputs named in
    ``bucketed``, all when None). Host arrays go through pinned staging."""
    used_staging = False
    for name, st in statics.items():
        t = given[name]
        src = adapter.pointer(t)
        if not adapter.on_device(t):
            if not used_staging:
                staging.wait_free()
                used_staging = True
            nbytes = adapter.nbytes(t)
            host = staging.get(name, st.nbytes)
            ctypes.memmove(host.ptr, src, nbytes)
            src = host.ptr
        if n is None or (bucketed is not None and name not in bucketed) or n == st.shape[bucket_dim]:
            if st.nbytes:
                _ok(_memcpy(st.ptr, src, st.nbytes, _KIND, stream), "cudaMemcpyAsync")
            continue
        g = pad_copy_geometry(st.shape, bucket_dim, n, st.itemsize)
        if g.rows == 1:
            if g.width:  # an empty input (n == 0) has no address worth copying from
                _ok(_memcpy(st.ptr, src, g.width, _KIND, stream), "cudaMemcpyAsync")
            _ok(_memset(st.ptr + g.width, 0, g.pad_bytes, stream), "cudaMemsetAsync")
        else:
            if g.width:
                _ok(_memcpy2d(st.ptr, g.dst_pitch, src, g.width, g.width, g.rows, _KIND, stream),
                    "cudaMemcpy2DAsync")
            _ok(_memset2d(st.ptr + g.width, g.dst_pitch, 0, g.pad_bytes, g.rows, stream),
                "cudaMemset2DAsync")
    if used_staging:
        staging.mark(stream)


def _has_data_ptr(x) -> bool:
    return hasattr(x, "data_ptr")


def map_outputs(out, fn, is_array=None):
    """Apply ``fn`` to every array of an array / tuple / list / dict output structure
    (``is_array`` tells arrays apart; by default, objects with a ``data_ptr``)."""
    is_array = _has_data_ptr if is_array is None else is_array
    if isinstance(out, dict):
        return {k: map_outputs(v, fn, is_array) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(map_outputs(v, fn, is_array) for v in out)
    return fn(out) if is_array(out) else out


class HostOutputs:
    """Pinned host copies of device outputs (one HostBuffer per output slot, reused)."""

    def __init__(self):
        self.buffers: dict[int, HostBuffer] = {}

    def copy(self, outputs, stream_obj, adapter, contexts):
        """Copy every array of ``outputs`` to pinned memory on ``stream_obj`` and wait for it;
        ``contexts()`` makes the stream current (for a contiguous copy of a strided output)."""
        slots = iter(range(1 << 30))

        def one(t):
            slot = next(slots)
            desc = adapter.describe(t)
            if not desc.contiguous:
                with contexts():
                    t = adapter.contiguous(t)
            nbytes = adapter.nbytes(t)
            buf = self.buffers.get(slot)
            if buf is None or buf.nbytes < nbytes:
                if buf is not None:
                    buf.close()
                buf = self.buffers[slot] = HostBuffer(nbytes)
            _ok(_memcpy(buf.ptr, adapter.pointer(t), nbytes, _KIND, stream_obj.handle),
                "cudaMemcpyAsync")
            return adapter.wrap_host(buf, desc.dtype, desc.shape)

        host = map_outputs(outputs, one, adapter.is_array)
        stream_obj.synchronize()
        return host

    def close(self):
        for buf in self.buffers.values():
            buf.close()
        self.buffers.clear()
