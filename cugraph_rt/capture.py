"""capture(): a context manager around cudaStreamBeginCapture / cudaStreamEndCapture.

It always ends the capture, also when the body raises; an invalidated capture becomes
CaptureError (naming the usual causes) and leaves the stream usable; an empty capture is refused.

Allocation policy while capturing (``allocator=``):
  "pool"   torch allocations go to a private pool kept alive with the graph (the default; what
           torch.cuda.graph does under torch's native allocator);
  "async"  stream-ordered allocations become graph MemAlloc/MemFree nodes (torch under
           PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, or raw cudaMallocAsync); needs
           AutoFreeOnLaunch when the graph keeps an allocation (GraphExec's default);
  "forbid" any allocation inside the capture is an error.
"""
from __future__ import annotations

import sys

from cuda.bindings import runtime as _rt

from ._lifetime import deferring_releases
from .errors import CAPTURE_HINT, CaptureError, CudaError, call, check
from .graph import Graph
from .nodes import graph_nodes, node_records

__all__ = ["capture", "CAPTURE_MODES", "ALLOCATORS"]

_M = _rt.cudaStreamCaptureMode
CAPTURE_MODES = {
    "thread_local": _M.cudaStreamCaptureModeThreadLocal,
    "global": _M.cudaStreamCaptureModeGlobal,
    "relaxed": _M.cudaStreamCaptureModeRelaxed,
}
ALLOCATORS = ("pool", "async", "forbid")
_LEGACY_STREAMS = (0, 1, 2)  # 0 = legacy default, 1/2 = cudaStreamLegacy / cudaStreamPerThread


def check_capture_args(mode: str, allocator: str) -> None:
    if mode not in CAPTURE_MODES:
        raise ValueError(f"capture mode must be one of {sorted(CAPTURE_MODES)}; got {mode!r}")
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}; got {allocator!r}")


def _torch_active():
    """The torch interop module when torch is imported and has CUDA, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001
        return None
    from . import torch_interop
    return torch_interop


class capture:
    """``with capture(stream) as cap: step()`` then ``cap.graph`` is the captured Graph.

    ``pool`` shares a torch private pool between captures (buckets); by default each capture
    gets its own. Each capture holds one use of the pool, given back when its graph is closed
    (as torch.cuda.CUDAGraph does), so memory the graph writes is never handed out meanwhile.
    """

    def __init__(self, stream, *, mode: str = "thread_local", allocator: str = "pool",
                 pool=None):
        check_capture_args(mode, allocator)
        handle = int(stream)
        if handle in _LEGACY_STREAMS:
            raise ValueError("capture needs a created stream (e.g. cugraph_rt.Stream()); capture "
                             "on the legacy default stream is illegal")
        self.stream = stream
        self.mode = mode
        self.allocator = allocator
        self.pool = pool
        self.graph: Graph | None = None
        self._routing = None
        self._began = False
        self._alloc_before = None
        self._torch = None
        self._device = None

    # -- allocation routing -------------------------------------------------------------
    def _begin_routing(self) -> None:
        ti = self._torch = _torch_active()
        if ti is None:
            return
        self._device = int(call(_rt.cudaGetDevice))
        if self.allocator == "forbid":
            self._alloc_before = ti.allocation_count(self._device)
        if self.pool is None:
            self.pool = ti.new_pool()
        routing = ti.PoolRouting(self._device, self.pool)
        with ti.stream_context(self._stream_obj()):
            try:
                routing.begin()
            except RuntimeError:
                # An allocator backend without pool routing: allocations stay stream-ordered.
                return
        self._routing = routing
        self._began = True

    def _stream_obj(self):
        from .stream import Stream
        return self.stream if isinstance(self.stream, Stream) else Stream.wrap(int(self.stream))

    def _end_routing(self) -> None:
        if self._routing is not None:
            try:
                self._routing.end()
            finally:
                self._routing = None

    def _release_pool(self) -> None:
        """Each begin of pool routing takes one use of the pool (torch counts them); give it
        back here when no graph came out of the capture."""
        if self._began:
            self._began = False
            _release(self._torch, self._device, self.pool)

    # -- the context --------------------------------------------------------------------
    def __enter__(self) -> "capture":
        handle = int(self.stream)
        self._begin_routing()
        try:
            call(_rt.cudaStreamBeginCapture, handle, CAPTURE_MODES[self.mode])
        except BaseException:
            self._end_routing()
            self._release_pool()
            raise
        self._defer = deferring_releases()
        self._defer.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        handle = int(self.stream)
        err, raw_graph = _rt.cudaStreamEndCapture(handle)
        try:
            self._end_routing()
        finally:   # releases queued during the capture run now, whatever happens next
            self._defer.__exit__(None, None, None)
        graph_handle = int(raw_graph) if raw_graph is not None else 0
        if exc_type is not None or int(err) != 0:
            if graph_handle:
                _rt.cudaGraphDestroy(graph_handle)
            _rt.cudaGetLastError()  # clear the sticky-until-read last error of the runtime
            self._release_pool()
            if exc_type is not None:
                refused = int(err) == 0 and _is_capture_refusal(exc)
                if isinstance(exc, CaptureError) or (int(err) == 0 and not refused):
                    return False  # ours already, or the body failed on its own: re-raise it
                name = _rt.cudaGetErrorName(err)[1]
                name = name.decode() if isinstance(name, bytes) else str(name)
                raise CaptureError(
                    f"stream capture failed: the captured code raised {exc_type.__name__}: {exc}"
                    f" (cudaStreamEndCapture: {name}). {CAPTURE_HINT}",
                    call="cudaStreamEndCapture", code=err, name=name) from exc
            check((err,), "cudaStreamEndCapture")  # raises CaptureError / CudaError
            raise CudaError("cudaStreamEndCapture failed")  # pragma: no cover
        try:
            self._finish(graph_handle)
        except BaseException:
            self._release_pool()
            raise
        return False

    def _finish(self, graph_handle: int) -> None:
        if not graph_nodes(graph_handle):
            _rt.cudaGraphDestroy(graph_handle)
            raise CaptureError(
                "empty capture refused: nothing was recorded on the capturing stream. The work "
                "probably ran on another stream: launch it on the captured stream (with torch: "
                "inside `with torch.cuda.stream(stream.torch)`; Triton uses torch's current "
                "stream).", call="cudaStreamEndCapture")
        if self.allocator == "forbid":
            allocs = [n for n in node_records(graph_handle) if n.type == "MemAlloc"]
            after = (self._torch.allocation_count(self._device)
                     if self._torch is not None and self._alloc_before is not None else None)
            grew = after is not None and after > self._alloc_before
            if allocs or grew:
                _rt.cudaGraphDestroy(graph_handle)
                what = (f"{len(allocs)} MemAlloc node(s)" if allocs else
                        f"{after - self._alloc_before} torch allocation(s)")
                raise CaptureError(
                    f"allocator='forbid': the captured step allocated memory ({what}). Write "
                    "the step to use preallocated buffers, or capture with allocator='pool'.",
                    call="cudaStreamEndCapture")
        graph = Graph(graph_handle)
        if self._began:  # the graph gives the pool use back when it is destroyed
            graph.keep(_PoolReleaser(self._torch, self._device, self.pool))
            self._began = False
        self.graph = graph


def _is_capture_refusal(exc) -> bool:
    """A library refusing an operation because a capture is underway (torch checks some of these
    itself, e.g. "operation not permitted when stream is capturing", before the capture is
    invalidated): still a capture problem, reported as CaptureError."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "capturing" in text or ("capture" in text and "not permitted" in text))


class _PoolReleaser:
    """Kept by a Graph: hands the private torch pool back when the graph's keepalive is cleared
    (after cudaGraphDestroy)."""

    def __init__(self, ti, device, pool):
        import weakref
        self._fin = weakref.finalize(self, _release, ti, device, pool)


def _release(ti, device, pool) -> None:
    try:
        ti.release_pool(device, pool)
    except Exception:  # noqa: BLE001
        pass
