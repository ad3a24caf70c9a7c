"""cugraph_rt conditional nodes on a GPU: WHILE loops that count a device counter to N and stop
(replayed with new N), IF nodes, do-while, nested conditionals, a Triton kernel in a body compared
with eager, record trees / DOT, GraphExec update of a graph with conditional nodes, and the
errors (no capture, empty body, a body that allocates or syncs, nested capture). The cases that
invalidate a body capture run in a subprocess: a driver defect can crash the process that ends
such a capture (see cugraph_rt/conditional.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

import cugraph_rt as cg
from _cugraph_steps import sin_axpy
from cugraph_rt import conditional, conditional_records, nvrtc_kernels
from model.ops._util import pdl, pdl_wait

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _i32(v):
    return torch.full((1,), v, dtype=torch.int32, device="cuda")


@pytest.fixture
def stream():
    with cg.Stream() as s:
        yield s


def _counting_graph(s, counter, limit, flag, tmp, *, do_while=False):
    """counter = 0; flag = counter < limit; while (flag) { counter += 1; flag = counter < limit }"""
    with torch.cuda.stream(s.torch):
        with cg.capture(s, allocator="forbid") as cap:
            counter.zero_()
            torch.lt(counter, limit, out=tmp)
            flag.copy_(tmp)
            with cg.while_loop(flag, s, do_while=do_while) as loop:
                counter.add_(1)
                torch.lt(counter, limit, out=tmp)
                flag.copy_(tmp)
    return cap.graph, loop


def test_support_here():
    assert conditional.conditional_support() is None, conditional.conditional_support()
    major, _ = nvrtc_kernels.nvrtc_version()
    assert major >= 12


def test_while_counts_to_n_and_replays_with_new_n(stream):
    counter, limit, flag = _i32(-7), _i32(5), _i32(-1)
    tmp = torch.empty(1, dtype=torch.bool, device="cuda")
    graph, loop = _counting_graph(stream, counter, limit, flag, tmp)
    assert loop.kind == "while" and loop.node and loop.body_graph and loop.parent_graph
    assert loop.handle.default is None
    assert counter.item() == -7                      # capture ran nothing
    with graph.instantiate() as ex:
        for n in (5, 12, 0, 1, 300, 3):
            limit.fill_(n)
            counter.fill_(-99)
            torch.cuda.synchronize()
            ex.launch(stream)
            stream.synchronize()
            assert counter.item() == n, n            # stopped exactly at N
            assert flag.item() == 0


def test_do_while_runs_the_body_once_at_n_zero(stream):
    counter, limit, flag = _i32(0), _i32(0), _i32(0)
    tmp = torch.empty(1, dtype=torch.bool, device="cuda")
    graph, loop = _counting_graph(stream, counter, limit, flag, tmp, do_while=True)
    assert loop.handle.default == 1
    with graph.instantiate() as ex:
        for n, want in ((0, 1), (1, 1), (4, 4)):
            limit.fill_(n)
            torch.cuda.synchronize()
            ex.launch(stream)
            stream.synchronize()
            assert counter.item() == want, n


def test_if_node_takes_its_body_only_when_the_flag_is_set(stream):
    x = torch.zeros(4, device="cuda")
    flag = _i32(0)
    with torch.cuda.stream(stream.torch):
        with cg.capture(stream) as cap:
            x.add_(1)
            with cg.if_then(flag, stream) as node:
                x.mul_(10)
            x.add_(2)
    assert node.kind == "if"
    with cap.graph.instantiate() as ex:
        for f, expect in ((0, 3.0), (1, 42.0), (7, 432.0), (0, 435.0)):
            flag.fill_(f)
            torch.cuda.synchronize()
            ex.launch(stream)
            stream.synchronize()
            assert torch.equal(x, torch.full_like(x, expect)), (f, x)


def test_nested_if_inside_while(stream):
    counter, limit, flag = _i32(0), _i32(0), _i32(0)
    odd, odd_count = _i32(0), _i32(0)
    tmp = torch.empty(1, dtype=torch.bool, device="cuda")
    with torch.cuda.stream(stream.torch):
        with cg.capture(stream) as cap:
            counter.zero_()
            odd_count.zero_()
            torch.lt(counter, limit, out=tmp)
            flag.copy_(tmp)
            with cg.while_loop(flag, stream):
                counter.add_(1)
                torch.remainder(counter, 2, out=odd)
                with cg.if_then(odd, stream):
                    odd_count.add_(1)
                torch.lt(counter, limit, out=tmp)
                flag.copy_(tmp)
    with cap.graph.instantiate() as ex:
        for n in (0, 1, 6, 9):
            limit.fill_(n)
            torch.cuda.synchronize()
            ex.launch(stream)
            stream.synchronize()
            assert counter.item() == n and odd_count.item() == (n + 1) // 2, n
    tree = cg.node_tree(cap.graph)
    (loop,) = [r for r in tree if isinstance(r, cg.ConditionalRecord)]
    assert loop.kind == "while"
    (body,) = loop.bodies
    inner = [r for r in body if isinstance(r, cg.ConditionalRecord)]
    assert len(inner) == 1 and inner[0].kind == "if" and len(inner[0].bodies[0]) == 1
    # one condition kernel for the IF (before it), one for the loop's re-test
    names = [r.name for r in body if r.type == "Kernel"]
    assert names.count(nvrtc_kernels.CONDITION_KERNEL_NAME) == 2, names


def test_triton_body_equals_eager(stream):
    """K passes of a Triton kernel + torch ops in a WHILE body, bit-equal to the eager loop."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x0 = torch.randn(1000, device="cuda", generator=g)
    y = torch.randn(1000, device="cuda", generator=g)
    x = x0.clone()
    out = torch.empty_like(x)
    counter, limit, flag = _i32(0), _i32(0), _i32(0)
    tmp = torch.empty(1, dtype=torch.bool, device="cuda")

    def step():
        sin_axpy(x, y, 0.5, out=out)
        x.copy_(out * 0.9)

    with torch.cuda.stream(stream.torch):
        step()                                     # warm up: compile the Triton kernel
        with cg.capture(stream) as cap:
            counter.zero_()
            torch.lt(counter, limit, out=tmp)
            flag.copy_(tmp)
            with cg.while_loop(flag, stream):
                step()
                counter.add_(1)
                torch.lt(counter, limit, out=tmp)
                flag.copy_(tmp)
    with cap.graph.instantiate() as ex:
        for k in (7, 0, 3):
            x.copy_(x0)
            out.fill_(float("nan"))
            limit.fill_(k)
            torch.cuda.synchronize()
            ex.launch(stream)
            stream.synchronize()
            got = x.clone()
            x.copy_(x0)
            for _ in range(k):
                step()
            torch.cuda.synchronize()
            assert torch.equal(got, x), k
            assert counter.item() == k


def test_records_and_dot(stream, tmp_path):
    counter, limit, flag = _i32(0), _i32(3), _i32(0)
    tmp = torch.empty(1, dtype=torch.bool, device="cuda")
    graph, loop = _counting_graph(stream, counter, limit, flag, tmp)
    flat = graph.nodes()
    assert [r.type for r in flat].count("Conditional") == 1
    tree = cg.node_tree(graph)
    (rec,) = [r for r in tree if isinstance(r, cg.ConditionalRecord)]
    assert (rec.kind, rec.handle) == ("while", loop.handle.value)
    names = [r.name for r in rec.bodies[0] if r.type == "Kernel"]
    assert names.count(nvrtc_kernels.CONDITION_KERNEL_NAME) == 1 and len(names) >= 4, names
    # the condition kernel before the node sits in the outer graph
    assert nvrtc_kernels.CONDITION_KERNEL_NAME in [r.name for r in flat if r.type == "Kernel"]
    path = conditional_records.write_tree_dot(graph, tmp_path / "loop.dot")
    text = open(path).read()
    assert "WHILE handle=" in text and "subgraph" in text
    driver_dot = open(graph.to_dot(tmp_path / "driver.dot")).read()
    assert nvrtc_kernels.CONDITION_KERNEL_NAME in driver_dot, driver_dot[:500]


def test_exec_update_of_a_graph_with_a_while_node(stream):
    """Same topology, new tensors: GraphExec.update takes the new graph's addresses (in place or
    by re-instantiating) and replays run on the new tensors."""
    tmp = torch.empty(1, dtype=torch.bool, device="cuda")
    a = (_i32(0), _i32(4), _i32(0))
    b = (_i32(0), _i32(6), _i32(0))
    graph_a, _ = _counting_graph(stream, *a, tmp)
    graph_b, _ = _counting_graph(stream, *b, tmp)
    with graph_a.instantiate() as ex:
        ex.launch(stream)
        stream.synchronize()
        assert a[0].item() == 4
        how = ex.update(graph_b)
        assert how in ("updated", "reinstantiated")
        a[0].fill_(-1)
        ex.launch(stream)
        stream.synchronize()
        assert b[0].item() == 6 and a[0].item() == -1
    # a body of another topology: update must not silently keep the old body
    counter, limit, flag = _i32(0), _i32(2), _i32(0)
    with torch.cuda.stream(stream.torch):
        with cg.capture(stream) as cap:
            counter.zero_()
            torch.lt(counter, limit, out=tmp)
            flag.copy_(tmp)
            with cg.while_loop(flag, stream):
                counter.add_(1)
                counter.add_(1)     # one node more in the body
                torch.lt(counter, limit, out=tmp)
                flag.copy_(tmp)
    with graph_b.instantiate() as ex:
        assert ex.update(cap.graph) == "reinstantiated"
        limit.fill_(5)
        torch.cuda.synchronize()
        ex.launch(stream)
        stream.synchronize()
        assert counter.item() == 6


def test_errors_without_capture_and_with_a_foreign_handle(stream):
    flag = _i32(1)
    with pytest.raises(cg.CaptureError, match="needs a stream capture underway"):
        with cg.while_loop(flag, stream):
            pass
    with pytest.raises(cg.CaptureError, match="needs a stream capture underway"):
        cg.set_condition(1, flag, stream)
    x = torch.zeros(1, device="cuda")
    with torch.cuda.stream(stream.torch):
        with cg.capture(stream) as first:   # kept alive: its graph's address is not reused
            x.add_(1)
            h = cg.conditional_handle(stream)
        assert h.graph == first.graph.handle
        with pytest.raises(ValueError, match="another graph"):
            with cg.capture(stream):
                x.add_(1)
                with cg.conditional_node("if", h, stream):
                    x.add_(1)


def test_empty_body_is_refused_and_the_stream_stays_usable(stream):
    flag, x = _i32(0), torch.zeros(1, device="cuda")
    with torch.cuda.stream(stream.torch):
        with pytest.raises(cg.CaptureError, match="nothing was recorded in the body"):
            with cg.capture(stream):
                x.add_(1)
                with cg.while_loop(flag, stream):
                    pass
        assert not stream.is_capturing()
        with cg.capture(stream) as cap:
            x.add_(1)
    with cap.graph.instantiate() as ex:
        ex.launch(stream)
        stream.synchronize()
    assert x.item() == 1.0


def test_python_error_in_a_body_propagates_as_is(stream):
    flag, x = _i32(0), torch.zeros(1, device="cuda")
    with torch.cuda.stream(stream.torch):
        with pytest.raises(KeyError, match="mine"):
            with cg.capture(stream):
                x.add_(1)
                with cg.if_then(flag, stream):
                    x.add_(1)
                    raise KeyError("mine")
        assert not stream.is_capturing()


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (a driver defect may crash it); its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests", "gpu")]))
    prelude = textwrap.dedent("""
        import torch, cugraph_rt as cg
        s = cg.Stream()
        flag = torch.ones(1, dtype=torch.int32, device="cuda")
        x = torch.zeros(1, device="cuda")
        def after():   # the stream still captures and replays
            with torch.cuda.stream(s.torch):
                with cg.capture(s) as cap:
                    x.add_(1)
            with cap.graph.instantiate() as ex:
                ex.launch(s); s.synchronize()
            assert x.item() >= 1.0
            print("STREAM-OK")
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_host_sync_in_a_body_is_a_capture_error():
    out = _run("""
        try:
            with torch.cuda.stream(s.torch):
                with cg.capture(s):
                    x.add_(1)
                    with cg.while_loop(flag, s):
                        x.add_(1)
                        x.item()                     # a host sync inside the body
        except cg.CaptureError as e:
            print("CAPTURE-ERROR", e)
        assert not s.is_capturing()
        after()
    """)
    assert "CAPTURE-ERROR" in out and "invalidated" in out and "STREAM-OK" in out, out


def test_async_allocation_in_a_body_is_a_capture_error():
    out = _run("""
        try:
            with torch.cuda.stream(s.torch):
                with cg.capture(s, allocator="async"):
                    x.add_(1)
                    with cg.if_then(flag, s):
                        buf = cg.DeviceBuffer(1 << 20, stream=s)   # cudaMallocAsync
                        cg.memset_async(buf, 0, 1 << 20, s)
        except cg.CaptureError as e:
            print("CAPTURE-ERROR", e)
        assert not s.is_capturing()
        after()
    """)
    assert "CAPTURE-ERROR" in out and "STREAM-OK" in out, out


def test_nested_capture_inside_a_body_is_a_capture_error():
    out = _run("""
        try:
            with torch.cuda.stream(s.torch):
                with cg.capture(s):
                    x.add_(1)
                    with cg.while_loop(flag, s):
                        x.add_(1)
                        with cg.capture(s):          # a capture inside a captured body
                            x.add_(1)
        except (cg.CaptureError, cg.CudaError) as e:
            print("REFUSED", type(e).__name__, e)
        assert not s.is_capturing()
        after()
    """)
    assert "REFUSED CaptureError" in out and "STREAM-OK" in out, out


def test_body_allocations_come_from_the_capture_pool(stream):
    """torch allocations inside a body are routed to the capture's private pool (routing is per
    stream, and the body is captured on the capturing stream): after the capture, eager
    allocations never get the body's memory while the graph lives; allocator='forbid' sees them."""
    counter, flag = _i32(0), _i32(1)
    seen = []
    with torch.cuda.stream(stream.torch):
        with cg.capture(stream) as cap:
            counter.zero_()
            with cg.if_then(flag, stream):
                t = counter.float() * 2.0          # allocates inside the body
                seen.append(t.data_ptr())
                counter.add_(t.to(torch.int32) + 1)
                del t
        eager = [torch.empty(1, device="cuda") for _ in range(64)]
        assert seen[0] not in {e.data_ptr() for e in eager}
        with pytest.raises(cg.CaptureError, match="allocator='forbid'"):
            with cg.capture(stream, allocator="forbid"):
                counter.zero_()
                with cg.if_then(flag, stream):
                    counter.add_(counter * 2)      # a temporary: an allocation in the body
    with cap.graph.instantiate() as ex:
        ex.launch(stream)
        stream.synchronize()
    assert counter.item() == 1


def test_global_mode_capture(stream):
    counter, limit, flag = _i32(0), _i32(4), _i32(0)
    tmp = torch.empty(1, dtype=torch.bool, device="cuda")
    with torch.cuda.stream(stream.torch):
        with cg.capture(stream, mode="global") as cap:
            counter.zero_()
            torch.lt(counter, limit, out=tmp)
            flag.copy_(tmp)
            with cg.while_loop(flag, stream, mode="global"):
                counter.add_(1)
                torch.lt(counter, limit, out=tmp)
                flag.copy_(tmp)
    with cap.graph.instantiate() as ex:
        ex.launch(stream)
        stream.synchronize()
    assert counter.item() == 4


def test_first_use_of_the_condition_kernel_inside_a_capture():
    """NVRTC compile and module load happen inside the capture (nothing warmed up first): the
    capture must survive them."""
    out = _run("""
        from cugraph_rt import nvrtc_kernels
        assert not nvrtc_kernels._functions
        n, f = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
        lim = torch.full((1,), 9, dtype=torch.int32, device="cuda")
        b = torch.empty(1, dtype=torch.bool, device="cuda")
        with torch.cuda.stream(s.torch):
            with cg.capture(s) as cap:
                n.zero_(); torch.lt(n, lim, out=b); f.copy_(b)
                with cg.while_loop(f, s):
                    n.add_(1); torch.lt(n, lim, out=b); f.copy_(b)
        with cap.graph.instantiate() as ex:
            ex.launch(s); s.synchronize()
        print("COUNT", n.item())
        after()
    """)
    assert "COUNT 9" in out and "STREAM-OK" in out, out


@triton.jit
def _pdl_add_kernel(x_ptr, n, USE_GDC: tl.constexpr, BLOCK: tl.constexpr):
    pdl_wait(USE_GDC)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


def _pdl_add(x):
    _pdl_add_kernel[(triton.cdiv(x.numel(), 128),)](x, x.numel(), BLOCK=128, **pdl(x))


def test_pdl_triton_kernels_around_and_inside_a_loop(stream):
    """Kernels launched with programmatic dependent launch (as the model's are) just before the
    loop, first in its body, and just after it: edges to and from a conditional node."""
    x = torch.zeros(300, device="cuda")
    counter, limit, flag = _i32(0), _i32(0), _i32(0)
    tmp = torch.empty(1, dtype=torch.bool, device="cuda")
    with torch.cuda.stream(stream.torch):
        _pdl_add(x)                                 # compile outside the capture
        with cg.capture(stream) as cap:
            counter.zero_()
            torch.lt(counter, limit, out=tmp)
            flag.copy_(tmp)
            _pdl_add(x)
            with cg.while_loop(flag, stream):
                _pdl_add(x)
                counter.add_(1)
                torch.lt(counter, limit, out=tmp)
                flag.copy_(tmp)
            _pdl_add(x)
    with cap.graph.instantiate() as ex:
        for n in (0, 5, 2):
            x.zero_()
            limit.fill_(n)
            torch.cuda.synchronize()
            ex.launch(stream)
            stream.synchronize()
            assert torch.equal(x, torch.full_like(x, n + 2.0)), n
