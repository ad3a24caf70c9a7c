"""GraphHandle through the CuPy adapter: CuPy arrays in and out, CuPy's own kernels in the step
(CuPy refuses cuBLAS during a stream capture: NotImplementedError "calling cuBLAS API during stream
capture is currently unsupported", cupy-cuda13x on an H200), replays equal to eager, host (numpy) inputs and pinned outputs, buckets, ordering after
CuPy's current stream, the private pool keeping graph memory from eager code, and a process that
never imports torch."""
import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.needs import need_module

import cugraph_rt as cg

pytestmark = pytest.mark.gpu
cp = need_module("cupy", "CuPy is optional; the GPU machine has it")
ROOT = Path(__file__).resolve().parents[2]


def step(x, w):
    h = cp.tanh((x[:, :, None] * w[None, :, :]).sum(axis=1)) + 1.0   # x @ w by CuPy kernels, not cuBLAS
    return h, (x * 2.0).sum(axis=1)


def _eq(a, b):
    cp.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_cupy_handle_replays_equal_eager_and_picks_the_cupy_adapter():
    w = cp.random.rand(32, 16, dtype=cp.float32)
    x0 = cp.random.rand(64, 32, dtype=cp.float32)
    with cg.GraphHandle(step, {"x": x0, "w": w}, warmup=1) as h:
        assert h.framework == "cupy"
        assert isinstance(h.static_inputs()["x"], cp.ndarray)
        for i in range(6):
            x = cp.random.rand(64, 32, dtype=cp.float32)
            out, rows = h(x=x, w=w)
            want_out, want_rows = step(x, w)
            _eq(out, want_out)
            _eq(rows, want_rows)
        assert h.phase == "replay" and h.stats.replays >= 4
        plan = h.replay_plan()
        assert plan.n_inputs == 2 and plan.outputs[0] is out
        with pytest.raises(cg.InputTypeError, match="expected dtype float32"):
            h(x=x.astype(cp.float64), w=w)


def test_host_inputs_and_pinned_host_outputs_are_numpy():
    w = cp.random.rand(32, 16, dtype=cp.float32)
    xs = np.random.rand(64, 32).astype(np.float32)
    with cg.GraphHandle(step, {"x": xs, "w": w}, warmup=1, host_outputs=True) as h:
        for _ in range(4):
            xs = np.random.rand(64, 32).astype(np.float32)
            out, rows = h(x=xs, w=w)
            assert isinstance(out, np.ndarray) and isinstance(rows, np.ndarray)
            want_out, want_rows = step(cp.asarray(xs), w)
            np.testing.assert_allclose(out, cp.asnumpy(want_out), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(rows, cp.asnumpy(want_rows), rtol=1e-6, atol=1e-6)


def test_buckets_pad_and_run_eagerly_above_the_largest():
    def rowwise(x):
        return cp.exp(-x * x) + x

    with cg.GraphHandle(rowwise, {"x": cg.InputSpec((16, 8), np.float32)}, warmup=1,
                        buckets=(4, 16)) as h:
        for n in (3, 16, 20, 1, 9, 4):
            x = cp.random.rand(n, 8, dtype=cp.float32)
            y = h(x=x)
            assert y.shape == (n, 8)
            _eq(y, rowwise(x))
        assert set(h.graphs) == {4, 16} and h.stats.eager_calls >= 1


def test_orders_after_cupys_current_stream():
    w = cp.random.rand(256, 256, dtype=cp.float32)
    x0 = cp.zeros((256, 256), dtype=cp.float32)
    with cg.GraphHandle(step, {"x": x0, "w": w}, warmup=1) as h:
        h(x=x0, w=w), h(x=x0, w=w)
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            for i in range(5):
                x = cp.full((256, 256), float(i), dtype=cp.float32)
                for _ in range(20):       # keep the stream busy so a missing wait would show
                    x = x * 1.0
                _, rows = h(x=x, w=w)
                got = rows.copy()         # on s: after the replay's outputs
                s.synchronize()
                _eq(got, cp.full(256, 2.0 * 256 * i, dtype=cp.float32))


def test_captured_temporaries_come_from_a_private_pool():
    # the step's temporaries are freed back when the capture ends; from CuPy's default pool,
    # eager code on the same stream (CuPy's pool keeps free blocks per stream) would get that
    # memory and the replays would overwrite it
    def tmp_step(x):
        t = x * 3.0
        return (t + 1.0).sum()

    x = cp.ones(1 << 16, dtype=cp.float32)
    with cg.GraphHandle(tmp_step, {"x": x}, warmup=1) as h:
        h(x=x), h(x=x)
        with cp.cuda.ExternalStream(h.stream.handle):
            junk = [cp.full(1 << 16, 7.0, dtype=cp.float32) for _ in range(8)]
        for _ in range(3):
            total = h(x=x)
        h.stream.synchronize()
        assert float(total) == 4.0 * (1 << 16)
        assert all(bool((j == 7.0).all()) for j in junk), "a replay wrote into eager CuPy memory"


def test_an_output_kept_after_close_keeps_its_memory():
    """The replayed outputs live in the handle's private CuPy pool, which close() drops: a caller
    who keeps one must still read its values after other arrays have taken freed memory (CuPy's
    pooled memory refers to its pool only weakly; cupy_interop._keeping_pool holds it)."""
    w = cp.random.rand(32, 16, dtype=cp.float32)
    x = cp.random.rand(64, 32, dtype=cp.float32)
    h = cg.GraphHandle(step, {"x": x, "w": w}, warmup=1)
    h(x=x, w=w)
    out, rows = h(x=x, w=w)                      # a replay: the static outputs
    want_out, want_rows = (a.get() for a in step(x, w))
    h.close()
    del h
    gc.collect()
    fill = [cp.full(n, -7.0, dtype=cp.float32) for n in (64 * 16, 64, 32 * 1024, 64 * 16 * 32) for _ in range(8)]
    cp.cuda.runtime.deviceSynchronize()
    np.testing.assert_allclose(out.get(), want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows.get(), want_rows, rtol=1e-6, atol=1e-6)
    del fill


def test_cupy_only_process_never_imports_torch():
    code = textwrap.dedent("""
        import sys
        import cupy as cp
        import cugraph_rt as cg
        def step(x, w):
            return cp.tanh((x[:, :, None] * w[None, :, :]).sum(axis=1))
        w = cp.random.rand(32, 16, dtype=cp.float32)
        x = cp.random.rand(8, 32, dtype=cp.float32)
        with cg.GraphHandle(step, {"x": x, "w": w}, warmup=1) as h:
            for _ in range(4):
                y = h(x=x, w=w)
            h.stream.synchronize()
            cp.testing.assert_allclose(y, step(x, w), rtol=1e-6, atol=1e-6)
            assert h.phase == "replay" and h.framework == "cupy"
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
