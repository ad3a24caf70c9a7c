"""A per-device pool of owned non-blocking streams that GraphHandles borrow and give back.

Libraries keep state per stream that outlives any one handle: torch keeps a cuBLAS (and cuBLASLt)
workspace per (cuBLAS handle, stream) for the life of the process (32 MiB on sm_90), and its
caching allocator reuses a freed block only on the stream that allocated it. A new stream per
handle therefore costs that much per handle, forever. Reusing streams makes those caches reused
instead: after the first handle, the next one on the same thread finds its workspace and blocks
there. (docs/handle-state.md audits every piece of such state.)
"""
from __future__ import annotations

import threading

from cuda.bindings import runtime as _rt

from ._args import check_int
from .errors import call
from .stream import Stream

__all__ = ["borrow_stream", "give_back_stream", "idle_streams"]

_lock = threading.Lock()
_idle: dict[int, list[Stream]] = {}


def borrow_stream(device: int | None = None) -> Stream:
    """An idle pooled stream of ``device`` (the current device by default), or a new one. The
    borrower owns it until give_back_stream(); it must not close it."""
    if device is None:
        device = int(call(_rt.cudaGetDevice))
    device = check_int(device, "device", minimum=0)
    with _lock:
        free = _idle.get(device)
        if free:
            return free.pop()
    current = int(call(_rt.cudaGetDevice))
    try:
        return Stream(device=device)
    finally:
        if current != device:   # Stream(device=) made it current; restore the caller's
            call(_rt.cudaSetDevice, current)


def give_back_stream(stream: Stream) -> None:
    """Return a borrowed stream to the pool. It must have no work pending (the handle synchronizes
    it first); a stream that is closed, not owned, capturing or in an error state is not pooled
    (closed instead where we own it)."""
    if not isinstance(stream, Stream):
        raise TypeError(f"stream must be a cugraph_rt.Stream; got {type(stream).__name__}")
    if stream.closed or not stream.owned:
        return
    idle = (_rt.cudaStreamQuery(stream.handle)[0] == _rt.cudaError_t.cudaSuccess)
    status = _rt.cudaStreamIsCapturing(stream.handle)
    capturing = int(status[0]) != 0 or \
        status[1] != _rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
    if not idle or capturing:
        _rt.cudaGetLastError()
        stream.close()
        return
    with _lock:
        _idle.setdefault(stream.device, []).append(stream)


def idle_streams(device: int | None = None) -> int:
    """How many pooled streams wait to be borrowed (on ``device``, or on all devices)."""
    with _lock:
        if device is None:
            return sum(len(v) for v in _idle.values())
        return len(_idle.get(check_int(device, "device", minimum=0), []))
