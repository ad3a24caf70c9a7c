"""Host cost of a replay (marker gpu): GraphHandle's fast path and ReplayPlan.launch() against
torch.cuda.CUDAGraph (copy_ + replay, and replay), medians of a few thousand calls of a 1-kernel
step, the GPU drained every few calls (tools/bench_launch.py is the full benchmark). Also: every
handle's launch goes through its ReplayPlan, and a closed handle's plan refuses to launch."""
import statistics
import time

import pytest
import torch

import cugraph_rt as cg

pytestmark = pytest.mark.gpu
CALLS, DRAIN = 3000, 50


def _median_us(fn, sync) -> float:
    times, pc = [], time.perf_counter
    for i in range(CALLS):
        if i % DRAIN == 0:
            sync()
        t0 = pc()
        fn()
        times.append(pc() - t0)
    sync()
    return statistics.median(times) * 1e6


def test_replay_host_cost_at_or_below_torch_cuda_graph():
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    out = torch.empty_like(x)

    def step(x):
        return torch.add(x, 1.0, out=out)

    h = cg.GraphHandle(step, {"x": x}, warmup=1)
    s = h.stream
    with torch.cuda.stream(s.torch):            # the same stream for every method
        h(x=x), h(x=x)
        plan = h.replay_plan()
        static_x, t_out = torch.empty_like(x), torch.empty_like(x)
        step_t = lambda v: torch.add(v, 1.0, out=t_out)  # noqa: E731
        step_t(static_x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s.torch):
            step_t(static_x)
        out.fill_(float("nan"))
        h(x=x)
        static_x.copy_(x)
        g.replay()
        s.synchronize()
        assert torch.equal(out, x + 1) and torch.equal(t_out, x + 1)   # correctness first
        for _ in range(200):                      # warm the paths
            h(x=x), plan.launch(), g.replay()
        sync = s.synchronize
        handle_us = _median_us(lambda: h(x=x), sync)
        torch_copy_us = _median_us(lambda: (static_x.copy_(x), g.replay()), sync)
        launch_us = _median_us(plan.launch, sync)
        replay_us = _median_us(g.replay, sync)
    foreign_us = _median_us(lambda: h(x=x), torch.cuda.synchronize)   # caller on torch's default stream
    print(f"host us per call (median of {CALLS}): handle {handle_us:.2f} vs torch copy_+replay "
          f"{torch_copy_us:.2f}; plan.launch {launch_us:.2f} vs torch replay {replay_us:.2f}; "
          f"handle from another stream {foreign_us:.2f}")
    assert h.stats.replays >= 2 * CALLS
    h.close()
    with pytest.raises(cg.ClosedError):
        plan.launch()
    # at or below torch's (a margin for timing noise on a shared host)
    assert handle_us <= 1.10 * torch_copy_us + 0.5, (handle_us, torch_copy_us)
    assert launch_us <= 1.10 * replay_us + 0.5, (launch_us, replay_us)


def test_buckets_launch_through_their_plans():
    with cg.GraphHandle(lambda x: x * 2, {"x": cg.InputSpec((16, 4), torch.float32)}, warmup=1,
                        buckets=(4, 16)) as h:
        x = torch.randn(3, 4, device="cuda")
        h(x=x), h(x=x)
        for b in (4, 16):
            assert h.replay_plan(b).bucket == b and h.replay_plan(b).n_inputs == 1
        with pytest.raises(ValueError, match="bucket must be one of"):
            h.replay_plan(None)
        h.replay_plan(4).launch()             # the static input as it is: 3 rows then padding
        h.stream.synchronize()
        torch.testing.assert_close(h.replay_plan(4).outputs[:3], x * 2)
