"""GraphHandle reliability on a GPU: bad input in every phase, capture disabled, use after close
(the hypothesis property test on a real handle: test_reliability_property_gpu.py), exceptions in the step (warmup, capture, eager
fallback), host syncs inside the capture (synchronize, a Triton autotune run), out of memory while
capturing, and interpreter exit with live objects. docs/reliability.md lists every case.

Already covered elsewhere (not repeated here): `.item()` inside a handle's capture
(test_cugraph_handle.py::test_capture_error_in_handle_then_recovers), synchronize/.item() inside a
bare capture() (test_cugraph_capture.py::test_sync_inside_capture_raises_and_stream_survives),
AutoFreeOnLaunch relaunch and its failure without the flag
(test_cugraph_async_alloc.py::test_async_backend_needs_auto_free_on_launch)."""
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from cuda.bindings import runtime as rt

import cugraph_rt as cg
from _cugraph_steps import elementwise_step
from tests.reliability_cases import rowwise

pytestmark = pytest.mark.gpu
MiB = 1 << 20
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _eager(h, fn, **inputs):
    """fn on the handle's stream, then wait: the eager result to compare with."""
    with torch.cuda.stream(h.stream.torch):
        out = fn(**{k: v.cuda() for k, v in inputs.items()})
    h.stream.synchronize()
    return out


def _settle():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    cg.check(rt.cudaDeviceGraphMemTrim(torch.cuda.current_device()))
    return cg.mem_get_info()[0]


BAD = [
    (lambda x: {"x": torch.randn(65, device="cuda")}, cg.InputError, "expected shape (64,); given (65,)"),
    (lambda x: {"x": x.double()}, cg.InputTypeError, "expected dtype torch.float32; given torch.float64"),
    (lambda x: {"x": torch.randn(128, device="cuda")[::2]}, cg.InputError, "contiguous"),
    (lambda x: {"x": torch.randn(64, device="meta")}, cg.InputError, "given one on meta"),
    (lambda x: {}, cg.InputTypeError, "missing ['x']"),
    (lambda x: {"x": x, "y": x}, cg.InputTypeError, "unexpected ['y']"),
    (lambda x: {"x": x.tolist()}, cg.InputTypeError, "expected a tensor; got list"),
]


def test_bad_inputs_in_every_phase_change_nothing():
    x0 = torch.randn(64, device="cuda")
    with cg.GraphHandle(elementwise_step, {"x": x0}, warmup=2) as h:
        phases = []
        for i in range(6):
            before = h.static_inputs()["x"].clone()
            phase, stats = h.phase, h.stats.as_dict()
            for make, exc, needle in BAD:
                with pytest.raises(exc) as info:
                    h(**make(x0))
                assert needle in str(info.value), (phase, str(info.value))
                assert h.phase == phase and h.stats.as_dict() == stats
                assert torch.equal(h.static_inputs()["x"], before)
            x = torch.randn(64, device="cuda") if i % 2 else torch.randn(64)   # device or host
            phases.append(h.phase)
            out = h(x=x)
            assert torch.equal(out, _eager(h, elementwise_step, x=x)), phases[-1]
        assert phases == ["warmup", "warmup", "capture", "replay", "replay", "replay"]


def test_capture_disabled_is_always_eager_and_correct():
    x = torch.randn(256, device="cuda")
    h = cg.GraphHandle(elementwise_step, {"x": x}, capture=False)
    for i in range(5):
        x = torch.randn(256, device="cuda")
        assert h.phase == "eager"
        assert torch.equal(h(x=x), _eager(h, elementwise_step, x=x))
        with pytest.raises(cg.InputError, match=r"given \(255,\)"):
            h(x=torch.randn(255, device="cuda"))
    assert h.graph is None and h.graphs == {}
    assert h.stats.eager_calls == 5 and h.stats.replays == 0 and h.stats.nodes == 0
    with pytest.raises(RuntimeError, match="no captured outputs yet \\(phase 'eager'\\)"):
        h.outputs_to_host()
    y = h(x=x)
    assert torch.equal(h.outputs_to_host(y), y.cpu())
    h.close()
    with pytest.raises(cg.ClosedError):
        h(x=x)


@pytest.mark.parametrize("calls_before_close", [0, 1, 2, 5])
def test_use_after_close_in_every_phase(calls_before_close):
    x = torch.randn(64, device="cuda")
    h = cg.GraphHandle(elementwise_step, {"x": x}, warmup=1)
    for _ in range(calls_before_close):
        h(x=x)
    h.close()
    for use in (lambda: h(x=x), lambda: h.stream, lambda: h.graph, lambda: h.static_inputs(),
                lambda: h.outputs_to_host()):
        with pytest.raises(cg.ClosedError, match="GraphHandle is closed"):
            use()
    assert repr(h) == "<GraphHandle closed>"
    h.close()   # idempotent


# ---- exceptions inside the step ---------------------------------------------------------------
class Boom(Exception):
    pass


def _faulty(where):
    """elementwise_step that raises Boom when armed, in the phase named by `where`."""
    state = {"armed": False}

    def step(x):
        y = elementwise_step(x)
        capturing = torch.cuda.is_current_stream_capturing()
        if state["armed"] and (where == "capture") == capturing:
            raise Boom(f"boom in {where}")
        return y

    return step, state


def test_exception_during_warmup_is_raised_as_is_and_handle_recovers():
    step, state = _faulty("warmup")
    x = torch.randn(512, device="cuda")
    with cg.GraphHandle(step, {"x": x}, warmup=2) as h:
        h(x=x)
        state["armed"] = True
        with pytest.raises(Boom, match="boom in warmup"):
            h(x=x)
        assert h.phase == "warmup" and h.stats.warmups == 1
        state["armed"] = False
        for expect in ("warmup", "capture", "replay", "replay"):
            assert h.phase == expect
            x = torch.randn(512, device="cuda")
            assert torch.equal(h(x=x), _eager(h, elementwise_step, x=x))


def test_exception_during_capture_ends_it_and_a_fixed_step_captures():
    step, state = _faulty("capture")
    x = torch.randn(512, device="cuda")
    with cg.GraphHandle(step, {"x": x}, warmup=1) as h:
        h(x=x)
        state["armed"] = True
        for _ in range(2):   # twice: a failed capture leaves nothing behind
            with pytest.raises((Boom, cg.CaptureError), match="boom in capture"):
                h(x=x)
            assert h.phase == "capture" and h.graph is None
            assert not h.stream.is_capturing() and not torch.cuda.is_current_stream_capturing()
        with torch.cuda.stream(h.stream.torch):    # the stream still runs eager work
            z = (x * 2).sum()
        h.stream.synchronize()
        assert torch.isfinite(z)
        state["armed"] = False
        for _ in range(3):
            x = torch.randn(512, device="cuda")
            assert torch.equal(h(x=x), _eager(h, elementwise_step, x=x))
        assert h.phase == "replay" and h.stats.replays == 2


def test_exception_in_eager_fallback_above_the_largest_bucket():
    def step(x):
        if x.shape[0] > 8:
            raise Boom(f"boom in eager fallback, {x.shape[0]} rows")
        return rowwise(x, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device))

    spec = {"x": cg.InputSpec((8, 4), torch.float32)}
    with cg.GraphHandle(step, spec, warmup=1, buckets=[4, 8]) as h:
        for n in (3, 8, 12, 5, 12, 2):
            x = torch.randn(n, 4, device="cuda")
            if n > 8:
                with pytest.raises(Boom, match="12 rows"):
                    h(x=x)
                continue
            assert torch.equal(h(x=x), _eager(h, step, x=x))
        assert h.phase == "replay" and h.stats.eager_calls == 0


def test_exception_with_capture_disabled():
    step, state = _faulty("warmup")
    x = torch.randn(64, device="cuda")
    with cg.GraphHandle(step, {"x": x}, capture=False) as h:
        state["armed"] = True
        with pytest.raises(Boom):
            h(x=x)
        state["armed"] = False
        assert torch.equal(h(x=x), _eager(h, elementwise_step, x=x))
        assert h.stats.eager_calls == 1


# ---- host synchronisation inside the capture ----------------------------------------------------
def test_synchronize_inside_capture_is_capture_error_then_recovers():
    state = {"sync": True}

    def step(x):
        y = torch.sin(x) + 1
        if state["sync"] and torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return y

    x = torch.randn(512, device="cuda")
    with cg.GraphHandle(step, {"x": x}, warmup=1) as h:
        h(x=x)
        with pytest.raises(cg.CaptureError) as info:
            h(x=x)
        assert "synchronize" in str(info.value)
        assert h.phase == "capture" and not h.stream.is_capturing()
        h.stream.synchronize()
        state["sync"] = False
        for _ in range(3):
            x = torch.randn(512, device="cuda")
            assert torch.equal(h(x=x), _eager(h, step, x=x))
        assert h.phase == "replay"


@triton.autotune(configs=[triton.Config({"BLOCK": 128}), triton.Config({"BLOCK": 512})],
                 key=["n"])
@triton.jit
def _tuned_scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 3.0 + 1.0, mask=mask)


def tuned_step(x):
    out = torch.empty_like(x)
    n = x.numel()
    _tuned_scale[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n)
    return out


def test_autotune_inside_capture_is_capture_error_and_warmed_key_captures():
    n = 4096 + 17                           # a key nothing has tuned yet in this process
    x = torch.randn(n, device="cuda")
    with cg.GraphHandle(tuned_step, {"x": x}, warmup=0) as h:   # no warmup: tunes while capturing
        with pytest.raises(cg.CaptureError) as info:
            h(x=x)
        assert "autotune" in str(info.value)
        assert h.phase == "capture" and not h.stream.is_capturing()
        h.stream.synchronize()
        _eager(h, tuned_step, x=x)          # the fix: run the autotune key eagerly (= warmup)
        for _ in range(3):
            x = torch.randn(n, device="cuda")
            assert torch.equal(h(x=x).clone(), _eager(h, tuned_step, x=x))
        assert h.phase == "replay"


def test_objects_dropped_inside_a_capture_are_released_after_it():
    """A finalizer running on the capturing thread (refcount drop or gc inside the step) must not
    call cudaFree/cudaStreamDestroy there (that would invalidate the capture and fail, leaking):
    its release waits for the capture's end."""
    from cugraph_rt._lifetime import releases_deferred

    _settle()
    live0 = cg.live_allocations()
    other = cg.GraphHandle(elementwise_step, {"x": torch.randn(64, device="cuda")}, warmup=0)
    other.cycle = other
    doomed = {"buf": cg.DeviceBuffer(1 << 20), "host": cg.HostBuffer(1 << 16), "handle": other}
    del other
    seen = {}

    def step(x):
        y = elementwise_step(x)
        if torch.cuda.is_current_stream_capturing() and doomed:
            doomed.clear()          # the buffers go by refcount, the handle (a cycle) by gc
            gc.collect()
            seen["deferred"] = releases_deferred()
        return y

    x = torch.randn(512, device="cuda")
    with cg.GraphHandle(step, {"x": x}, warmup=1) as h:
        h(x=x)
        y = h(x=x)                  # the capture succeeds
        assert h.phase == "replay" and seen["deferred"] >= 3
        assert torch.equal(y, _eager(h, elementwise_step, x=x))
    assert releases_deferred() == 0
    _settle()
    assert cg.live_allocations() == live0


# ---- out of memory ------------------------------------------------------------------------------
def test_out_of_memory_while_capturing_is_clean_and_leaks_nothing():
    state = {"huge": True}

    def step(x):
        y = elementwise_step(x)
        if state["huge"] and torch.cuda.is_current_stream_capturing():
            torch.empty(1 << 42, dtype=torch.uint8, device="cuda")   # 4 TiB
        return y

    x = torch.randn(4096, device="cuda")
    _eager_ref = elementwise_step(x)
    before, live0 = _settle(), cg.live_allocations()
    h = cg.GraphHandle(step, {"x": x}, warmup=1)
    h(x=x)
    warm = _settle()
    for _ in range(2):
        with pytest.raises((torch.OutOfMemoryError, cg.CaptureError)) as info:
            h(x=x)
        assert "out of memory" in str(info.value).lower()
        assert h.phase == "capture" and not h.stream.is_capturing()
        del info
        after = _settle()
        assert abs(after - warm) <= MiB, f"failed capture kept {(warm - after) / MiB:.2f} MiB"
    state["huge"] = False
    y = h(x=x)
    h.stream.synchronize()
    assert torch.equal(y, _eager_ref)
    del y
    h.close()
    # a leak lowers free memory; more free than before (torch's cache trimmed meanwhile) is fine
    assert before - _settle() <= MiB
    assert cg.live_allocations() == live0


def test_out_of_memory_building_a_handle_or_buffer_leaks_nothing():
    before, live0 = _settle(), cg.live_allocations()
    with pytest.raises(cg.CudaError, match="cudaErrorMemoryAllocation"):
        cg.GraphHandle(elementwise_step, {"x": cg.InputSpec((1 << 40,), torch.float32)})
    with pytest.raises(cg.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        cg.DeviceBuffer(1 << 42)
    with cg.Stream() as s:
        with pytest.raises(cg.CudaError, match="cudaErrorMemoryAllocation"):
            cg.DeviceBuffer(1 << 42, stream=s)
    # a leak lowers free memory; more free than before (torch's cache trimmed meanwhile) is fine
    assert before - _settle() <= MiB
    assert cg.live_allocations() == live0
    x = torch.randn(64, device="cuda")     # torch and the library still work
    with cg.GraphHandle(elementwise_step, {"x": x}, warmup=1) as h:
        for _ in range(3):
            assert torch.equal(h(x=x), _eager(h, elementwise_step, x=x))


# ---- interpreter exit with live objects ---------------------------------------------------------
EXIT_SCRIPT = r"""
import numpy as np, torch, cugraph_rt as cg
from cuda.bindings import runtime as rt
from _cugraph_steps import elementwise_step
x = torch.randn(4096, device="cuda")
replaying = cg.GraphHandle(elementwise_step, {"x": x}, warmup=1, host_outputs=True)
for _ in range(4): y = replaying(x=x.cpu())
warming = cg.GraphHandle(elementwise_step, {"x": x}, warmup=5)
warming(x=x)
eager = cg.GraphHandle(elementwise_step, {"x": x}, capture=False)
eager(x=x)
buckets = cg.GraphHandle(lambda x: x * 2, {"x": cg.InputSpec((16, 8), torch.float32)}, warmup=1,
                         buckets=[4, 16])
for n in (3, 16, 9): buckets(x=torch.randn(n, 8, device="cuda"))
s = cg.Stream()
e0, e1 = cg.Event(), cg.Event()
d = cg.DeviceBuffer(1 << 20)
da = cg.DeviceBuffer(1 << 20, stream=s)
hb = cg.HostBuffer(1 << 20)
arr = hb.numpy(np.float32)
t = d.as_tensor(torch.float32)
with torch.cuda.stream(s.torch):
    with cg.capture(s) as cap:
        t.mul_(2)
ex = cap.graph.instantiate(upload_stream=s)
e0.record(s)
for _ in range(200): ex.launch(s)          # left running: nothing waits for it
d.copy_to(hb, stream=s)
e1.record(s)
from model.config import ModelConfig
from model.decoder import Decoder
from model.generation import Generator
from model.weights import random_weights
cfg = ModelConfig.preset("tiny")
dec = Decoder(cfg, random_weights(cfg, "cuda", torch.bfloat16, seed=0), max_batch=1, max_seq=32,
              backend="triton")
gen = Generator(dec, use_graph=True)
res = gen.generate([[1, 2, 3]], 8)
print("ALIVE", replaying.phase, warming.phase, eager.phase, buckets.phase, len(res.tokens[0]),
      flush=True)
"""


@pytest.mark.parametrize("ending", ["end of script", "sys.exit(0)"])
def test_interpreter_exit_with_live_handles_and_buffers(ending):
    code = EXIT_SCRIPT + {"end of script": "", "sys.exit(0)": "import sys; sys.exit(0)\n"}[ending]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALIVE replay warmup eager replay 8" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    for bad in ("CUDA error", "Error", "Exception ignored", "Traceback", "Segmentation"):
        assert bad not in proc.stderr, proc.stderr[-3000:]
