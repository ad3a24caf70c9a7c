"""Concurrency on a GPU: two handles capturing at the same time from two threads (thread-local
capture mode), handles on separate streams replaying concurrently, and a capture while another
thread runs eager torch work. Every thread's results are checked bit-exact against eager."""
import threading
import time

import pytest
import torch

import cugraph_rt as cg
from _cugraph_steps import sin_axpy

pytestmark = pytest.mark.gpu
TIMEOUT = 60


def _make_step(scale, barrier=None):
    """torch + Triton; while capturing it meets the other thread at `barrier`, so both captures
    are open at the same moment."""

    def step(x):
        h = torch.sin(x) * scale + x
        if barrier is not None and torch.cuda.is_current_stream_capturing():
            barrier.wait(timeout=TIMEOUT)
        return sin_axpy(h, x)

    return step


def _run_threads(targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def _check_replays(h, step, n, size, seed, replays=50):
    """`replays` calls of a captured handle with fresh inputs, each output kept (cloned on the
    handle's stream) and compared with eager afterwards."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    xs, outs = [], []
    with torch.cuda.stream(h.stream.torch):
        for _ in range(replays):
            x = torch.randn(size, device="cuda", generator=g)
            xs.append(x)
            outs.append(h(x=x).clone())
        refs = [step(x) for x in xs]
    h.stream.synchronize()
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert torch.equal(o, r), f"{n}: replay {i} differs from eager"


def test_two_threads_capture_at_the_same_time():
    for size in (4096, 8192):   # compile the Triton kernel once, before the threads race
        _make_step(1.0)(torch.randn(size, device="cuda"))
    torch.cuda.synchronize()
    barrier = threading.Barrier(2)
    handles = {}
    steps = {n: _make_step(scale, barrier) for n, scale in (("a", 0.5), ("b", -1.5))}

    def worker(n, size):
        def run():
            x = torch.randn(size, device="cuda")
            h = handles[n] = cg.GraphHandle(steps[n], {"x": x}, warmup=1,
                                            capture_mode="thread_local")
            h(x=x)                       # warmup
            h(x=x)                       # capture: meets the other thread inside its capture
            assert h.phase == "replay" and h.graph.num_nodes >= 2
            _check_replays(h, steps[n], n, size, seed=hash(n) % 1000)
        return run

    _run_threads([worker("a", 4096), worker("b", 8192)])
    assert barrier.n_waiting == 0 and not barrier.broken
    for h in handles.values():
        h.close()


def test_handles_on_separate_streams_replay_concurrently():
    steps = {n: _make_step(scale) for n, scale in (("a", 0.25), ("b", 2.0), ("c", -0.75))}
    handles = {}
    for n in steps:
        x = torch.randn(1 << 16, device="cuda")
        handles[n] = cg.GraphHandle(steps[n], {"x": x}, warmup=1)
        handles[n](x=x), handles[n](x=x)
        assert handles[n].phase == "replay"
    streams = {h.stream.handle for h in handles.values()}
    assert len(streams) == 3
    go = threading.Event()

    def worker(n):
        def run():
            go.wait(TIMEOUT)
            _check_replays(handles[n], steps[n], n, 1 << 16, seed=ord(n), replays=200)
        return run

    threads = [worker(n) for n in handles]
    timer = threading.Timer(0.05, go.set)
    timer.start()
    _run_threads(threads)
    for h in handles.values():
        assert h.stats.replays >= 200
        h.close()


def test_capture_while_another_thread_runs_eager_torch_work():
    stop = threading.Event()
    done = {"iters": 0}
    a = torch.randn(256, 256, device="cuda")
    expect = (a @ a).sum().item()

    def eager_work():
        torch.cuda.set_device(0)
        while not stop.is_set():
            b = torch.randn(1024, device="cuda") * 2          # allocations and frees
            m = a @ a
            s = m.sum().item()                                # a host sync on its own stream
            assert abs(s - expect) <= 1e-4 * abs(expect) + 1e-3, (s, expect)
            del b, m
            done["iters"] += 1

    started = time.time()
    worker = threading.Thread(target=lambda: _guard(eager_work, done), daemon=True)
    worker.start()
    while done["iters"] < 5 and time.time() - started < TIMEOUT:
        time.sleep(0.01)
    try:
        for i in range(5):
            step = _make_step(0.5 + i)

            def slow_step(x, step=step):
                out = step(x)
                if torch.cuda.is_current_stream_capturing():
                    time.sleep(0.05)        # hold the capture open while the other thread works
                return out

            x = torch.randn(4096, device="cuda")
            with cg.GraphHandle(slow_step, {"x": x}, warmup=1) as h:
                h(x=x), h(x=x)
                assert h.phase == "replay"
                _check_replays(h, step, f"capture {i}", 4096, seed=i, replays=20)
    finally:
        stop.set()
        worker.join(TIMEOUT)
    assert "error" not in done, done.get("error")
    assert done["iters"] > 5


def _guard(fn, done):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        done["error"] = repr(e)
