"""Records of conditional nodes and their body graphs: a tree of node records, a text outline and
a DOT rendering with each body as a cluster.

A driver before CUDA 13.2 cannot read a conditional node's parameters back
(cudaGraphNodeGetParams), so the nodes that cugraph_rt.conditional adds are registered here, by
node handle, when they are made; the driver is asked first where it can answer.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from cuda.bindings import runtime as _rt

from .nodes import NodeRecord, graph_nodes, node_records

__all__ = ["ConditionalRecord", "ConditionalInfo", "register_conditional", "node_tree",
           "tree_lines", "tree_to_dot", "write_tree_dot"]

KINDS = ("if", "while", "switch")


@dataclass(frozen=True)
class ConditionalInfo:
    kind: str                 # "if" | "while" | "switch"
    handle: int               # the cudaGraphConditionalHandle value
    bodies: tuple[int, ...]   # body graph handles (owned by the node)
    default: int | None = None


@dataclass(frozen=True)
class ConditionalRecord(NodeRecord):
    """A conditional node: its kind, handle, default and, per body graph, that body's records
    (themselves trees). ``kind`` is None where neither the driver nor the registry knows it."""
    kind: str | None = None
    handle: int | None = None
    default: int | None = None
    bodies: tuple = ()


_lock = threading.Lock()
_registry: dict[int, ConditionalInfo] = {}


def register_conditional(node: int, info: ConditionalInfo) -> None:
    """Remember what a conditional node is (node handles are unique while their graph lives)."""
    if not isinstance(info, ConditionalInfo):
        raise TypeError(f"info must be a ConditionalInfo; got {type(info).__name__}")
    if info.kind not in KINDS:
        raise ValueError(f"info.kind must be one of {KINDS}; got {info.kind!r}")
    with _lock:
        _registry[int(node)] = info


def _driver_info(node) -> ConditionalInfo | None:
    """What the driver says of a conditional node (CUDA 13.2+ drivers); None where it cannot."""
    fn = getattr(_rt, "cudaGraphNodeGetParams", None)
    if fn is None:
        return None
    try:
        err, p = fn(node)
        if int(err) != 0:
            _rt.cudaGetLastError()
            return None
        c = p.conditional
        kind = getattr(c.type, "name", str(c.type)).replace("cudaGraphCondType", "").lower()
        size = int(c.size)
        bodies = tuple(int(c.phGraph_out[i]) for i in range(size))
        if kind not in KINDS or not bodies or not all(bodies):
            return None
        return ConditionalInfo(kind=kind, handle=int(c.handle), bodies=bodies)
    except Exception:  # noqa: BLE001 - an older binding or driver: use the registry
        return None


def conditional_info(node) -> ConditionalInfo | None:
    with _lock:
        known = _registry.get(int(node))
    got = _driver_info(node)
    if got is None:
        return known
    if known is not None:   # the driver does not report the default value
        got = ConditionalInfo(got.kind, got.handle, got.bodies, known.default)
    return got


def node_tree(graph, *, _depth: int = 0) -> list[NodeRecord]:
    """The records of ``graph`` (a cugraph_rt.Graph or a cudaGraph_t handle), each conditional
    node a ConditionalRecord holding its bodies' records, recursively."""
    from .graph import Graph
    if isinstance(graph, Graph):
        graph._check_open()
        handle = graph.handle
    elif isinstance(graph, bool) or not hasattr(graph, "__index__") and not hasattr(graph, "getPtr"):
        raise TypeError(f"graph must be a cugraph_rt.Graph or a cudaGraph_t handle; got "
                        f"{type(graph).__name__}")
    else:
        handle = int(graph)
    if _depth > 16:
        raise RecursionError("conditional bodies nested more than 16 deep")
    flat = node_records(int(handle))
    if not any(r.type == "Conditional" for r in flat):
        return flat
    nodes = graph_nodes(int(handle))
    out: list[NodeRecord] = []
    for rec, node in zip(flat, nodes):
        if rec.type != "Conditional":
            out.append(rec)
            continue
        info = conditional_info(node)
        if info is None:
            out.append(ConditionalRecord(index=rec.index, type=rec.type))
            continue
        bodies = tuple(tuple(node_tree(b, _depth=_depth + 1)) for b in info.bodies)
        out.append(ConditionalRecord(index=rec.index, type=rec.type, kind=info.kind,
                                     handle=info.handle, default=info.default, bodies=bodies))
    return out


def _label(rec: NodeRecord) -> str:
    if isinstance(rec, ConditionalRecord):
        kind = (rec.kind or "?").upper()
        extra = "" if rec.default is None else f" default={rec.default}"
        return f"{kind} handle={rec.handle if rec.handle is not None else '?'}{extra}"
    if rec.type == "Kernel" and rec.name:
        grid = "" if rec.grid is None else f" grid={rec.grid} block={rec.block}"
        return f"Kernel {rec.name}{grid}"
    return rec.type


def tree_lines(records, indent: int = 0) -> list[str]:
    """A text outline of a record tree: one line per node, each body indented under its node."""
    from ._args import check_int
    indent = check_int(indent, "indent", minimum=0)
    lines = []
    pad = "  " * indent
    for rec in records:
        lines.append(f"{pad}[{rec.index}] {_label(rec)}")
        if isinstance(rec, ConditionalRecord):
            for i, body in enumerate(rec.bodies):
                lines.append(f"{pad}  body {i} ({len(body)} nodes):")
                lines.extend(tree_lines(body, indent + 2))
    return lines


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def tree_to_dot(records, name: str = "graph") -> str:
    """Graphviz DOT of a record tree: one box per node, each conditional body a cluster joined to
    its conditional node by a dashed edge. (Records carry no edges: nodes are listed in order.)"""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str; got {name!r}")
    out = [f'digraph "{_dot_escape(name)}" {{', "  node [shape=box, fontname=monospace];"]
    counter = [0]

    def emit(recs, prefix: str, depth: int) -> list[str]:
        ids = []
        for rec in recs:
            nid = f"{prefix}n{rec.index}"
            ids.append(nid)
            shape = ", shape=diamond" if isinstance(rec, ConditionalRecord) else ""
            out.append(f'{"  " * depth}"{nid}" [label="{_dot_escape(_label(rec))}"{shape}];')
            if isinstance(rec, ConditionalRecord):
                for i, body in enumerate(rec.bodies):
                    counter[0] += 1
                    cid = f"cluster_{counter[0]}"
                    out.append(f'{"  " * depth}subgraph "{cid}" {{')
                    out.append(f'{"  " * depth}  label="{_dot_escape(_label(rec))} body {i}";')
                    inner = emit(body, f"{nid}_b{i}_", depth + 1)
                    out.append(f'{"  " * depth}}}')
                    if inner:
                        out.append(f'{"  " * depth}"{nid}" -> "{inner[0]}" [style=dashed];')
        return ids

    emit(records, "", 1)
    out.append("}")
    return "\n".join(out) + "\n"


def write_tree_dot(graph, path) -> str:
    """Write ``tree_to_dot(node_tree(graph))`` to ``path``; returns the path. (Graph.to_dot writes
    the driver's own DOT, which also shows the bodies but without our kinds and defaults.)"""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.fspath(path)
    text = tree_to_dot(node_tree(graph), name=os.path.basename(path) or "graph")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
