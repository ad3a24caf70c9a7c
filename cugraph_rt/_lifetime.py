"""Shared plumbing for objects that own CUDA handles: a release function run exactly once by
close(), a context manager, or a weakref.finalize fallback that never keeps the owner alive."""
from __future__ import annotations

import contextlib
import gc
import threading
import weakref

from .errors import ClosedError

_tls = threading.local()


_gc_lock = threading.Lock()
_gc_state = {"open": 0, "was_enabled": False}


@contextlib.contextmanager
def deferring_releases():
    """While a capture is open on this thread, releases (cudaFree, cudaStreamDestroy, ...) that
    finalizers or close() would run here are queued instead, and run when the outermost capture
    ends: such calls are illegal inside a capture (they would invalidate it, and fail, leaking).
    Python's automatic garbage collection is also paused while any capture is open (as Triton's
    do_bench_cudagraph does): other libraries' finalizers (torch events, ...) must not run there."""
    _tls.depth = getattr(_tls, "depth", 0) + 1
    with _gc_lock:
        if _gc_state["open"] == 0:
            _gc_state["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_state["open"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["open"] -= 1
            if _gc_state["open"] == 0 and _gc_state["was_enabled"]:
                gc.enable()
        _tls.depth -= 1
        if _tls.depth == 0:
            queued, _tls.deferred = getattr(_tls, "deferred", []), []
            for release, args in queued:
                _safe(release, *args)


def releases_deferred() -> int:
    """Releases queued on this thread until its capture ends (0 outside a capture)."""
    return len(getattr(_tls, "deferred", []))


def _safe(release, *args):
    """Run a release call; never raise (finalizers run at interpreter exit too). Inside a capture
    on this thread, queue it for the capture's end instead."""
    if getattr(_tls, "depth", 0):
        if not hasattr(_tls, "deferred"):
            _tls.deferred = []
        _tls.deferred.append((release, args))
        return
    try:
        release(*args)
    except Exception:  # noqa: BLE001
        pass


class Owned:
    """Mixin: subclasses call ``self._own(release, *args)`` once the handle exists.

    ``release`` and ``args`` must not reference ``self`` (or the finalizer would keep it alive).
    """

    _finalizer = None
    _what = "object"

    def _own(self, release, *args) -> None:
        self._finalizer = weakref.finalize(self, _safe, release, *args)

    @property
    def closed(self) -> bool:
        return self._finalizer is None or not self._finalizer.alive

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"{type(self).__name__} is closed (used after close())")

    def close(self) -> None:
        """Release the CUDA resources. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
