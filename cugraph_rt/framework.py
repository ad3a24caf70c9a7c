"""The framework seam: everything GraphHandle and capture() need from an array library, behind one
interface (``Adapter``), with torch (``cugraph_rt.torch_interop``) and CuPy
(``cugraph_rt.cupy_interop``) as its two implementations.

The core (errors, streams, events, buffers, capture, graphs) never imports a framework: an adapter
module is loaded only when its framework is already in use (its arrays were handed to us, it is
named explicitly, or it is already imported by the program).
"""
from __future__ import annotations

import importlib
import sys
import threading
from typing import Any, NamedTuple

__all__ = ["Adapter", "ArrayDesc", "FRAMEWORKS", "get_adapter", "pick_adapter", "active_adapters"]

# name -> (our adapter module, the adapter class); the name is also the framework's top module.
FRAMEWORKS = {
    "torch": ("cugraph_rt.torch_interop", "TorchAdapter"),
    "cupy": ("cugraph_rt.cupy_interop", "CupyAdapter"),
}
# modules whose objects (arrays, dtypes) tell which adapter a handle needs: numpy host arrays and
# numpy dtypes are CuPy's vocabulary
_OWNER = {"torch": "torch", "cupy": "cupy", "numpy": "cupy"}


class ArrayDesc(NamedTuple):
    """What call validation needs to know of one array, whatever its framework."""
    shape: tuple
    dtype: Any
    kind: str                 # "cuda", "cpu", or another device type ("meta", ...)
    index: int | None         # device index for "cuda" (None: the current device)
    contiguous: bool
    strides: tuple | None
    where: str                # the device as the framework prints it, for messages


class Adapter:
    """One array framework, as GraphHandle and capture() see it. Subclasses implement every method;
    none of them is called on the replay fast path except ``device_copies`` and
    ``caller_stream_fn()``'s result."""

    name = "?"
    array_word = "an array"   # what an input must be, in error messages

    # -- arrays ----------------------------------------------------------------------------------
    def is_array(self, x) -> bool:
        raise NotImplementedError

    def describe(self, x) -> ArrayDesc | None:
        """The array's shape, dtype, device and layout, or None if ``x`` is not an array."""
        raise NotImplementedError

    def resolve_dtype(self, dtype):
        """The framework's dtype for ``dtype`` (a name like "bfloat16", or a dtype); TypeError
        naming it otherwise."""
        raise NotImplementedError

    def itemsize(self, dtype) -> int:
        raise NotImplementedError

    def pointer(self, x) -> int:
        raise NotImplementedError

    def on_device(self, x) -> bool:
        raise NotImplementedError

    def nbytes(self, x) -> int:
        raise NotImplementedError

    def wrap_device(self, buf, dtype, shape):
        """An array viewing a DeviceBuffer (no copy; it keeps the buffer alive)."""
        raise NotImplementedError

    def wrap_host(self, buf, dtype, shape):
        """A host array viewing a pinned HostBuffer (no copy; it keeps the buffer alive)."""
        raise NotImplementedError

    def to_device(self, x, device: int):
        """``x`` on ``device`` (a copy on the current stream when it is elsewhere)."""
        raise NotImplementedError

    def narrow(self, x, dim: int, n: int):
        """The first ``n`` entries of ``x`` along ``dim`` (a view)."""
        raise NotImplementedError

    def contiguous(self, x):
        """``x`` itself when contiguous, else a contiguous copy on the current stream."""
        raise NotImplementedError

    # -- streams ---------------------------------------------------------------------------------
    def caller_stream_fn(self):
        """A function device -> handle of the framework's current stream there (the caller's
        stream a handle orders itself after); called once per replay, so keep it cheap."""
        raise NotImplementedError

    def stream_context(self, stream):
        """A context manager making ``stream`` (a cugraph_rt.Stream) the framework's current
        stream, so its kernels launch there."""
        raise NotImplementedError

    # -- memory ----------------------------------------------------------------------------------
    def allocator_backend(self) -> str:
        """"native" (a caching pool: allocations can be routed to a private pool while capturing)
        or "cudaMallocAsync" (stream-ordered: allocations become graph memory nodes)."""
        raise NotImplementedError

    def new_pool(self, device: int):
        """A fresh private memory pool for the allocations a capture makes."""
        raise NotImplementedError

    def pool_routing(self, device: int, pool):
        """An object with begin() / end() / allocations(): while begun (on this thread, with the
        capturing stream current), the framework allocates from ``pool``; allocations() counts
        the allocations made meanwhile (None when the framework cannot tell)."""
        raise NotImplementedError

    def release_pool(self, device: int, pool) -> None:
        """Give back the use of ``pool`` a begun routing took (once the graph is destroyed)."""
        raise NotImplementedError

    def memory_reserved(self, device: int) -> int:
        """Bytes the framework's allocator holds on ``device`` (for HandleStats)."""
        raise NotImplementedError

    def available(self) -> bool:
        """True when the framework can use a CUDA device here."""
        raise NotImplementedError

    # -- the replay fast path --------------------------------------------------------------------
    def device_copies(self, slots, given):
        """For each slot (name, shape, dtype, device, dst_ptr, nbytes): (dst_ptr, src_ptr, nbytes)
        when ``given[name]`` is a contiguous device array of exactly that shape, dtype and device;
        None as soon as one is not (the caller then takes the validating path)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<cugraph_rt {self.name} adapter>"


_lock = threading.Lock()
_adapters: dict[str, Adapter] = {}


def get_adapter(name: str) -> Adapter:
    """The adapter of framework ``name`` ("torch" or "cupy"); imports the framework."""
    if not isinstance(name, str) or name not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {sorted(FRAMEWORKS)} or an Adapter; got {name!r}")
    ad = _adapters.get(name)
    if ad is None:
        mod_name, cls_name = FRAMEWORKS[name]
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ImportError(f"framework {name!r} needs the {name} package, which could not be "
                              f"imported: {exc}") from exc
        with _lock:
            ad = _adapters.setdefault(name, getattr(mod, cls_name)())
    return ad


def _owner_of(obj) -> str | None:
    """The framework an example input (an array, or a dtype) belongs to, by its type's module."""
    t = obj if isinstance(obj, type) else type(obj)
    root = (getattr(t, "__module__", "") or "").split(".", 1)[0]
    return _OWNER.get(root)


def pick_adapter(examples: dict, framework=None) -> Adapter:
    """The adapter for a handle: ``framework`` when given (a name or an Adapter), else the one the
    example inputs belong to (arrays, or the dtypes of InputSpecs / (shape, dtype) pairs); torch
    when nothing tells (dtype names such as "bfloat16" are torch's)."""
    if framework is not None:
        if isinstance(framework, Adapter):
            return framework
        if not isinstance(framework, str):
            raise TypeError(f"framework must be None, a name in {sorted(FRAMEWORKS)} or an "
                            f"Adapter; got {type(framework).__name__}")
        return get_adapter(framework)
    from .validation import InputSpec
    seen: dict[str, str] = {}
    for name, value in examples.items():
        probe = value                       # an array tells by itself; a spec by its dtype
        if isinstance(value, InputSpec):
            probe = value.dtype
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            probe = value[1]
        owner = None if isinstance(probe, str) else _owner_of(probe)
        if owner is not None:
            seen.setdefault(owner, name)
    if len(seen) > 1:
        which = ", ".join(f"{n!r} is {fw}" for fw, n in seen.items())
        raise TypeError(f"inputs mix frameworks ({which}): give one framework's arrays, or pass "
                        f"framework=")
    return get_adapter(next(iter(seen), "torch"))


def active_adapters(primary: Adapter | None = None) -> list[Adapter]:
    """``primary`` first, then every other framework the program has imported and that can use
    CUDA: while a step runs or is captured, each gets our stream as its current stream and (when
    capturing) its allocations routed to a private pool, whichever framework the inputs are."""
    out = [primary] if primary is not None else []
    for name in FRAMEWORKS:
        if name in sys.modules and (primary is None or primary.name != name):
            try:
                ad = get_adapter(name)
            except ImportError:
                continue
            if ad.available():
                out.append(ad)
    return out
