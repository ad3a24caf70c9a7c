"""Host cost per replay: cugraph_rt vs torch.cuda.CUDAGraph.replay() vs eager.

Steps of 1, 100 and 1000 kernels (in-place torch adds on a small buffer: each op is one kernel,
nothing allocates). Each call is timed alone on the host (perf_counter), the GPU drained every
few calls so the launch queue never fills, and the median reported. Correctness first: every
method's output must equal the eager result, or no figure is printed.

    python -m tools.bench_launch --out out/   # writes out/bench_launch.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

from model.cli_args import positive_int, positive_int_list


def make_step(n_kernels: int, out):
    import torch
    def step(x):
        torch.add(x, 1.0, out=out)
        for _ in range(n_kernels - 1):
            out.add_(1.0)
        return out
    return step


def host_times(fn, calls: int, drain_every: int, sync) -> list[float]:
    times = []
    pc = time.perf_counter
    for i in range(calls):
        if i % drain_every == 0:
            sync()
        t0 = pc()
        fn()
        times.append(pc() - t0)
    sync()
    return times


def med_us(ts) -> float:
    return statistics.median(ts) * 1e6


def bench_size(n_kernels: int, calls: int, cg, torch) -> dict:
    size = 1024
    x = torch.arange(size, device="cuda", dtype=torch.float32)  # integers: the sums are exact
    expect = x + float(n_kernels)
    h_out = torch.empty_like(x)
    h = cg.GraphHandle(make_step(n_kernels, h_out), {"x": x}, warmup=2)
    s = h.stream
    drain = max(1, min(50, 2000 // n_kernels))
    eager_calls = max(20, min(calls, 20000 // n_kernels))
    with torch.cuda.stream(s.torch):  # torch's current stream = ours for every method
        for _ in range(3):
            h(x=x)
        plan = h.replay_plan()     # what every replay launches; plan.launch() is the graph alone
        static_x = torch.empty_like(x)
        t_out = torch.empty_like(x)
        t_step = make_step(n_kernels, t_out)
        for _ in range(2):
            t_step(static_x)
        tg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(tg, stream=s.torch):
            t_step(static_x)
        static_x.copy_(x)
        tg.replay()
        e_out = torch.empty_like(x)
        e_step = make_step(n_kernels, e_out)
        e_step(x)
        s.synchronize()
        h_out.fill_(float("nan"))
        h(x=x)
        s.synchronize()
        checks = {"cugraph_rt": bool(torch.equal(h_out, expect)),
                  "torch_graph": bool(torch.equal(t_out, expect)),
                  "eager": bool(torch.equal(e_out, expect))}
        if not all(checks.values()):
            raise SystemExit(f"correctness check failed at {n_kernels} kernels: {checks}")
        sync = s.synchronize
        r = {
            "kernels": n_kernels,
            "cugraph_launch_us": med_us(host_times(plan.launch, calls, drain, sync)),
            "cugraph_handle_us": med_us(host_times(lambda: h(x=x), calls, drain, sync)),
            "torch_replay_us": med_us(host_times(tg.replay, calls, drain, sync)),
            "torch_copy_replay_us": med_us(host_times(
                lambda: (static_x.copy_(x), tg.replay()), calls, drain, sync)),
            "eager_us": med_us(host_times(lambda: e_step(x), eager_calls, 1, sync)),
            "calls": calls, "eager_calls": eager_calls, "nodes": h.stats.nodes,
        }
        # GPU time per replay, for scale (events around 50 back-to-back replays)
        e0, e1 = cg.Event(), cg.Event()
        e0.record(s)
        for _ in range(50):
            plan.launch()
        e1.record(s)
        e1.synchronize()
        r["gpu_us_per_replay"] = e0.elapsed_ms(e1) * 1e3 / 50
    h.close()
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory (or .json path) for the results")
    ap.add_argument("--sizes", type=positive_int_list, default=[1, 100, 1000],
                    help="kernels per step, comma-separated")
    ap.add_argument("--calls", type=positive_int, default=5000, help="timed calls per method and size")
    args = ap.parse_args(argv)
    sizes = args.sizes
    import cugraph_rt as cg
    if not cg.is_available():
        print("bench_launch: no CUDA GPU here; graphs need an NVIDIA GPU and driver. Nothing run.")
        return 2
    import torch
    info = cg.device_info()
    rows = [bench_size(n, min(args.calls, max(500, 500000 // n)), cg, torch) for n in sizes]
    meta = {
        "gpu": info["name"], "driver_version": info["driver_version"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m tools.bench_launch " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__, "python": sys.version.split()[0],
    }
    try:
        import cuda.bindings
        meta["cuda_bindings"] = cuda.bindings.__version__
    except Exception:  # noqa: BLE001
        pass
    print(f"host cost per call, median, us  ({meta['gpu']}, {meta['date']})")
    hdr = ("kernels", "cg launch", "cg handle", "torch replay", "torch copy+replay", "eager",
           "GPU/replay")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['kernels']} | {r['cugraph_launch_us']:.2f} | {r['cugraph_handle_us']:.2f} | "
              f"{r['torch_replay_us']:.2f} | {r['torch_copy_replay_us']:.2f} | "
              f"{r['eager_us']:.1f} | {r['gpu_us_per_replay']:.1f} |")
    if args.out:
        path = args.out if args.out.endswith(".json") else os.path.join(args.out,
                                                                      "bench_launch.json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
