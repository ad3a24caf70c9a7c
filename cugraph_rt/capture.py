"""capture(): a context manager around cudaStreamBeginCapture / cudaStreamEndCapture.

It always ends the capture, also when the body raises; an invalidated capture becomes
CaptureError (naming the usual causes) and leaves the stream usable; an empty capture is refused.

Allocation policy while capturing (``allocator=``), for every framework routed (``framework=``:
by default each one the program has imported, torch and CuPy, through cugraph_rt.framework):
  "pool"   the framework's allocations go to a private pool kept alive with the graph (the
           default; what torch.cuda.graph does under torch's native allocator);
  "async"  stream-ordered allocations become graph MemAlloc/MemFree nodes (torch under
           PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, or raw cudaMallocAsync); needs
           AutoFreeOnLaunch when the graph keeps an allocation (GraphExec's default);
  "forbid" any allocation inside the capture is an error.
"""
from __future__ import annotations

from cuda.bindings import runtime as _rt

from ._lifetime import deferring_releases
from .errors import CAPTURE_HINT, CaptureError, CudaError, call, check
from .graph import Graph
from .nodes import graph_nodes, node_records
from .stream import Stream, stream_handle

__all__ = ["capture", "CAPTURE_MODES", "ALLOCATORS"]

_M = _rt.cudaStreamCaptureMode
CAPTURE_MODES = {
    "thread_local": _M.cudaStreamCaptureModeThreadLocal,
    "global": _M.cudaStreamCaptureModeGlobal,
    "relaxed": _M.cudaStreamCaptureModeRelaxed,
}
ALLOCATORS = ("pool", "async", "forbid")


def check_capture_args(mode: str, allocator: str, mode_arg: str = "mode") -> None:
    if not isinstance(mode, str) or mode not in CAPTURE_MODES:
        raise ValueError(f"capture mode ({mode_arg}=) must be one of {sorted(CAPTURE_MODES)}; "
                         f"got {mode!r}")
    if not isinstance(allocator, str) or allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}; got {allocator!r}")


def _routed_adapters(framework) -> list:
    """The adapters whose allocations a capture routes: every active framework (None), none
    (an empty tuple), or the named / given ones."""
    from . import framework as fw
    if framework is None:
        return fw.active_adapters()
    if isinstance(framework, (fw.Adapter, str)):
        framework = (framework,)
    if not isinstance(framework, (tuple, list)):
        raise TypeError(f"framework must be None, a framework name, an Adapter or a sequence of "
                        f"them; got {type(framework).__name__}")
    return [f if isinstance(f, fw.Adapter) else fw.get_adapter(f) for f in framework]


class capture:
    """``with capture(stream) as cap: step()`` then ``cap.graph`` is the captured Graph.

    ``pool`` shares private pools between captures (buckets): a dict {framework name: pool}
    (filled in place with the pools this capture creates, so the next capture given the same
    dict shares them), or, when one framework is routed, that framework's pool itself (for torch
    a ``torch.cuda.MemPool`` or a pool id). By default each capture gets its own. Each capture
    holds one use of each pool, given back when its graph is closed (as torch.cuda.CUDAGraph
    does), so memory the graph writes is never handed out meanwhile.
    """

    def __init__(self, stream, *, mode: str = "thread_local", allocator: str = "pool",
                 pool=None, framework=None):
        check_capture_args(mode, allocator)
        stream_handle(stream, "stream", capturable=True)
        self.stream = stream
        self.mode = mode
        self.allocator = allocator
        self.pool = pool
        self.pools: dict = pool if isinstance(pool, dict) else {}
        self.framework = framework
        self.graph: Graph | None = None
        self._routings: list = []     # (adapter, routing, pool) of this capture
        self._began: list = []        # (adapter, pool) whose use this capture holds
        self._device = None

    # -- allocation routing -------------------------------------------------------------
    def _begin_routing(self) -> None:
        adapters = _routed_adapters(self.framework)
        if not adapters:
            return
        if not isinstance(self.pool, dict) and self.pool is not None:
            if len(adapters) != 1:
                raise ValueError(f"pool= names one pool but {len(adapters)} frameworks are routed "
                                 f"({[a.name for a in adapters]}): pass a dict keyed by framework "
                                 "name, or framework=")
            self.pools = {adapters[0].name: self.pool}
        self._device = int(call(_rt.cudaGetDevice))
        stream = self._stream_obj()
        for ad in adapters:
            pool = self.pools.get(ad.name)
            if pool is None:
                pool = self.pools[ad.name] = ad.new_pool(self._device)
            routing = ad.pool_routing(self._device, pool)
            self._routings.append((ad, routing, pool))
            with ad.stream_context(stream):
                try:
                    routing.begin()
                except RuntimeError:
                    if ad.allocator_backend() == "native":
                        raise   # a caching allocator that cannot route: never capture unsafely
                    # A stream-ordered allocator: allocations become graph memory nodes.
                    continue
            self._began.append((ad, pool))

    def _stream_obj(self):
        return self.stream if isinstance(self.stream, Stream) else Stream.wrap(
            stream_handle(self.stream))

    def _end_routing(self) -> None:
        for _, routing, _ in self._routings:
            try:
                routing.end()
            except Exception:  # noqa: BLE001 - end every routing we began
                pass

    def _release_pool(self) -> None:
        """Each begin of pool routing takes one use of the pool (torch counts them); give it
        back here when no graph came out of the capture."""
        began, self._began = self._began, []
        for ad, pool in began:
            _release(ad, self._device, pool)

    # -- the context --------------------------------------------------------------------
    def __enter__(self) -> "capture":
        handle = stream_handle(self.stream, capturable=True)
        try:
            self._begin_routing()
        except BaseException:
            self._end_routing()
            self._release_pool()
            raise
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
        handle = stream_handle(self.stream)
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
            counted = [(ad.name, r.allocations()) for ad, r, _ in self._routings]
            grew = [(name, n) for name, n in counted if n]
            if allocs or grew:
                _rt.cudaGraphDestroy(graph_handle)
                what = (f"{len(allocs)} MemAlloc node(s)" if allocs else
                        ", ".join(f"{n} {name} allocation(s)" for name, n in grew))
                raise CaptureError(
                    f"allocator='forbid': the captured step allocated memory ({what}). Write "
                    "the step to use preallocated buffers, or capture with allocator='pool'.",
                    call="cudaStreamEndCapture")
        graph = Graph(graph_handle)
        began, self._began = self._began, []
        for ad, pool in began:  # the graph gives each pool use back when it is destroyed
            graph.keep(_PoolReleaser(ad, self._device, pool))
        self.graph = graph


def _is_capture_refusal(exc) -> bool:
    """A library refusing an operation because a capture is underway (torch checks some of these
    itself, e.g. "operation not permitted when stream is capturing", before the capture is
    invalidated): still a capture problem, reported as CaptureError."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "capturing" in text or ("capture" in text and "not permitted" in text))


class _PoolReleaser:
    """Kept by a Graph: hands a private pool's use back when the graph's keepalive is cleared
    (after cudaGraphDestroy); it also keeps the pool object alive until then."""

    def __init__(self, adapter, device, pool):
        import weakref
        self._fin = weakref.finalize(self, _release, adapter, device, pool)


def _release(adapter, device, pool) -> None:
    try:
        adapter.release_pool(device, pool)
    except Exception:  # noqa: BLE001
        pass
