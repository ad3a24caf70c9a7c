"""Per-kernel GPU time of replayed graphs, from torch.profiler's CUPTI kernel records.

CUPTI reports each kernel node of a launched graph as its own kernel record, so profiling a few
replays tells which kernels the step's time goes to and how much of it is idle between kernels
(launch latency of dependent nodes, tails of small grids). The profiler exports a Chrome/Perfetto
trace; this module reads its "kernel" events back, so the same file can be opened in Perfetto.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KernelRow:
    name: str
    calls_per_step: float
    us_per_step: float       # summed device time of this kernel's calls in one step
    us_per_call: float
    share: float             # of the summed kernel time


@dataclass(frozen=True)
class StepProfile:
    steps: int
    kernels_per_step: float
    busy_us: float           # summed kernel time per step
    span_us: float           # first kernel start to last kernel end, mean over steps
    rows: list[KernelRow]

    @property
    def idle_us(self) -> float:
        """Time in the span with no kernel running: the gaps between dependent graph nodes."""
        return max(self.span_us - self.busy_us, 0.0)


def short_name(name: str, width: int = 60) -> str:
    """Triton kernels keep their name; C++ templates lose their argument lists."""
    base = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    base = base.split("<", 1)[0].split("(", 1)[0]
    return base if len(base) <= width else base[: width - 3] + "..."


def kernel_events(trace: dict) -> list[tuple[str, float, float, tuple]]:
    """(name, start µs, duration µs, grid) of every kernel record in a profiler Chrome trace."""
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") == "kernel" and ev.get("ph") == "X":
            grid = tuple(ev.get("args", {}).get("grid", ()))
            out.append((str(ev["name"]), float(ev["ts"]), float(ev.get("dur", 0.0)), grid))
    out.sort(key=lambda e: e[1])
    return out


def _keys(events) -> list[str]:
    """Short kernel names; a kernel launched with several grids (one GEMV kernel, many shapes)
    gets one key per grid."""
    grids = collections.defaultdict(set)
    for name, _, _, grid in events:
        grids[short_name(name)].add(grid)
    keys = []
    for name, _, _, grid in events:
        key = short_name(name)
        if len(grids[key]) > 1:
            key += " grid=" + "x".join(str(g) for g in grid)
        keys.append(key)
    return keys


def aggregate(events: list[tuple[str, float, float, tuple]], steps: int, kernels_per_step: int | None = None
              ) -> StepProfile:
    """Fold kernel records of `steps` identical steps into per-step figures. With kernels_per_step
    (the graph's kernel-node count) the records are cut into steps to measure each step's span."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not events:
        raise ValueError("no kernel records: the profiler saw no kernels (CUPTI unavailable?)")
    busy = collections.Counter()
    calls = collections.Counter()
    for key, (_, _, dur, _) in zip(_keys(events), events):
        busy[key] += dur
        calls[key] += 1
    total = sum(busy.values())
    rows = [KernelRow(name, calls[name] / steps, us / steps, us / calls[name], us / total)
            for name, us in busy.most_common()]
    if kernels_per_step and len(events) == kernels_per_step * steps:
        spans = []
        for s in range(steps):
            chunk = events[s * kernels_per_step:(s + 1) * kernels_per_step]
            spans.append(max(e[1] + e[2] for e in chunk) - chunk[0][1])
        span = sum(spans) / steps
    else:   # not cut into steps: the whole window, which includes the gaps between launches
        span = (max(e[1] + e[2] for e in events) - events[0][1]) / steps
    return StepProfile(steps, len(events) / steps, total / steps, span, rows)


def profile_replays(launch, steps: int, trace_path: Path, kernels_per_step: int | None = None) -> StepProfile:
    """Run launch() `steps` times under torch.profiler (after one unprofiled call), export the
    Chrome trace to trace_path and aggregate its kernel records."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    launch()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            launch()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))
    return aggregate(kernel_events(json.loads(Path(trace_path).read_text())), steps, kernels_per_step)


def format_profile(p: StepProfile, top: int = 20) -> str:
    head = (f"kernel time per step {p.busy_us:.1f} us over {p.kernels_per_step:.0f} kernels; span "
            f"{p.span_us:.1f} us, of which idle between kernels {p.idle_us:.1f} us "
            f"({p.idle_us / p.span_us:.0%})" if p.span_us else "")
    if p.busy_us > p.span_us * 1.01:
        head += ("\n  kernels overlap (programmatic dependent launch): a kernel's record starts when its "
                 "programs are scheduled,\n  so it includes waiting for the previous kernel; MODEL_PDL=0 "
                 "gives exclusive times")
    lines = [head, f"  {'us/step':>9} {'share':>6} {'calls':>6} {'us/call':>8}  kernel (grid where it varies)"]
    for r in p.rows[:top]:
        lines.append(f"  {r.us_per_step:9.1f} {r.share:6.1%} {r.calls_per_step:6.1f} {r.us_per_call:8.2f}  {r.name}")
    return "\n".join(lines)
