"""Graph (owns a cudaGraph_t: node list, DOT export) and GraphExec (instantiated: launch, upload,
update with fallback to re-instantiation). AutoFreeOnLaunch is on by default."""
from __future__ import annotations

import os

from cuda.bindings import runtime as _rt

from ._args import check_bool, check_int
from ._lifetime import Owned
from .device import require_cuda
from .errors import ClosedError, call, check
from .nodes import NodeRecord, graph_nodes, node_records

__all__ = ["Graph", "GraphExec", "graph_memory"]

_AUTO_FREE = _rt.cudaGraphInstantiateFlags.cudaGraphInstantiateFlagAutoFreeOnLaunch
_launch = _rt.cudaGraphLaunch


def _destroy_graph(handle: int, keepalive: list) -> None:
    _rt.cudaGraphDestroy(handle)
    keepalive.clear()


def _destroy_exec(handle_box: list) -> None:
    if handle_box and handle_box[0] is not None:
        _rt.cudaGraphExecDestroy(handle_box[0])
        handle_box[0] = None


def graph_memory(device: int | None = None) -> dict:
    """Graph-memory figures of a device (cudaDeviceGetGraphMemAttribute), in bytes."""
    if device is not None:
        device = check_int(device, "device", minimum=0)
    require_cuda()
    dev = int(call(_rt.cudaGetDevice)) if device is None else device
    A = _rt.cudaGraphMemAttributeType
    out = {}
    for key, attr in (("used_current", A.cudaGraphMemAttrUsedMemCurrent),
                      ("used_high", A.cudaGraphMemAttrUsedMemHigh),
                      ("reserved_current", A.cudaGraphMemAttrReservedMemCurrent),
                      ("reserved_high", A.cudaGraphMemAttrReservedMemHigh)):
        v = check(_rt.cudaDeviceGetGraphMemAttribute(dev, attr), "cudaDeviceGetGraphMemAttribute")
        out[key] = int(getattr(v, "value", v) if not isinstance(v, int) else v)
    return out


class Graph(Owned):
    """An owned ``cudaGraph_t``. ``Graph()`` creates an empty one; ``Graph(handle)`` takes
    ownership of a captured one. ``keep(obj)`` ties objects (memory pools, tensors the graph
    reads or writes) to the graph's lifetime."""

    def __init__(self, handle: int | None = None):
        if handle is not None:
            handle = check_int(int(handle) if isinstance(handle, _rt.cudaGraph_t) else handle,
                               "handle", minimum=1)
        require_cuda()
        if handle is None:
            handle = call(_rt.cudaGraphCreate, 0)
        self.handle = int(handle)
        self._keepalive: list = []
        self._own(_destroy_graph, self.handle, self._keepalive)

    def __repr__(self) -> str:
        if self.closed:
            return "<Graph closed>"
        return f"<Graph 0x{self.handle:x} nodes={self.num_nodes}>"

    def keep(self, obj) -> None:
        self._check_open()
        self._keepalive.append(obj)

    @property
    def num_nodes(self) -> int:
        self._check_open()
        return len(graph_nodes(self.handle))

    def nodes(self) -> list[NodeRecord]:
        """One record per node: type; kernels add demangled name, grid, block, shared memory."""
        self._check_open()
        return node_records(self.handle)

    def count(self, node_type: str) -> int:
        return sum(1 for n in self.nodes() if n.type == node_type)

    def to_dot(self, path, *, verbose: bool = True) -> str:
        """Write the graph as Graphviz DOT (cudaGraphDebugDotPrint); returns the path."""
        self._check_open()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
        path = os.fspath(path)
        flags = _rt.cudaGraphDebugDotFlags.cudaGraphDebugDotFlagsVerbose if verbose else 0
        try:
            call(_rt.cudaGraphDebugDotPrint, self.handle, path.encode(), flags)
        except TypeError:
            call(_rt.cudaGraphDebugDotPrint, self.handle, path.encode(), int(flags))
        return path

    def instantiate(self, *, auto_free_on_launch: bool = True, upload_stream=None) -> "GraphExec":
        return GraphExec(self, auto_free_on_launch=auto_free_on_launch,
                         upload_stream=upload_stream)


def _instantiate(graph_handle: int, auto_free: bool):
    """A cudaGraphExec_t (the object: passing it back is cheaper than an int)."""
    flags = _AUTO_FREE if auto_free else 0
    try:
        return call(_rt.cudaGraphInstantiate, graph_handle, flags)
    except TypeError:  # a release that wants a plain int
        return call(_rt.cudaGraphInstantiate, graph_handle, int(flags))


def _stream_arg(stream):
    """A cudaStream_t for a Stream (its prebuilt object), an int, or a bindings stream."""
    raw = getattr(stream, "_raw", None)
    if raw is not None:
        return raw
    if isinstance(stream, _rt.cudaStream_t):
        return stream
    from .stream import stream_handle
    return _rt.cudaStream_t(stream_handle(stream))


class GraphExec(Owned):
    """An instantiated graph. AutoFreeOnLaunch (default) lets a graph holding stream-ordered
    allocations it does not free be launched again; ``upload_stream`` uploads it at once."""

    def __init__(self, graph: Graph, *, auto_free_on_launch: bool = True, upload_stream=None):
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be a cugraph_rt.Graph; got {type(graph).__name__}")
        check_bool(auto_free_on_launch, "auto_free_on_launch")
        if upload_stream is not None:
            from .stream import stream_handle
            stream_handle(upload_stream, "upload_stream")
        if graph.closed:
            raise ClosedError("cannot instantiate a closed Graph")
        self.graph = graph
        self.auto_free_on_launch = bool(auto_free_on_launch)
        self._box = [_instantiate(graph.handle, self.auto_free_on_launch)]
        self.handle = int(self._box[0])
        self._own(_destroy_exec, self._box)
        if upload_stream is not None:
            self.upload(upload_stream)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"0x{self.handle:x}"
        return f"<GraphExec {state} auto_free_on_launch={self.auto_free_on_launch}>"

    def upload(self, stream) -> None:
        """Upload the executable graph to the device ahead of its first launch."""
        self._check_open()
        call(_rt.cudaGraphUpload, self._box[0], _stream_arg(stream))

    def launch(self, stream) -> None:
        """cudaGraphLaunch on ``stream`` (Stream or raw handle)."""
        h = self._box[0]
        if h is None:
            raise ClosedError("GraphExec is closed (used after close())")
        err = _launch(h, _stream_arg(stream))[0]
        if err:
            check((err,), "cudaGraphLaunch")

    def update(self, graph: Graph) -> str:
        """Take ``graph``'s parameters: in place through cudaGraphExecUpdate when the topology
        allows ("updated"), else by re-instantiating ("reinstantiated")."""
        self._check_open()
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be a cugraph_rt.Graph; got {type(graph).__name__}")
        if graph.closed:
            raise ClosedError("cannot update from a closed Graph")
        res = _rt.cudaGraphExecUpdate(self._box[0], graph.handle)
        if int(res[0]) == 0:
            self.graph = graph
            return "updated"
        _rt.cudaGetLastError()  # a refused update must not linger as the last error
        new = _instantiate(graph.handle, self.auto_free_on_launch)
        call(_rt.cudaGraphExecDestroy, self._box[0])
        self._box[0] = new
        self.handle = int(new)
        self.graph = graph
        return "reinstantiated"
