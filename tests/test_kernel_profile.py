"""tools/kernel_profile.py: folding CUPTI kernel records into per-step figures (CPU; the profiling
itself runs on the GPU through tools/capture_trace.py)."""
import json

import pytest

from tools import kernel_profile as kp


def _trace(events):
    recs = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": d, "args": {"grid": [g, 1, 1]}}
            for n, ts, d, g in events]
    # records that are not kernels must be ignored
    recs += [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0.0, "dur": 50.0},
             {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 1.0, "dur": 2.0}]
    return {"traceEvents": recs}


def _two_steps():
    # step = norm (2 us) then gemv (10 us) then norm (2 us), 1 us gaps; steps start 100 us apart
    out = []
    for s in range(2):
        t = 100.0 * s
        out += [("_rmsnorm_kernel", t, 2.0, 1), ("_gemv_kernel", t + 3, 10.0, 64), ("_rmsnorm_kernel", t + 14, 2.0, 1)]
    return out


def test_kernel_events_keep_only_kernels_sorted_by_start():
    events = _two_steps()[::-1]
    got = kp.kernel_events(_trace(events))
    assert [e[1] for e in got] == sorted(e[1] for e in events)
    assert {e[0] for e in got} == {"_rmsnorm_kernel", "_gemv_kernel"}


def test_aggregate_per_step_figures_and_idle_time():
    p = kp.aggregate(kp.kernel_events(_trace(_two_steps())), steps=2, kernels_per_step=3)
    assert p.kernels_per_step == 3
    assert p.busy_us == pytest.approx(14.0)
    assert p.span_us == pytest.approx(16.0)      # 0 .. 16 in each step: the 100 us between steps excluded
    assert p.idle_us == pytest.approx(2.0)
    gemv, norm = p.rows
    assert (gemv.name, gemv.us_per_step, gemv.calls_per_step, gemv.us_per_call) == ("_gemv_kernel", 10.0, 1.0, 10.0)
    assert (norm.name, norm.us_per_step, norm.calls_per_step, norm.us_per_call) == ("_rmsnorm_kernel", 4.0, 2.0, 2.0)
    assert gemv.share + norm.share == pytest.approx(1.0)
    json.dumps(p.__dict__, default=lambda o: o.__dict__)   # serialisable for kernels.json


def test_aggregate_without_a_step_cut_uses_the_whole_window():
    p = kp.aggregate(kp.kernel_events(_trace(_two_steps())), steps=2, kernels_per_step=4)  # count mismatch
    assert p.span_us == pytest.approx(116.0 / 2)


def test_bad_input_named():
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        kp.aggregate([("k", 0.0, 1.0, ())], steps=0)
    with pytest.raises(ValueError, match="no kernel records"):
        kp.aggregate([], steps=1)


@pytest.mark.parametrize("raw, short", [
    ("_gemv_kernel", "_gemv_kernel"),
    ("void at::native::(anonymous namespace)::indexSelectSmallIndex<c10::BFloat16, long>(at::cuda::x)",
     "at::native::indexSelectSmallIndex"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm>(Params)", "cutlass::Kernel2"),
])
def test_short_names(raw, short):
    assert kp.short_name(raw) == short


def test_format_names_the_idle_share():
    p = kp.aggregate(kp.kernel_events(_trace(_two_steps())), steps=2, kernels_per_step=3)
    text = kp.format_profile(p)
    assert "idle between kernels 2.0 us (12%)" in text and "_gemv_kernel" in text


def test_one_kernel_with_several_grids_gets_a_row_per_grid():
    events = [("_gemv_kernel", 0.0, 10.0, 64), ("_gemv_kernel", 11.0, 3.0, 8), ("_gemv_kernel", 15.0, 3.0, 8),
              ("_rmsnorm_kernel", 19.0, 2.0, 1)]
    p = kp.aggregate(kp.kernel_events(_trace(events)), steps=1, kernels_per_step=4)
    got = {r.name: (r.calls_per_step, r.us_per_step) for r in p.rows}
    assert got == {"_gemv_kernel grid=64x1x1": (1, 10.0), "_gemv_kernel grid=8x1x1": (2, 6.0),
                   "_rmsnorm_kernel": (1, 2.0)}


def test_overlapping_kernels_are_flagged():
    events = [("a", 0.0, 10.0, 1), ("b", 2.0, 10.0, 1)]   # b scheduled early, waiting on a
    text = kp.format_profile(kp.aggregate(kp.kernel_events(_trace(events)), steps=1, kernels_per_step=2))
    assert "kernels overlap" in text and "MODEL_PDL=0" in text
