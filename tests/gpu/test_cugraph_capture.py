"""cugraph_rt core on a GPU: streams, buffers, capture, Graph/GraphExec."""
import numpy as np
import pytest
import torch

import cugraph_rt as cg
from _cugraph_steps import elementwise_step

pytestmark = pytest.mark.gpu


def test_device_info_and_buffers():
    assert cg.is_available() is True     # tests/test_cugraph_errors.py: False without driver/device
    info = cg.device_info()
    assert info["name"] and info["total_memory"] > 0 and info["driver_version"] > 0
    with cg.Stream() as s, cg.DeviceBuffer(4096) as d, cg.HostBuffer(4096) as h:
        a = h.numpy(np.float32, (1024,))
        a[:] = np.arange(1024, dtype=np.float32)
        d.copy_from(h, stream=s)
        t = d.as_tensor(torch.float32, (1024,))
        with torch.cuda.stream(s.torch):
            t.mul_(2)
        h2 = cg.HostBuffer(4096)
        d.copy_to(h2, stream=s)
        s.synchronize()
        assert np.array_equal(h2.numpy(np.float32), a * 2)
        # the __cuda_array_interface__ view and as_tensor are the same memory, no copy; both hold
        # what the torch op wrote (compared with the expected values, not with each other)
        viewed = torch.as_tensor(d.view(np.float32, (1024,)), device="cuda")
        assert viewed.data_ptr() == t.data_ptr() == d.ptr
        expect = torch.arange(1024, dtype=torch.float32, device="cuda") * 2
        assert torch.equal(viewed, expect) and torch.equal(t, expect)
        h2.close()
    assert s.closed and d.closed and h.closed
    for use in (s.synchronize, d.view, lambda: h.numpy(np.float32)):
        with pytest.raises(cg.ClosedError):
            use()
    d.close(), s.close()  # idempotent


def test_async_buffer_and_event_timing():
    """A stream-ordered buffer: fill_zero zeroes all of it (it held 0xAB bytes), and the events
    around 200 launches of it time something (> 0, under a second)."""
    with cg.Stream() as s, cg.HostBuffer(1 << 20) as host:
        buf = cg.DeviceBuffer(1 << 20, stream=s)
        host.numpy(np.uint8)[:] = 0xAB
        buf.copy_from(host, stream=s)
        s.synchronize()             # the host buffer is rewritten below
        e0, e1 = cg.Event(), cg.Event()
        e0.record(s)
        for _ in range(200):
            buf.fill_zero(stream=s)
        e1.record(s)
        host.numpy(np.uint8)[:] = 0xCD
        buf.copy_to(host, stream=s)
        e1.synchronize()
        s.synchronize()
        assert (host.numpy(np.uint8) == 0).all()
        assert 0.0 < e0.elapsed_ms(e1) < 1000.0
        buf.close()
        s.synchronize()


def test_capture_graph_nodes_dot_and_launch(tmp_path):
    s = cg.Stream()
    x = torch.randn(4096, device="cuda")
    with torch.cuda.stream(s.torch):
        ref = elementwise_step(x)
        with cg.capture(s) as cap:
            out = elementwise_step(x)
    g = cap.graph
    nodes = g.nodes()
    kernels = [n for n in nodes if n.type == "Kernel"]
    assert len(kernels) >= 2
    triton_nodes = [n for n in kernels if n.name and "_sin_axpy_kernel" in n.name]
    assert triton_nodes, [n.name for n in kernels]
    k = triton_nodes[0]
    assert k.grid == (16, 1, 1) and k.block[0] > 0 and k.shared_mem is not None
    torch_nodes = [n for n in kernels if n.name and "at::" in n.name]
    assert torch_nodes, "torch kernel names should come back demangled"
    dot = g.to_dot(tmp_path / "g.dot")
    assert "_sin_axpy_kernel" in open(dot).read()
    ex = g.instantiate(upload_stream=s)
    with torch.cuda.stream(s.torch):
        out.fill_(float("nan"))  # poison: the replay must write every element
    ex.launch(s)
    s.synchronize()
    assert torch.equal(out, ref)
    assert ex.update(g) in ("updated", "reinstantiated")
    ex.launch(s)
    s.synchronize()
    assert torch.equal(out, ref)
    mem = cg.graph_memory()
    assert set(mem) == {"used_current", "used_high", "reserved_current", "reserved_high"}
    ex.close(), g.close(), s.close()
    with pytest.raises(cg.ClosedError):
        ex.launch(s)


def test_empty_capture_refused():
    s, other = cg.Stream(), cg.Stream()
    buf = cg.DeviceBuffer(1024)
    with pytest.raises(cg.CaptureError, match="empty capture"):
        with cg.capture(s):
            buf.fill_zero(stream=other)  # work on another stream: nothing captured
    assert not s.is_capturing()
    other.synchronize()
    with cg.capture(s) as cap:
        buf.fill_zero(stream=s)
    assert cap.graph.num_nodes == 1
    cap.graph.close(), buf.close(), s.close(), other.close()


def test_sync_inside_capture_raises_and_stream_survives():
    s = cg.Stream()
    buf = cg.DeviceBuffer(1024)
    with pytest.raises(cg.CaptureError) as info:
        with cg.capture(s):
            buf.fill_zero(stream=s)
            s.synchronize()
    assert "synchronize" in str(info.value)
    assert not s.is_capturing()
    buf.fill_zero(stream=s)
    s.synchronize()
    x = torch.randn(1000, device="cuda")
    with torch.cuda.stream(s.torch):
        with pytest.raises(cg.CaptureError, match="item"):
            with cg.capture(s):
                y = x * 2
                y.sum().item()
        # torch, the stream and capture all still work
        z = (x * 2).sum()
        with cg.capture(s) as cap:
            w = x * 3
        w.fill_(float("nan"))       # capture executed nothing; the launch must write all of w
    ex = cap.graph.instantiate()
    ex.launch(s)
    s.synchronize()
    assert torch.equal(w, x * 3) and torch.isfinite(z)
    ex.close(), cap.graph.close(), buf.close(), s.close()


def test_forbid_allocator():
    s = cg.Stream()
    x = torch.randn(256, device="cuda")
    out = torch.empty_like(x)
    with torch.cuda.stream(s.torch):
        torch.mul(x, 2, out=out)
        with cg.capture(s, allocator="forbid") as cap:
            torch.mul(x, 2, out=out)  # allocates nothing: fine
        with pytest.raises(cg.CaptureError, match="forbid"):
            with cg.capture(s, allocator="forbid"):
                _ = x * 2
        out.fill_(float("nan"))     # the eager call above wrote x * 2 already
    assert cap.graph.num_nodes == 1
    ex = cap.graph.instantiate()
    ex.launch(s)
    s.synchronize()
    assert torch.equal(out, x * 2)
    ex.close(), cap.graph.close(), s.close()


def test_exec_update_in_place_and_reinstantiate_fallback():
    s = cg.Stream()
    x = torch.randn(1024, device="cuda")
    out = torch.empty_like(x)
    with torch.cuda.stream(s.torch):
        torch.mul(x, 2, out=out)
        with cg.capture(s, allocator="forbid") as c1:
            torch.mul(x, 2, out=out)
        with cg.capture(s, allocator="forbid") as c2:
            torch.mul(x, 3, out=out)
        with cg.capture(s, allocator="forbid") as c3:
            torch.mul(x, 3, out=out)
            out.add_(1)

    def launched():
        """Poison, launch, read: the value comes from this launch, not from an earlier run (the
        eager call left x * 2 in `out`, and capture executes nothing)."""
        with torch.cuda.stream(s.torch):
            out.fill_(float("nan"))
        ex.launch(s)
        s.synchronize()
        return out

    ex = c1.graph.instantiate()
    assert torch.equal(launched(), x * 2)
    assert ex.update(c2.graph) == "updated"
    assert torch.equal(launched(), x * 3)
    assert ex.update(c3.graph) == "reinstantiated"  # another topology: cannot update in place
    assert torch.equal(launched(), x * 3 + 1)
    for obj in (ex, c1.graph, c2.graph, c3.graph, s):
        obj.close()
