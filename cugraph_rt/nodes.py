"""Node records of a captured graph: type, and for kernels the demangled name and launch
configuration, read through the driver API (the runtime's cudaGraphKernelNodeGetParams fails on
torch and Triton kernel nodes)."""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

from cuda.bindings import runtime as _rt

from .errors import call

__all__ = ["NodeRecord", "graph_nodes", "node_records", "demangle"]


@dataclass(frozen=True)
class NodeRecord:
    index: int
    type: str                       # "Kernel", "Memcpy", "Memset", "MemAlloc", "MemFree", ...
    name: str | None = None         # kernels: demangled function name
    grid: tuple[int, int, int] | None = None
    block: tuple[int, int, int] | None = None
    shared_mem: int | None = None   # dynamic shared memory bytes


def graph_nodes(graph: int) -> list:
    """The cudaGraphNode_t handles of a graph (count first, then the nodes)."""
    res = call(_rt.cudaGraphGetNodes, graph, 0)
    count = int(res[-1]) if isinstance(res, tuple) else int(res)
    if count == 0:
        return []
    res = call(_rt.cudaGraphGetNodes, graph, count)
    nodes = res[0] if isinstance(res, tuple) else res
    return list(nodes)[:count]


def _type_name(t) -> str:
    name = getattr(t, "name", str(t))
    return name.replace("cudaGraphNodeType", "") or name


_demangler = None


def demangle(name: str) -> str:
    """Demangle a C++ symbol with libstdc++'s __cxa_demangle; plain names come back as is."""
    global _demangler
    if not name.startswith("_Z"):
        return name
    if _demangler is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
            fn = lib.__cxa_demangle
            fn.restype = ctypes.c_void_p
            fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.POINTER(ctypes.c_int)]
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.free.argtypes = [ctypes.c_void_p]
            _demangler = (fn, libc.free)
        except Exception:  # noqa: BLE001
            _demangler = False
    if not _demangler:
        return name
    fn, free = _demangler
    status = ctypes.c_int(0)
    out = fn(name.encode(), None, None, ctypes.byref(status))
    if status.value != 0 or not out:
        return name
    try:
        return ctypes.string_at(out).decode(errors="replace")
    finally:
        free(out)


def _kernel_info(node) -> dict:
    """name/grid/block/shared_mem of a kernel node through the driver API; {} if unreadable."""
    try:
        from cuda.bindings import driver as _dr
        err, p = _dr.cuGraphKernelNodeGetParams(_dr.CUgraphNode(int(node)))
        if int(err) != 0:
            return {}
        info = {
            "grid": (int(p.gridDimX), int(p.gridDimY), int(p.gridDimZ)),
            "block": (int(p.blockDimX), int(p.blockDimY), int(p.blockDimZ)),
            "shared_mem": int(p.sharedMemBytes),
        }
        err, raw = _dr.cuFuncGetName(p.func)
        if int(err) == 0 and raw:
            raw = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            info["name"] = demangle(raw)
        return info
    except Exception:  # noqa: BLE001 - a missing name is not worth failing over
        return {}


def node_records(graph: int) -> list[NodeRecord]:
    records = []
    for i, node in enumerate(graph_nodes(graph)):
        t = _type_name(call(_rt.cudaGraphNodeGetType, node))
        extra = _kernel_info(node) if t == "Kernel" else {}
        records.append(NodeRecord(index=i, type=t, **extra))
    return records
