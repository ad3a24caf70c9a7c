"""Lifetime: 200 create/capture/replay/close cycles leave device memory where it was, and a
dropped handle is cleaned up by its finalizer."""
import gc
import weakref

import pytest
import torch
from cuda.bindings import runtime as rt

import cugraph_rt as cg
from _cugraph_steps import elementwise_step

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def _free_bytes():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    cg.check(rt.cudaDeviceGraphMemTrim(torch.cuda.current_device()))
    return cg.mem_get_info()[0]


def _cycle(x):
    with cg.GraphHandle(elementwise_step, {"x": x}, warmup=1) as h:
        for _ in range(3):
            y = h(x=x)
        h.stream.synchronize()
        assert torch.equal(y, elementwise_step(x))
        del y


def test_200_cycles_within_1_mib():
    x = torch.randn(4096, device="cuda")
    _cycle(x)  # first-use costs (Triton module, torch kernels) before the baseline
    before = _free_bytes()
    for _ in range(200):
        _cycle(x)
    after = _free_bytes()
    assert abs(before - after) <= MiB, f"free memory moved by {(before - after) / MiB:.2f} MiB"


def test_dropped_handle_cleaned_by_finalizer():
    x = torch.randn(4096, device="cuda")
    _cycle(x)
    before = _free_bytes()
    h = cg.GraphHandle(elementwise_step, {"x": x}, warmup=1)
    for _ in range(3):
        y = h(x=x)
    h.stream.synchronize()
    fin, ref = h._finalizer, weakref.ref(h)
    del h, y
    gc.collect()
    assert ref() is None, "the handle must not be kept alive by its finalizer"
    assert not fin.alive, "the finalizer should have released the handle"
    after = _free_bytes()
    assert abs(before - after) <= MiB


def test_objects_close_idempotently_and_refuse_use():
    s = cg.Stream()
    b = cg.DeviceBuffer(64)
    for obj in (s, b):
        obj.close()
        obj.close()
    with pytest.raises(cg.ClosedError):
        b.view()


def test_unclosed_handle_is_safe_at_interpreter_exit():
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__).resolve().parent
    code = ("import torch, cugraph_rt as cg\n"
            "from _cugraph_steps import elementwise_step\n"
            "x = torch.randn(256, device='cuda')\n"
            "h = cg.GraphHandle(elementwise_step, {'x': x}, warmup=1)\n"
            "for _ in range(3): y = h(x=x)\n"
            "print('ran', h.phase, flush=True)\n")
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent.parent), str(here)]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran replay" in proc.stdout
    assert "Error" not in proc.stderr, proc.stderr[-3000:]
