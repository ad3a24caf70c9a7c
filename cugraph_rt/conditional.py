"""Conditional nodes (CUDA 12.4+): WHILE and IF nodes whose bodies are captured from Python code
like any other step, their condition set on the device.

    with cugraph_rt.capture(stream) as cap:
        with cugraph_rt.while_loop(flag, stream):   # while (*flag != 0) { step(); }
            step()                                  # the step writes the int32 flag
        ...

How a body is captured: the conditional node is added to the graph being captured
(``cudaGraphAddNode``, its handle from ``cudaGraphConditionalHandleCreate`` on that graph, found
with ``cudaStreamGetCaptureInfo``); the outer capture is ended, the body is captured on the SAME
stream into the node's body graph (``cudaStreamBeginCaptureToGraph``), and the outer capture is
resumed into the outer graph after the conditional node. Staying on one stream means torch and
Triton need no stream switch, the capture's private-pool routing (per stream) covers the body, and
cuBLAS keeps its per-stream workspace. Consequences: side streams forked into the outer capture
must be joined before a body starts (else CaptureError: unjoined work); pass the outer capture's
``mode`` (default "thread_local", as ``capture``).

Body contents: kernels, memcpy, memset, empty, child-graph and (nested) conditional nodes only (a
driver rule). An allocation under the async allocator (a MemAlloc/MemFree node), a host callback
or an external event gives CaptureError naming it; a host synchronisation invalidates the body's
capture and gives CaptureError too. After an invalidated body capture the driver frees the body
graph that the conditional node still owns, and destroying the outer graph then crashes inside
the driver (a known driver defect): this module therefore abandons (leaks) the outer graph, starts
an empty capture on the stream in its place so the enclosing ``capture`` ends normally, and
raises CaptureError.
"""
from __future__ import annotations

from dataclasses import dataclass

from cuda.bindings import runtime as _rt

from ._args import check_bool, check_int
from .capture import CAPTURE_MODES, _is_capture_refusal
from .conditional_records import ConditionalInfo, register_conditional
from .errors import (CAPTURE_HINT, CaptureError, CudaUnavailableError, _fmt_version, call, check,
                     driver_version, runtime_version)
from .nodes import graph_nodes
from .stream import stream_handle

__all__ = ["MIN_CUDA_VERSION", "ConditionalHandle", "conditional_support", "require_conditional_support",
           "conditional_handle", "set_condition", "conditional_node", "while_loop", "if_then"]

MIN_CUDA_VERSION = 12040   # capture into conditional bodies (cudaStreamBeginCaptureToGraph)
_NEEDED = ("cudaGraphConditionalHandleCreate", "cudaStreamBeginCaptureToGraph", "cudaGraphAddNode",
           "cudaGraphNodeParams", "cudaStreamGetCaptureInfo")
_KIND_ENUM = {"if": "cudaGraphCondTypeIf", "while": "cudaGraphCondTypeWhile"}
# what a conditional body may hold (cudaConditionalNodeParams), and why the rest is refused
_ALLOWED = frozenset({"Kernel", "Empty", "Graph", "Memset", "Memcpy", "Conditional"})
_WHY = {
    "MemAlloc": "an allocation under the async allocator (cudaMallocAsync, or torch with "
                "PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync); allocate before the capture, "
                "or capture with the pool allocator",
    "MemFree": "a free under the async allocator (cudaFreeAsync); keep the buffer alive past "
               "the capture",
    "Host": "a host callback (cudaLaunchHostFunc)",
    "EventRecord": "an external event record",
    "WaitEvent": "a wait on an external event",
}
POISON_ATTR = "cugraph_rt_outer_graph_abandoned"
_STATUS = _rt.cudaStreamCaptureStatus


def conditional_support(drv: int | None = None, rtv: int | None = None) -> str | None:
    """None where conditional nodes can be captured, else why not (naming driver and runtime)."""
    drv = driver_version() if drv is None else drv
    rtv = runtime_version() if rtv is None else rtv
    versions = f"driver CUDA version {_fmt_version(drv)}, runtime {_fmt_version(rtv)}"
    if drv == 0:
        return f"no NVIDIA driver found ({versions})"
    if drv < MIN_CUDA_VERSION or rtv < MIN_CUDA_VERSION:
        older = "driver" if drv < MIN_CUDA_VERSION else "runtime"
        return (f"conditional graph nodes need CUDA {_fmt_version(MIN_CUDA_VERSION)} or newer in "
                f"both the driver and the runtime; the {older} is older ({versions})")
    missing = [n for n in _NEEDED if not hasattr(_rt, n)]
    if missing:
        return f"this cuda-bindings lacks {', '.join(missing)} ({versions}); upgrade cuda-bindings"
    return None


def require_conditional_support() -> None:
    why = conditional_support()
    if why is not None:
        raise CudaUnavailableError(f"conditional nodes unavailable: {why}")


def _check_mode(mode) -> None:
    if not isinstance(mode, str) or mode not in CAPTURE_MODES:
        raise ValueError(f"mode must be one of {sorted(CAPTURE_MODES)} (the enclosing capture's "
                         f"mode); got {mode!r}")


def _capture_info(sh: int, what: str) -> tuple[int, list]:
    """(graph handle, dependency nodes) of the capture underway on stream ``sh``; CaptureError
    where none is active."""
    res = check(_rt.cudaStreamGetCaptureInfo(sh), "cudaStreamGetCaptureInfo")
    status = res[0]
    if status != _STATUS.cudaStreamCaptureStatusActive:
        state = ("invalidated" if status == _STATUS.cudaStreamCaptureStatusInvalidated
                 else "not capturing")
        raise CaptureError(f"{what} needs a stream capture underway on the stream (e.g. inside "
                           f"`with cugraph_rt.capture(stream)`); the stream is {state}",
                           call="cudaStreamGetCaptureInfo")
    graph = int(res[2])
    count = int(res[-1])
    deps = list(res[3] or [])[:count] if count else []
    return graph, deps


@dataclass(frozen=True)
class ConditionalHandle:
    """A cudaGraphConditionalHandle (``value``) made for the graph ``graph`` (a handle); with
    ``default`` not None the handle takes that value at every launch of the graph."""
    value: int
    graph: int
    default: int | None = None

    def __int__(self) -> int:
        return self.value


def conditional_handle(stream, *, default: int | bool | None = None) -> ConditionalHandle:
    """A conditional handle for the graph being captured on ``stream``. ``default``: the value the
    handle takes at each launch of the graph (cudaGraphCondAssignDefault), or None for none (a
    kernel must set it before the node runs)."""
    if default is not None:
        if isinstance(default, bool):
            default = int(default)
        default = check_int(default, "default", minimum=0)
        if default > 0xFFFFFFFF:
            raise ValueError(f"default must fit in 32 bits; got {default}")
    sh = stream_handle(stream, capturable=True)
    require_conditional_support()
    graph, _ = _capture_info(sh, "conditional_handle")
    if default is None:
        h = call(_rt.cudaGraphConditionalHandleCreate, graph, 0, 0)
    else:
        flag = _rt.cudaGraphConditionalHandleFlags.cudaGraphCondAssignDefault
        try:
            h = call(_rt.cudaGraphConditionalHandleCreate, graph, default, flag)
        except TypeError:   # a release that wants a plain int for the flags
            h = call(_rt.cudaGraphConditionalHandleCreate, graph, default, int(flag))
    return ConditionalHandle(value=int(h), graph=graph, default=default)


def _flag_ptr(flag, name: str = "flag") -> int:
    """The device address of an int32 flag: a torch int32 CUDA tensor, a DeviceBuffer (>= 4
    bytes), an object with a ``__cuda_array_interface__`` of 4-byte ints, or an address (int)."""
    if isinstance(flag, bool) or flag is None:
        raise TypeError(f"{name} must be an int32 device tensor / buffer or a device address; "
                        f"got {flag!r}")
    if isinstance(flag, int):
        return check_int(flag, f"{name} (address)", minimum=1)
    if hasattr(flag, "data_ptr") and hasattr(flag, "dtype"):   # a torch tensor
        if str(flag.dtype) != "torch.int32":
            raise TypeError(f"{name} must be an int32 tensor; got dtype {flag.dtype}")
        if getattr(flag, "device", None) is None or flag.device.type != "cuda":
            raise ValueError(f"{name} must be on a CUDA device; got device {flag.device}")
        if flag.numel() < 1:
            raise ValueError(f"{name} must hold at least one element; got shape "
                             f"{tuple(flag.shape)}")
        return int(flag.data_ptr())
    from .memory import DeviceBuffer
    if isinstance(flag, DeviceBuffer):
        if flag.nbytes < 4:
            raise ValueError(f"{name} buffer must hold at least 4 bytes; got {flag.nbytes}")
        return int(flag.ptr)
    iface = getattr(flag, "__cuda_array_interface__", None)
    if iface is not None:
        typestr = str(iface.get("typestr", ""))
        if typestr[1:] not in ("i4", "u4"):
            raise TypeError(f"{name} must hold 4-byte ints; got typestr {typestr!r}")
        ptr = int(iface["data"][0])
        if ptr == 0:
            raise ValueError(f"{name} has a null data pointer")
        return ptr
    raise TypeError(f"{name} must be an int32 device tensor / buffer or a device address; got "
                    f"{type(flag).__name__}")


def _handle_value(handle) -> int:
    if isinstance(handle, ConditionalHandle):
        return handle.value
    if isinstance(handle, bool) or not hasattr(handle, "__index__"):
        raise TypeError(f"handle must be a ConditionalHandle or an int; got {type(handle).__name__}")
    return check_int(handle, "handle", minimum=0)


def set_condition(handle, flag, stream) -> None:
    """Record, on the stream being captured, one kernel node that sets ``handle`` to
    ``*flag != 0`` (an int32 flag in device memory, read when the node runs)."""
    value = _handle_value(handle)
    ptr = _flag_ptr(flag)
    sh = stream_handle(stream, capturable=True)
    require_conditional_support()
    _capture_info(sh, "set_condition")
    from .nvrtc_kernels import launch_set_condition
    launch_set_condition(value, ptr, sh)


def _add_node_takes_edges() -> bool:
    """cuda-bindings 13 takes (graph, deps, edge data, count, params); 12 (graph, deps, count,
    params)."""
    doc = (_rt.cudaGraphAddNode.__doc__ or "").split("\n", 1)[0]
    return "dependencyData" in doc


def _add_conditional_node(graph: int, deps: list, kind: str, handle: int) -> tuple[int, int]:
    """Add a conditional node to ``graph`` after ``deps``: (node object, body graph handle)."""
    p = _rt.cudaGraphNodeParams()
    p.type = _rt.cudaGraphNodeType.cudaGraphNodeTypeConditional
    p.conditional.handle = handle
    p.conditional.type = getattr(_rt.cudaGraphConditionalNodeType, _KIND_ENUM[kind])
    p.conditional.size = 1
    n = len(deps)
    if _add_node_takes_edges():   # plain (full) edges: a conditional node waits for all before it
        node = call(_rt.cudaGraphAddNode, graph, deps or None, None, n, p)
    else:
        node = call(_rt.cudaGraphAddNode, graph, deps or None, n, p)
    body = int(p.conditional.phGraph_out[0])
    if not body:
        raise CaptureError("cudaGraphAddNode gave the conditional node no body graph",
                           call="cudaGraphAddNode")
    return node, body


def _begin_to_graph(sh: int, graph: int, deps: list, mode: str) -> None:
    """Capture on ``sh`` into ``graph`` after ``deps`` (cudaGraphNode_t objects: the bindings
    refuse plain ints in a dependency list)."""
    n = len(deps)
    call(_rt.cudaStreamBeginCaptureToGraph, sh, graph, deps or None, None, n, CAPTURE_MODES[mode])


def _abandon(sh: int, mode: str) -> None:
    """Leave the stream in a fresh, empty capture so that the enclosing capture ends normally."""
    _rt.cudaGetLastError()
    _rt.cudaStreamBeginCapture(sh, CAPTURE_MODES[mode])


def _is_body_refusal(exc) -> bool:
    """A CUDA call refused inside a body (e.g. cudaMallocAsync, or a torch op hitting it): a
    capture problem of the body, reported as CaptureError."""
    from .errors import CudaError
    if isinstance(exc, CudaError) or _is_capture_refusal(exc):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("cuda error" in text or "cudaerror" in text)


def _node_type(node) -> str:
    t = call(_rt.cudaGraphNodeGetType, node)
    return getattr(t, "name", str(t)).replace("cudaGraphNodeType", "")


def _child_graph(node) -> int:
    return int(call(_rt.cudaGraphChildGraphNodeGetGraph, node))


def _body_problem(body: int, depth: int = 0) -> str | None:
    """Why a body graph cannot be a conditional body (recursing into child graphs), else None."""
    for node in graph_nodes(body):
        name = _node_type(node)
        if name not in _ALLOWED:
            return _WHY.get(name, f"a {name} node")
        if name == "Graph" and depth < 16:
            why = _body_problem(_child_graph(node), depth + 1)
            if why:
                return why
    return None


class conditional_node:
    """``with conditional_node("while" | "if", handle, stream) as c:`` captures the block into the
    body of a new conditional node of the graph being captured on ``stream``. The caller sets
    ``handle`` (``set_condition``): before the node, and for a WHILE loop at the end of the body.
    ``c.node``, ``c.body_graph``, ``c.parent_graph`` are the raw handles once entered."""

    _after_body_nodes = 0

    def __init__(self, kind: str, handle: ConditionalHandle, stream, *,
                 mode: str = "thread_local"):
        if not isinstance(kind, str) or kind not in _KIND_ENUM:
            raise ValueError(f"kind must be one of {sorted(_KIND_ENUM)}; got {kind!r}")
        if handle is None and type(self) is conditional_node:
            raise TypeError("handle must be a ConditionalHandle (conditional_handle()); got None")
        if handle is not None and not isinstance(handle, ConditionalHandle):
            raise TypeError(f"handle must be a ConditionalHandle (conditional_handle()); got "
                            f"{type(handle).__name__}")
        _check_mode(mode)
        stream_handle(stream, capturable=True)
        self.kind = kind
        self.handle = handle
        self.stream = stream
        self.mode = mode
        self.node = self.body_graph = self.parent_graph = None
        self._sh = None
        self._active = False

    def _prepare(self, sh: int) -> None:
        """Work recorded in the outer graph before the node (subclasses set the condition)."""

    def _after_body(self, sh: int) -> None:
        """Work recorded at the end of the body (subclasses re-evaluate a loop's condition)."""

    def __enter__(self):
        if self._active:
            raise RuntimeError("this conditional_node is already entered")
        sh = self._sh = stream_handle(self.stream, capturable=True)
        require_conditional_support()
        self._prepare(sh)
        graph, deps = _capture_info(sh, f"a {self.kind} body")
        if self.handle.graph != graph:
            raise ValueError("handle was made for another graph than the one being captured on "
                             "the stream (conditional_handle(stream) inside this capture)")
        node, body = _add_conditional_node(graph, deps, self.kind, self.handle.value)
        err, ended = _rt.cudaStreamEndCapture(sh)
        if int(err) != 0:
            # e.g. a side stream forked into the capture and not joined: the capture is gone
            name = _rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            _abandon(sh, self.mode)
            raise CaptureError(
                f"cannot start a {self.kind} body: ending the outer capture failed ({name}). Join "
                "every side stream forked into the capture (record an event on it and wait for "
                "it on the capturing stream) before the body starts.",
                call="cudaStreamEndCapture", code=err, name=name)
        try:
            _begin_to_graph(sh, body, [], self.mode)
        except BaseException:
            _begin_to_graph(sh, graph, [node], self.mode)   # give the outer capture back
            raise
        self.node, self.body_graph, self.parent_graph = int(node), body, graph
        self._node_obj = node
        register_conditional(node, ConditionalInfo(kind=self.kind, handle=self.handle.value,
                                                   bodies=(body,), default=self.handle.default))
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb):
        self._active = False
        sh = self._sh
        raised_here = False   # an error of _after_body: not propagating yet, so raise it below
        if exc_type is None:
            try:
                self._after_body(sh)
            except BaseException as e:  # noqa: BLE001 - reported below like a body error
                exc_type, exc, raised_here = type(e), e, True
        err, got = _rt.cudaStreamEndCapture(sh)
        got = int(got) if got is not None else 0
        if exc is not None and getattr(exc, POISON_ATTR, False):
            # a nested body was invalidated: what was ended is the empty stand-in capture
            if got and got != self.body_graph:
                _rt.cudaGraphDestroy(got)
            _abandon(sh, self.mode)
            return False
        if int(err) != 0:
            name = _rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            _abandon(sh, self.mode)   # never touch the outer graph again: see the module doc
            why = f"the captured code raised {exc_type.__name__}: {exc}; " if exc_type else ""
            error = CaptureError(
                f"the {self.kind} body's capture was invalidated ({why}cudaStreamEndCapture: "
                f"{name}); the outer graph is abandoned. {CAPTURE_HINT}",
                call="cudaStreamEndCapture", code=err, name=name)
            setattr(error, POISON_ATTR, True)
            raise error from exc
        problem = None
        if exc_type is None:
            if len(graph_nodes(self.body_graph)) <= self._after_body_nodes:
                problem = ("nothing was recorded in the body: the work probably ran on another "
                           "stream; launch it on the capturing stream")
            else:
                why = _body_problem(self.body_graph)
                if why:
                    problem = f"a conditional body cannot hold {why}"
        _begin_to_graph(sh, self.parent_graph, [self._node_obj], self.mode)
        if exc_type is not None:
            if isinstance(exc, CaptureError) or not _is_body_refusal(exc):
                if raised_here:
                    raise exc
                return False   # the body failed on its own account: re-raise it as it is
            raise CaptureError(f"{self.kind} body: the captured code raised {exc_type.__name__}: "
                               f"{exc}. A conditional body holds kernels, memcpy and memset only "
                               f"(no allocation, host sync or host callback). {CAPTURE_HINT}",
                               call=getattr(exc, "call", None)) from exc
        if problem:
            raise CaptureError(f"{self.kind} body refused: {problem}")
        return False


class while_loop(conditional_node):
    """``with while_loop(flag, stream): step()`` records ``while (*flag != 0) { step(); }``: the
    flag (an int32 in device memory that the step writes) is read before the node and after every
    pass of the body. ``do_while=True`` runs the body once before the first test."""

    _after_body_nodes = 1

    def __init__(self, flag, stream, *, do_while: bool = False, mode: str = "thread_local"):
        self._flag = _flag_ptr(flag)
        self.do_while = check_bool(do_while, "do_while")
        super().__init__("while", None, stream, mode=mode)

    def _prepare(self, sh: int) -> None:
        self.handle = conditional_handle(sh, default=1 if self.do_while else None)
        if not self.do_while:
            set_condition(self.handle, self._flag, sh)

    def _after_body(self, sh: int) -> None:
        set_condition(self.handle, self._flag, sh)


class if_then(conditional_node):
    """``with if_then(flag, stream): ...`` records ``if (*flag != 0) { ... }``, the flag (an int32
    in device memory) read when the graph reaches the node."""

    def __init__(self, flag, stream, *, mode: str = "thread_local"):
        self._flag = _flag_ptr(flag)
        super().__init__("if", None, stream, mode=mode)

    def _prepare(self, sh: int) -> None:
        self.handle = conditional_handle(sh)
        set_condition(self.handle, self._flag, sh)
