"""cugraph_rt conditional nodes without a GPU: argument checks naming the value, version gating
with patched versions, the NVRTC condition kernel compiled to PTX/cubin where libnvrtc loads,
body checks and record trees / DOT of fake graphs."""
import pytest
import torch

import cugraph_rt as cg
from cugraph_rt import conditional as cond
from cugraph_rt import conditional_records as recs
from cugraph_rt import nvrtc_kernels as nk
from cugraph_rt.nodes import NodeRecord
from tests.needs import skip

ADDR = 0x7F0000001000   # a made-up device address: argument checks never dereference it
STREAM = 0x5555          # a made-up (non-legacy) stream handle


# -- version gating ------------------------------------------------------------------------------
def test_support_names_driver_and_runtime_versions():
    assert "no NVIDIA driver" in cond.conditional_support(0, 13050)
    why = cond.conditional_support(12030, 13050)
    assert "12.4" in why and "driver is older" in why
    assert "driver CUDA version 12.3" in why and "runtime 13.5" in why
    why = cond.conditional_support(13000, 12030)
    assert "runtime is older" in why and "runtime 12.3" in why
    assert cond.conditional_support(12040, 12040) is None
    assert cond.conditional_support(13000, 13050) is None


def test_support_names_missing_bindings(monkeypatch):
    monkeypatch.delattr(cond._rt, "cudaStreamBeginCaptureToGraph")
    why = cond.conditional_support(13000, 13000)
    assert "cudaStreamBeginCaptureToGraph" in why and "cuda-bindings" in why


def test_too_old_driver_raises_before_any_cuda_call(monkeypatch):
    monkeypatch.setattr(cond, "driver_version", lambda: 12030)
    monkeypatch.setattr(cond, "runtime_version", lambda: 13000)

    def no_call(*a, **k):   # gating must come before the capture is touched
        raise AssertionError("a CUDA call was made")
    monkeypatch.setattr(cond, "_capture_info", no_call)
    for enter in (lambda: cond.conditional_handle(STREAM),
                  lambda: cond.set_condition(1, ADDR, STREAM),
                  lambda: cond.while_loop(ADDR, STREAM).__enter__(),
                  lambda: cond.if_then(ADDR, STREAM).__enter__()):
        with pytest.raises(cg.CudaUnavailableError, match=r"driver CUDA version 12\.3.*runtime 13\.0"):
            enter()


def test_no_driver_here_is_unavailable_not_a_crash():
    with pytest.raises(cg.CudaUnavailableError, match="no NVIDIA driver"):
        cg.conditional_handle(STREAM)
    with pytest.raises(cg.CudaUnavailableError):
        with cg.while_loop(ADDR, STREAM):
            pass


# -- argument checks -----------------------------------------------------------------------------
class _Iface:
    def __init__(self, typestr, ptr=ADDR):
        self.__cuda_array_interface__ = {"typestr": typestr, "data": (ptr, False), "shape": (1,),
                                         "version": 3}


def test_flag_forms():
    assert cond._flag_ptr(ADDR) == ADDR
    assert cond._flag_ptr(_Iface("<i4")) == ADDR
    assert cond._flag_ptr(_Iface("<u4")) == ADDR


@pytest.mark.parametrize("flag, exc, words", [
    (True, TypeError, "flag"), (None, TypeError, "flag"), (1.5, TypeError, "flag"),
    ("0x10", TypeError, "flag"), (0, ValueError, "flag (address) must be >= 1"),
    (_Iface("<f4"), TypeError, "4-byte ints"), (_Iface("<i8"), TypeError, "'<i8'"),
    (_Iface("<i4", 0), ValueError, "null data pointer"),
    (torch.zeros(1, dtype=torch.float32), TypeError, "int32 tensor; got dtype torch.float32"),
    (torch.zeros(1, dtype=torch.int32), ValueError, "CUDA device; got device cpu"),
])
def test_flag_refusals_name_the_value(flag, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        cond._flag_ptr(flag)
    with pytest.raises(exc):
        cg.while_loop(flag, STREAM)
    with pytest.raises(exc):
        cg.if_then(flag, STREAM)


def test_constructor_refusals():
    with pytest.raises(ValueError, match="capture needs a created stream"):
        cg.while_loop(ADDR, 0)
    with pytest.raises(TypeError, match="do_while must be True or False; got 1"):
        cg.while_loop(ADDR, STREAM, do_while=1)
    with pytest.raises(ValueError, match="mode must be one of .*got 'loose'"):
        cg.if_then(ADDR, STREAM, mode="loose")
    with pytest.raises(ValueError, match="kind must be one of .*got 'for'"):
        cg.conditional_node("for", cg.ConditionalHandle(1, 2), STREAM)
    with pytest.raises(TypeError, match="handle must be a ConditionalHandle.*got None"):
        cg.conditional_node("while", None, STREAM)
    with pytest.raises(TypeError, match="handle must be a ConditionalHandle.*got int"):
        cg.conditional_node("if", 7, STREAM)
    with pytest.raises(TypeError, match="stream"):
        cg.while_loop(ADDR, None)


@pytest.mark.parametrize("default, exc, words", [
    (-1, ValueError, "default must be >= 0; got -1"), (2 ** 32, ValueError, "fit in 32 bits"),
    ("1", TypeError, "default must be an int"), (1.0, TypeError, "default must be an int"),
])
def test_handle_default_refusals(default, exc, words):
    with pytest.raises(exc, match=words):
        cg.conditional_handle(STREAM, default=default)


def test_set_condition_refusals():
    with pytest.raises(TypeError, match="handle must be a ConditionalHandle or an int; got bool"):
        cg.set_condition(True, ADDR, STREAM)
    with pytest.raises(ValueError, match="handle must be >= 0"):
        cg.set_condition(-3, ADDR, STREAM)
    with pytest.raises(TypeError, match="flag"):
        cg.set_condition(1, 2.0, STREAM)
    with pytest.raises(ValueError, match="capture needs a created stream"):
        cg.set_condition(1, ADDR, 0)
    assert int(cg.ConditionalHandle(value=9, graph=3)) == 9


def test_launch_refusals():
    with pytest.raises(ValueError, match="flag_ptr must be >= 1"):
        nk.launch_set_condition(1, 0, STREAM)
    with pytest.raises(TypeError, match="handle must be an int"):
        nk.launch_set_condition(None, ADDR, STREAM)
    with pytest.raises(ValueError, match="arch must be >= 50"):
        nk.compile_condition_kernel(35)


# -- the NVRTC condition kernel ------------------------------------------------------------------
def _need_nvrtc():
    try:
        return nk.nvrtc_version()
    except cg.CudaUnavailableError as exc:
        skip(f"needs libnvrtc (pip install nvidia-cuda-nvrtc): {exc}")


def test_kernel_source_sets_the_flag_test():
    src = nk.CONDITION_KERNEL_SOURCE
    assert f'extern "C" __global__ void {nk.CONDITION_KERNEL_NAME}(' in src
    assert "cudaGraphSetConditional(handle, *flag != 0 ? 1u : 0u)" in src


def test_nvrtc_compiles_the_kernel_to_ptx_and_cubin():
    _need_nvrtc()
    from cuda.bindings import nvrtc
    ptx = nk._compile(nvrtc, b"--gpu-architecture=compute_90", False).decode()
    assert f".visible .entry {nk.CONDITION_KERNEL_NAME}(" in ptx
    assert ".extern .func cudaGraphSetConditional" in ptx          # left to ptxas / the driver
    assert "ld.global.u32" in ptx or "ld.global.nc.u32" in ptx      # the flag is read on the device
    kind, image = nk.compile_condition_kernel(90)                  # H100/H200
    assert kind == "cubin" and image[:4] == b"\x7fELF" and len(image) > 1000
    assert nk.compile_condition_kernel(90) is nk.compile_condition_kernel(90)   # cached per arch


def test_nvrtc_unknown_arch_falls_back_to_ptx():
    _need_nvrtc()
    kind, image = nk.compile_condition_kernel(990)
    assert kind == "ptx" and nk.CONDITION_KERNEL_NAME.encode() in image


def test_missing_nvrtc_is_unavailable(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "cuda.bindings" and a and a[2] and "nvrtc" in a[2]:
            raise ImportError("libnvrtc.so.13 not found")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(cg.CudaUnavailableError, match="NVRTC .*cannot be loaded.*nvidia-cuda-nvrtc"):
        nk.nvrtc_version()


def test_condition_kernel_without_driver_is_unavailable():
    with pytest.raises(cg.CudaUnavailableError):
        nk.condition_kernel()


# -- what a body may hold ------------------------------------------------------------------------
def _fake_graphs(monkeypatch, graphs: dict, children: dict = None):
    """graphs: {graph: [(node, type name), ...]}; children: {node: child graph}."""
    monkeypatch.setattr(cond, "graph_nodes", lambda g: [n for n, _ in graphs[g]])
    types = {n: t for nodes in graphs.values() for n, t in nodes}
    monkeypatch.setattr(cond, "_node_type", lambda n: types[n])
    monkeypatch.setattr(cond, "_child_graph", lambda n: (children or {})[n])


def test_body_problem(monkeypatch):
    _fake_graphs(monkeypatch, {
        1: [(10, "Kernel"), (11, "Memcpy"), (12, "Memset"), (13, "Empty"), (14, "Conditional")],
        2: [(20, "Kernel"), (21, "MemAlloc")],
        3: [(30, "Host")],
        4: [(40, "Kernel"), (41, "Graph")],
        5: [(50, "MemFree")],
        6: [(60, "ExtSemaphoreSignal")],
    }, children={41: 5})
    assert cond._body_problem(1) is None
    assert "async allocator" in cond._body_problem(2)
    assert "host callback" in cond._body_problem(3)
    assert "cudaFreeAsync" in cond._body_problem(4)        # found inside a child graph
    assert "ExtSemaphoreSignal" in cond._body_problem(6)


# -- records of fake graphs ----------------------------------------------------------------------
def test_registry_checks():
    with pytest.raises(TypeError, match="ConditionalInfo"):
        recs.register_conditional(1, {"kind": "while"})
    with pytest.raises(ValueError, match="kind must be one of .*got 'loop'"):
        recs.register_conditional(1, recs.ConditionalInfo("loop", 1, (2,)))


def test_registry_answers_where_the_driver_cannot():
    info = recs.ConditionalInfo(kind="while", handle=5, bodies=(77,), default=1)
    recs.register_conditional(0xABC0, info)
    assert recs.conditional_info(0xABC0) == info          # no driver here: from the registry
    assert recs.conditional_info(0xABC8) is None


def _fake_tree(monkeypatch):
    flat = {
        100: [NodeRecord(0, "Kernel", name="prologue", grid=(1, 1, 1), block=(32, 1, 1)),
              NodeRecord(1, "Kernel", name="cugraph_rt_set_condition"),
              NodeRecord(2, "Conditional"), NodeRecord(3, "Memcpy")],
        200: [NodeRecord(0, "Kernel", name="step"), NodeRecord(1, "Conditional"),
              NodeRecord(2, "Kernel", name="cugraph_rt_set_condition")],
        300: [NodeRecord(0, "Memset")],
    }
    handles = {100: [1000, 1001, 1002, 1003], 200: [2000, 2001, 2002], 300: [3000]}
    monkeypatch.setattr(recs, "node_records", lambda g: flat[g])
    monkeypatch.setattr(recs, "graph_nodes", lambda g: handles[g])
    monkeypatch.setattr(recs, "_driver_info", lambda n: None)
    recs.register_conditional(1002, recs.ConditionalInfo("while", 11, (200,), default=None))
    recs.register_conditional(2001, recs.ConditionalInfo("if", 12, (300,), default=0))


def test_node_tree_nests_bodies(monkeypatch):
    _fake_tree(monkeypatch)
    tree = cg.node_tree(100)
    assert [r.type for r in tree] == ["Kernel", "Kernel", "Conditional", "Memcpy"]
    loop = tree[2]
    assert isinstance(loop, cg.ConditionalRecord) and isinstance(loop, NodeRecord)
    assert (loop.kind, loop.handle, loop.default) == ("while", 11, None)
    (body,) = loop.bodies
    assert [r.name for r in body if r.type == "Kernel"] == ["step", "cugraph_rt_set_condition"]
    inner = body[1]
    assert (inner.kind, inner.handle, inner.default) == ("if", 12, 0)
    assert [r.type for r in inner.bodies[0]] == ["Memset"]


def test_tree_lines_and_dot(monkeypatch):
    _fake_tree(monkeypatch)
    tree = cg.node_tree(100)
    lines = recs.tree_lines(tree)
    assert "[2] WHILE handle=11" in lines
    assert "  body 0 (3 nodes):" in lines
    assert "    [1] IF handle=12 default=0" in lines
    assert "        [0] Memset" in lines
    dot = recs.tree_to_dot(tree, name="step")
    assert dot.startswith('digraph "step" {') and dot.rstrip().endswith("}")
    assert dot.count("subgraph ") == 2                       # one cluster per body, nested
    assert '"n2" [label="WHILE handle=11", shape=diamond];' in dot
    assert '"n2" -> "n2_b0_n0" [style=dashed];' in dot      # the loop node to its body
    assert '"n2_b0_n1" -> "n2_b0_n1_b0_n0" [style=dashed];' in dot
    assert 'label="Kernel step"' in dot
    assert dot.count("{") == dot.count("}")
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        recs.tree_to_dot(tree, name="")


def test_write_tree_dot(monkeypatch, tmp_path):
    _fake_tree(monkeypatch)
    path = recs.write_tree_dot(100, tmp_path / "loop.dot")
    text = open(path).read()
    assert "WHILE handle=11" in text and 'digraph "loop.dot"' in text
    with pytest.raises(TypeError, match="path must be a str"):
        recs.write_tree_dot(100, 5)


def test_tree_argument_checks():
    with pytest.raises(TypeError, match="graph must be a cugraph_rt.Graph or a cudaGraph_t handle; got str"):
        cg.node_tree("g")
    with pytest.raises(TypeError, match="got bool"):
        cg.node_tree(True)
    with pytest.raises(ValueError, match="indent must be >= 0; got -1"):
        recs.tree_lines([], indent=-1)


def test_real_bindings_accept_our_argument_types():
    """Without a driver every runtime call returns cudaErrorInsufficientDriver, but only after the
    bindings have checked the argument types: so reaching CudaUnavailableError (not TypeError)
    shows the installed cuda-bindings take the arguments the conditional code passes."""
    from cuda.bindings import runtime as rt
    node = rt.cudaGraphNode_t(0x123)
    with pytest.raises(cg.CudaUnavailableError):
        cond._add_conditional_node(0x77, [node], "while", 5)
    with pytest.raises(cg.CudaUnavailableError):
        cond._add_conditional_node(0x77, [], "if", 5)
    with pytest.raises(cg.CudaUnavailableError):
        cond._begin_to_graph(STREAM, 0x77, [node], "thread_local")
    with pytest.raises(cg.CudaUnavailableError):
        cond._begin_to_graph(STREAM, 0x77, [], "global")
    with pytest.raises(TypeError):   # plain ints in a dependency list are refused by the bindings
        cond._begin_to_graph(STREAM, 0x77, [0x123], "relaxed")
    res = rt.cudaStreamGetCaptureInfo(STREAM)
    assert len(res) in (6, 7)            # (err, status, id, graph, deps[, edge data], count)
