"""GraphHandle on a GPU: three phases, bit-exact replays, buckets, errors, host I/O."""
import pytest
import torch

import cugraph_rt as cg
from _cugraph_steps import elementwise_step, mixed_step, rowwise_step

pytestmark = pytest.mark.gpu


def test_replays_bit_identical_to_eager_with_changing_inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(64, 64, device="cuda", generator=g) / 8
    x0 = torch.randn(32, 64, device="cuda", generator=g)
    with cg.GraphHandle(mixed_step, {"x": x0, "w": w}, warmup=2) as h:
        phases = []
        for i in range(103):
            x = torch.randn(32, 64, device="cuda", generator=g)
            phases.append(h.phase)
            out, rowsum = h(x=x, w=w)
            with torch.cuda.stream(h.stream.torch):
                ref_out, ref_sum = mixed_step(x, w)
            h.stream.synchronize()
            assert torch.equal(out, ref_out), f"call {i} ({phases[-1]})"
            assert torch.equal(rowsum, ref_sum), f"call {i} ({phases[-1]})"
        assert phases[:3] == ["warmup", "warmup", "capture"] and phases[3] == "replay"
        st = h.stats
        assert st.replays == 100 and st.warmups == 2 and st.nodes >= 4
        assert st.capture_s > 0 and st.instantiate_s > 0 and st.upload_s >= 0
        names = [n.name or "" for n in h.graph.nodes() if n.type == "Kernel"]
        assert any("_sin_axpy_kernel" in n for n in names), names
    assert h.closed
    with pytest.raises(cg.ClosedError):
        h(x=x0, w=w)
    h.close()  # idempotent


def test_host_inputs_and_host_outputs_on_default_torch_stream():
    x = torch.randn(1000)
    with cg.GraphHandle(elementwise_step, {"x": x}, warmup=1, host_outputs=True) as h:
        for _ in range(4):
            x = torch.randn(1000)  # a CPU tensor: staged through pinned memory
            y = h(x=x)
            assert y.device.type == "cpu" and y.is_pinned()
            assert torch.equal(y, elementwise_step(x.cuda()).cpu())
        # a device input on torch's default stream (not the handle's): ordered by events
        xd = torch.randn(1000, device="cuda") * 3
        y = h(x=xd)
        assert torch.equal(y, elementwise_step(xd).cpu())


def test_outputs_to_host():
    x = torch.randn(256, device="cuda")
    with cg.GraphHandle(elementwise_step, {"x": x}, warmup=1) as h:
        h(x=x), h(x=x)
        x = torch.randn(256, device="cuda")
        y = h(x=x)
        host = h.outputs_to_host()
        # against the eager result of this call's input (y is the static output itself)
        assert host.device.type == "cpu" and torch.equal(host, elementwise_step(x).cpu())
        assert torch.equal(y.cpu(), host)


def test_capture_error_in_handle_then_recovers():
    flag = {"sync": False}

    def step(x):
        y = torch.sin(x) + 1
        if flag["sync"]:
            y.max().item()  # a host sync: illegal inside a capture
        return y

    x = torch.randn(512, device="cuda")
    with cg.GraphHandle(step, {"x": x}, warmup=1) as h:
        h(x=x)
        flag["sync"] = True
        with pytest.raises(cg.CaptureError):
            h(x=x)
        assert h.phase == "capture" and h.graph is None
        # the stream still works
        with torch.cuda.stream(h.stream.torch):
            z = (x * 2).sum()
        h.stream.synchronize()
        assert torch.isfinite(z)
        flag["sync"] = False
        for _ in range(3):
            x = torch.randn(512, device="cuda")
            y = h(x=x)
            h.stream.synchronize()
            assert torch.equal(y, torch.sin(x) + 1)
        assert h.phase == "replay" and h.stats.replays == 2


@pytest.mark.parametrize("bucket_dim", [0, 1])
def test_buckets_with_padding_equal_eager(bucket_dim):
    buckets = [4, 8, 16]
    shape = [16, 48] if bucket_dim == 0 else [48, 16]

    def step(x):
        x = x if bucket_dim == 0 else x.t()
        out = rowwise_step(x.contiguous())
        return out if bucket_dim == 0 else {"y": out["y"].t(), "norm": out["norm"]}

    spec = cg.InputSpec(tuple(shape), torch.float32)
    with cg.GraphHandle(step, {"x": spec}, warmup=1, buckets=buckets,
                        bucket_dim=bucket_dim) as h:
        sizes = [3, 5, 16, 1, 8, 20, 7, 4, 12, 16, 2]
        for n in sizes:
            s = list(shape)
            s[bucket_dim] = n
            x = torch.randn(*s, device="cuda")
            out = h(x=x)
            h.stream.synchronize()
            ref = step(x)
            torch.cuda.synchronize()
            assert torch.equal(out["y"], ref["y"]), (n, h.phase)
            if bucket_dim == 0:  # a reduction over rows: its launch config may follow the row count
                torch.testing.assert_close(out["norm"], ref["norm"], rtol=1e-6, atol=1e-6)
        assert set(h.graphs) == set(buckets)
        assert h.stats.eager_calls == 1 and h.stats.replays > 0
        assert set(h.stats.nodes_per_bucket) == set(buckets)


def test_handle_on_given_stream_and_stats_dict():
    s = cg.Stream()
    x = torch.randn(128, device="cuda")
    h = cg.GraphHandle(elementwise_step, {"x": x}, warmup=0, stream=s, upload=False)
    assert h.phase == "capture"
    with torch.cuda.stream(s.torch):
        y = h(x=x)
    s.synchronize()
    assert torch.equal(y, elementwise_step(x))
    d = h.stats.as_dict()
    assert d["replays"] == 0 and d["nodes"] >= 2 and d["graph_mem_bytes"] >= 0
    h.close()
    s.synchronize()  # a stream the handle did not create stays open
    s.close()
