"""The order of CUDA calls with which cugraph_rt.conditional captures a body, checked against a
fake runtime (a small model of stream capture): the node goes into the outer graph after the work
before it, the body into the node's body graph, the outer capture resumes after the node; the
error paths leave the stream in a capture the enclosing one can end, and never destroy an outer
graph whose body capture was invalidated (a driver defect crashes there)."""
from types import SimpleNamespace

import pytest
from cuda.bindings import runtime as real_rt

import cugraph_rt as cg
from cugraph_rt import conditional as cond
from cugraph_rt import nvrtc_kernels as nk

S = 0x5000   # the stream
FLAG = 0x7F0000002000
ACTIVE = real_rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive
INVALIDATED = real_rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusInvalidated
NONE = real_rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
E = real_rt.cudaError_t


class Node(int):
    """A node handle; the fake's dependency lists hold these (as the bindings hold objects)."""


class FakeRuntime:
    cudaStreamCaptureStatus = real_rt.cudaStreamCaptureStatus
    cudaStreamCaptureMode = real_rt.cudaStreamCaptureMode
    cudaGraphNodeType = real_rt.cudaGraphNodeType
    cudaGraphConditionalNodeType = real_rt.cudaGraphConditionalNodeType
    cudaGraphConditionalHandleFlags = real_rt.cudaGraphConditionalHandleFlags
    TYPES = ("Kernel", "Conditional", "MemAlloc", "MemFree", "Host", "Memcpy", "Memset")

    def __init__(self):
        self.graphs: dict[int, list] = {}     # graph -> [(node, type, deps)]
        self.capture = None                    # {"graph", "deps", "status"} of stream S
        self.destroyed: list[int] = []
        self.handles = []
        self._next = 100
        self.log = []

    def _id(self):
        self._next += 1
        return self._next

    # -- what the code under test calls ---------------------------------------------------------
    def cudaGraphNodeParams(self):
        return SimpleNamespace(type=None, conditional=SimpleNamespace(
            handle=None, type=None, size=None, phGraph_out=[0]))

    def cudaStreamGetCaptureInfo(self, sh):
        c = self.capture
        if c is None:
            return (E.cudaSuccess, NONE, 0, None, None, None, 0)
        return (E.cudaSuccess, c["status"], 1, c["graph"], list(c["deps"]), None, len(c["deps"]))

    def cudaGraphConditionalHandleCreate(self, graph, default, flags):
        h = self._id()
        self.handles.append((h, graph, default, flags))
        return (E.cudaSuccess, h)

    def cudaGraphAddNode(self, graph, deps, edges, n, p):
        assert deps is None or all(isinstance(d, Node) for d in deps)
        node, body = Node(self._id()), self._id()
        self.graphs[body] = []
        self.graphs[graph].append((node, "Conditional", list(deps or [])))
        p.conditional.phGraph_out = [body]
        self.log.append(("add", p.conditional.type.name, p.conditional.handle, p.conditional.size))
        return (E.cudaSuccess, node)

    def cudaStreamEndCapture(self, sh):
        c, self.capture = self.capture, None
        if c is None:
            return (E.cudaErrorIllegalState, None)
        self.log.append(("end", c["graph"]))
        if c["status"] == INVALIDATED:
            return (E.cudaErrorStreamCaptureInvalidated, None)
        return (E.cudaSuccess, c["graph"])

    def cudaStreamBeginCaptureToGraph(self, sh, graph, deps, edges, n, mode):
        assert self.capture is None and mode in self.cudaStreamCaptureMode
        assert deps is None or all(isinstance(d, Node) for d in deps)
        self.capture = {"graph": graph, "deps": list(deps or []), "status": ACTIVE}
        self.log.append(("begin_to", graph, list(deps or [])))
        return (E.cudaSuccess,)

    def cudaStreamBeginCapture(self, sh, mode):
        assert self.capture is None
        g = self._id()
        self.graphs[g] = []
        self.capture = {"graph": g, "deps": [], "status": ACTIVE}
        self.log.append(("begin", g))
        return (E.cudaSuccess,)

    def cudaGraphDestroy(self, g):
        self.destroyed.append(int(g))
        return (E.cudaSuccess,)

    def cudaGetLastError(self):
        return (E.cudaSuccess,)

    def cudaGetErrorName(self, err):
        return (E.cudaSuccess, err.name.encode())

    # -- what the captured code does -------------------------------------------------------------
    def op(self, kind="Kernel", name=None):
        c = self.capture
        assert c is not None and c["status"] == ACTIVE
        node = Node(self._id())
        self.graphs[c["graph"]].append((node, name or kind, list(c["deps"])))
        c["deps"] = [node]

    def invalidate(self):
        self.capture["status"] = INVALIDATED

    def names(self, g):
        return [t for _, t, _ in self.graphs[g]]


@pytest.fixture
def rt(monkeypatch):
    fake = FakeRuntime()
    monkeypatch.setattr(cond, "_rt", fake)
    monkeypatch.setattr(cond, "driver_version", lambda: 13000)
    monkeypatch.setattr(cond, "runtime_version", lambda: 13000)
    monkeypatch.setattr(cond, "_add_node_takes_edges", lambda: True)
    monkeypatch.setattr(cond, "graph_nodes", lambda g: [n for n, _, _ in fake.graphs[int(g)]])
    def node_type(n):   # what the fake recorded; labels of user ops and set kernels are kernels
        label = next(t for nodes in fake.graphs.values() for m, t, _ in nodes if m == n)
        return label if label in fake.TYPES else "Kernel"
    monkeypatch.setattr(cond, "_node_type", node_type)
    monkeypatch.setattr(nk, "launch_set_condition",
                        lambda h, ptr, sh: fake.op(name=f"set:{h}:{ptr:#x}"))
    fake.cudaStreamBeginCapture(S, None)
    fake.outer = fake.capture["graph"]
    return fake


def test_while_loop_call_order(rt):
    rt.op(name="before")
    with cg.while_loop(FLAG, S) as loop:
        rt.op(name="step")
    rt.op(name="after")
    outer = rt.outer
    h = loop.handle.value
    assert rt.handles == [(h, outer, 0, 0)]                       # no default: set before the node
    assert rt.names(outer) == ["before", f"set:{h}:{FLAG:#x}", "Conditional", "after"]
    assert rt.names(loop.body_graph) == ["step", f"set:{h}:{FLAG:#x}"]   # re-test at the end
    (cnode, _, cdeps), (after, _, adeps) = rt.graphs[outer][2], rt.graphs[outer][3]
    assert cdeps == [rt.graphs[outer][1][0]]                      # the node waits for the set kernel
    assert adeps == [cnode] and loop.node == cnode                # the outer capture resumed after it
    assert ("add", "cudaGraphCondTypeWhile", h, 1) in rt.log
    assert rt.capture["graph"] == outer and rt.destroyed == []
    info = cg.conditional_records.conditional_info(loop.node)
    assert info.kind == "while" and info.bodies == (loop.body_graph,)


def test_do_while_uses_a_default_and_no_set_before(rt):
    with cg.while_loop(FLAG, S, do_while=True) as loop:
        rt.op(name="step")
    flag = real_rt.cudaGraphConditionalHandleFlags.cudaGraphCondAssignDefault
    assert rt.handles == [(loop.handle.value, rt.outer, 1, flag)]
    assert rt.names(rt.outer) == ["Conditional"]


def test_if_then_and_nesting(rt):
    with cg.if_then(FLAG, S) as outer_if:
        rt.op(name="a")
        with cg.while_loop(FLAG + 4, S) as inner:
            rt.op(name="b")
        rt.op(name="c")
    assert rt.names(rt.outer) == [f"set:{outer_if.handle.value}:{FLAG:#x}", "Conditional"]
    body = outer_if.body_graph
    assert inner.parent_graph == body and inner.handle.graph == body   # the handle is the body's
    assert rt.names(body) == ["a", f"set:{inner.handle.value}:{FLAG + 4:#x}", "Conditional", "c"]
    assert rt.names(inner.body_graph) == ["b", f"set:{inner.handle.value}:{FLAG + 4:#x}"]
    assert rt.capture["graph"] == rt.outer


def test_empty_body_refused_and_outer_resumed(rt):
    with pytest.raises(cg.CaptureError, match="nothing was recorded in the body"):
        with cg.while_loop(FLAG, S):
            pass
    assert rt.capture["graph"] == rt.outer and rt.capture["status"] == ACTIVE
    assert rt.destroyed == []


def test_forbidden_node_in_body(rt):
    with pytest.raises(cg.CaptureError, match="async allocator"):
        with cg.if_then(FLAG, S):
            rt.op("MemAlloc")
            rt.op(name="k")
    assert rt.capture["graph"] == rt.outer      # the outer graph stays whole: capture() ends it


def test_invalidated_body_abandons_the_outer_graph(rt):
    with pytest.raises(cg.CaptureError, match="invalidated.*outer graph is abandoned") as info:
        with cg.while_loop(FLAG, S):
            rt.op(name="k")
            rt.invalidate()
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    assert getattr(info.value, cond.POISON_ATTR) is True
    assert isinstance(info.value.__cause__, RuntimeError)
    # a fresh stand-in capture, so the enclosing capture ends; the outer graph never touched again
    assert rt.capture["graph"] != rt.outer and rt.graphs[rt.capture["graph"]] == []
    assert rt.outer not in rt.destroyed
    assert [e for e in rt.log if e[0] == "begin_to"][-1][1] != rt.outer


def test_invalidated_nested_body_abandons_every_level(rt):
    with pytest.raises(cg.CaptureError, match="invalidated"):
        with cg.while_loop(FLAG, S) as outer_loop:
            rt.op(name="k")
            with cg.if_then(FLAG, S):
                rt.op(name="j")
                rt.invalidate()
    assert rt.outer not in rt.destroyed and outer_loop.body_graph not in rt.destroyed
    assert rt.capture["graph"] not in (rt.outer, outer_loop.body_graph)
    assert rt.graphs[rt.capture["graph"]] == []


def test_python_error_propagates_and_outer_resumes(rt):
    with pytest.raises(KeyError, match="mine"):
        with cg.if_then(FLAG, S):
            rt.op(name="k")
            raise KeyError("mine")
    assert rt.capture["graph"] == rt.outer and rt.capture["status"] == ACTIVE


def test_cuda_error_in_body_becomes_capture_error(rt):
    with pytest.raises(cg.CaptureError, match="if body: the captured code raised CudaError"):
        with cg.if_then(FLAG, S):
            rt.op(name="k")
            raise cg.CudaError("cudaMallocAsync failed: cudaErrorNotSupported",
                               call="cudaMallocAsync")
    assert rt.capture["graph"] == rt.outer


def test_unjoined_outer_capture(rt, monkeypatch):
    real_end = rt.cudaStreamEndCapture

    def end(sh):
        rt.capture = None
        return (E.cudaErrorStreamCaptureUnjoined, None)
    monkeypatch.setattr(rt, "cudaStreamEndCapture", end)
    with pytest.raises(cg.CaptureError, match="Join every side stream"):
        with cg.while_loop(FLAG, S):
            raise AssertionError("the body must not run")
    monkeypatch.setattr(rt, "cudaStreamEndCapture", real_end)
    assert rt.capture is not None and rt.capture["graph"] != rt.outer   # the stand-in capture


def test_outside_a_capture(rt):
    rt.capture = None
    with pytest.raises(cg.CaptureError, match="needs a stream capture underway.*not capturing"):
        with cg.while_loop(FLAG, S):
            pass
    rt.cudaStreamBeginCapture(S, None)
    rt.invalidate()
    with pytest.raises(cg.CaptureError, match="the stream is invalidated"):
        cg.conditional_handle(S)


def test_foreign_handle(rt):
    h = cg.ConditionalHandle(value=5, graph=rt.outer + 999)
    with pytest.raises(ValueError, match="another graph"):
        with cg.conditional_node("if", h, S):
            pass
    assert rt.capture["graph"] == rt.outer and rt.names(rt.outer) == []


def test_reentering_is_refused(rt):
    node = cg.if_then(FLAG, S)
    with node:
        rt.op(name="k")
        with pytest.raises(RuntimeError, match="already entered"):
            node.__enter__()


def test_error_at_the_end_of_a_body_is_raised(rt, monkeypatch):
    """The loop's re-test is recorded after the block: if that fails, the failure is raised
    (not swallowed because the block itself ended normally), and the outer capture resumes."""
    calls = []

    def launch(h, ptr, sh):
        calls.append(h)
        if len(calls) == 2:
            raise cg.CudaError("cuLaunchKernel failed: CUDA_ERROR_INVALID_HANDLE",
                               call="cuLaunchKernel")
        rt.op(name="set")
    monkeypatch.setattr(nk, "launch_set_condition", launch)
    with pytest.raises(cg.CaptureError, match="while body: the captured code raised CudaError"):
        with cg.while_loop(FLAG, S):
            rt.op(name="k")
    assert len(calls) == 2 and rt.capture["graph"] == rt.outer

    def launch_plain(h, ptr, sh):
        calls.append(h)
        if len(calls) == 4:
            raise ZeroDivisionError("not a CUDA error")
        rt.op(name="set")
    monkeypatch.setattr(nk, "launch_set_condition", launch_plain)
    with pytest.raises(ZeroDivisionError):
        with cg.while_loop(FLAG, S):
            rt.op(name="k")
    assert rt.capture["graph"] == rt.outer
