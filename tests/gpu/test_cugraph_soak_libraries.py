"""No memory kept per handle, whatever library the step calls (markers gpu, slow): 1000 cycles of
create -> warm up -> capture -> replay -> close for a step of each kind, with device memory,
torch's allocated and reserved memory, pinned memory and graph memory back where they were after
the first cycles; measured WITHOUT emptying torch's cache (a per-stream cuBLAS workspace or a
private pool left behind by each handle stays in torch's cache and would show). Tiny steps: the
whole file takes a few seconds per kind on an H100/H200.

Before the stream pool, a torch matmul step kept ≈ 34 MiB per cycle (torch's cuBLAS workspace for
each new stream): these tests then fail at the first check with ≈ 34 GiB gone."""
import gc
import time

import pytest

from tests.needs import need_module
import torch
import torch.nn.functional as F

import cugraph_rt as cg
from _cugraph_steps import sin_axpy

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
MiB = 1 << 20
CYCLES = 1000
WARM_CYCLES = 5        # first-use costs (library handles, workspaces, modules) before the baseline
BOUND = 2 * MiB        # per metric, over all the cycles


def _snapshot() -> dict:
    """Memory figures after settling, without freeing anyone's cache."""
    gc.collect()
    torch.cuda.synchronize()
    gm = cg.graph_memory()
    live = cg.live_allocations()
    snap = {"free": cg.mem_get_info()[0], "torch_allocated": torch.cuda.memory_allocated(),
            "torch_reserved": torch.cuda.memory_reserved(), "graph_used": gm["used_current"],
            "pinned": live["host_bytes"], "device_buffers": live["device_bytes"],
            "idle_streams": cg.idle_streams()}
    try:
        import sys
        if "cupy" in sys.modules:
            import cupy
            pool = cupy.get_default_memory_pool()
            snap["cupy_used"], snap["cupy_total"] = pool.used_bytes(), pool.total_bytes()
    except Exception:  # noqa: BLE001
        pass
    return snap


def _assert_flat(before, after, what):
    grew = {k: after[k] - before[k] for k in before if k != "idle_streams"}
    line = ", ".join(f"{k} {v / MiB:+.3f} MiB" for k, v in grew.items())
    print(f"{what}: {CYCLES} cycles; {line}; idle streams {before['idle_streams']} -> {after['idle_streams']}")
    for key, delta in grew.items():
        assert abs(delta) <= BOUND, f"{what}: {key} moved by {delta / MiB:.2f} MiB over {CYCLES} cycles ({line})"
    assert after["idle_streams"] == before["idle_streams"], "handles did not give their streams back"


def _soak(make_step, example: dict, check, what, *, host_outputs=False):
    """``make_step()`` -> step fn; ``check(out, example)`` asserts a replay's result."""
    step = make_step()
    streams = set()

    def cycle(i):
        with cg.GraphHandle(step, example, warmup=1, host_outputs=host_outputs) as h:
            h(**example)                     # warmup (eager on the handle's stream)
            out = h(**example)               # capture + first launch
            out = h(**example)               # a replay through the fast path
            assert h.phase == "replay" and h.stats.replays >= 1
            if i % 100 == 0:
                h.stream.synchronize()
                check(out, example)
            streams.add(h.stream.handle)
            # outputs still held after close() keep their memory (the graph's private pool) until
            # dropped: this measures what the handle keeps, so drop them first
            del out

    for i in range(WARM_CYCLES):
        cycle(i)
    before = _snapshot()
    t0 = time.perf_counter()
    for i in range(CYCLES):
        cycle(i)
    after = _snapshot()
    print(f"{what}: {(time.perf_counter() - t0) / CYCLES * 1e3:.2f} ms per cycle")
    _assert_flat(before, after, what)
    assert len(streams) == 1, f"{len(streams)} streams used by one-at-a-time handles: not pooled"


def _close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_torch_matmul_fp32_keeps_no_memory_per_handle():
    x, w = torch.randn(8, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    _soak(lambda: (lambda x: torch.tanh(x @ w)), {"x": x},
          lambda out, ex: _close(out, torch.tanh(ex["x"] @ w), 1e-5), "torch matmul fp32")


def test_torch_matmul_bf16_keeps_no_memory_per_handle():
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    _soak(lambda: (lambda x: x @ w), {"x": x}, lambda out, ex: _close(out, ex["x"] @ w, 1e-2),
          "torch matmul bf16")


def test_linear_with_bias_keeps_no_memory_per_handle():
    # addmm with a bias: torch's cuBLASLt path (its own workspace)
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(32, device="cuda", dtype=torch.bfloat16)
    _soak(lambda: (lambda x: F.linear(x, w, b)), {"x": x},
          lambda out, ex: _close(out, F.linear(ex["x"], w, b), 1e-2), "F.linear bf16 with bias")


def test_triton_step_with_host_io_keeps_no_memory_per_handle():
    x = torch.randn(4096)                 # host input (pinned staging) and host outputs
    expect = sin_axpy(x.cuda(), x.cuda()).cpu()
    _soak(lambda: (lambda x: sin_axpy(x, x)), {"x": x},
          lambda out, ex: _close(out, expect, 0), "Triton (host in/out)", host_outputs=True)


def test_cupy_kernel_step_keeps_no_memory_per_handle():
    # CuPy refuses cuBLAS inside a stream capture (NotImplementedError "calling cuBLAS API during
    # stream capture is currently unsupported", cupy-cuda13x on an H200): the product is made by CuPy's
    # own elementwise and reduction kernels, which allocate from the capture's private pool
    cp = need_module("cupy", "CuPy is optional; the GPU machine has it")
    x = cp.random.rand(8, 64, dtype=cp.float32)
    w = cp.random.rand(64, 64, dtype=cp.float32)

    def matmul(a):
        return (a[:, :, None] * w[None, :, :]).sum(axis=1)

    _soak(lambda: (lambda x: cp.tanh(matmul(x))), {"x": x},
          lambda out, ex: cp.testing.assert_allclose(out, cp.tanh(ex["x"] @ w), rtol=1e-5, atol=1e-5),
          "CuPy kernels (elementwise + reduction)")
