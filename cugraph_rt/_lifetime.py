"""Shared plumbing for objects that own CUDA handles: a release function run exactly once by
close(), a context manager, or a weakref.finalize fallback that never keeps the owner alive."""
from __future__ import annotations

import weakref

from .errors import ClosedError


def _safe(release, *args):
    """Run a release call; never raise (finalizers run at interpreter exit too)."""
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
