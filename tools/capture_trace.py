"""Show what a captured decode step is made of.

    python -m tools.capture_trace --preset tiny --out out/trace
    python -m tools.capture_trace --preset 35b-a3b --quant int4 [--group-size 128] [--lm-head int4] --out out/trace-int4

Builds the decoder, warms up, captures one decode step (decode + on-device sampling) through a
cugraph_rt.GraphHandle and writes to --out: graph.dot (and graph.svg where graphviz is installed),
nodes.json (every node; counts per kernel), trace.json (Chrome/Perfetto: the phases, then N eager
and N replayed steps timed with CUDA events), latency.png (eager vs replay), summary.txt/json,
and with --profile-steps > 0 the per-kernel GPU time of replays from torch.profiler (CUPTI):
kernels.txt/json (time per kernel, idle time between kernels) and kernels-trace.json (Perfetto).
Then the device loop's graph (a conditional WHILE node whose body is the step; docs/device-loop.md):
loop-tree.txt (node outline, bodies indented) and loop-graph.dot (bodies as clusters).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from tools import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/capture_trace.py", description=__doc__.split("\n")[0])
    common.add_model_args(p, quant=True)
    p.add_argument("--out", type=Path, default=Path("out/trace"), help="output directory")
    p.add_argument("--steps", type=common.positive_int, default=50, help="eager and replayed steps timed")
    p.add_argument("--batch", type=common.positive_int, default=1)
    p.add_argument("--context", type=int, default=1024, help="KV positions the timed steps attend over")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="replays profiled per kernel with torch.profiler (0 = skip)")
    p.add_argument("--no-device-loop", action="store_true",
                   help="skip the device loop's graph (a WHILE node around the step: loop-tree.txt, loop-graph.dot)")
    args = p.parse_args(argv)
    if args.context < 1:
        p.error(f"--context must be >= 1, got {args.context}")
    if args.profile_steps < 0:
        p.error(f"--profile-steps must be >= 0 (0 skips the profile), got {args.profile_steps}")
    common.check_batch(p, "--batch", args.batch)
    return args


def node_records(graph) -> tuple[list[dict], dict]:
    nodes = [dataclasses.asdict(n) for n in graph.nodes()]
    counts = collections.Counter(n["name"] or n["type"] for n in nodes)
    return nodes, dict(counts.most_common())


def chrome_trace(stats: dict, eager_ms: list[float], replay_ms: list[float]) -> dict:
    """Phases on a host track, back to back; eager and replayed steps on a GPU track each."""
    events, t = [], 0.0
    for phase in ("warmup", "capture", "instantiate", "upload"):
        dur = stats.get(f"{phase}_s", 0.0) * 1e6
        events.append({"name": phase, "ph": "X", "ts": t, "dur": dur, "pid": 1, "tid": 1, "cat": "phase"})
        t += dur
    for tid, label, series in ((2, "eager step", eager_ms), (3, "replay step", replay_ms)):
        for i, ms in enumerate(series):
            events.append({"name": f"{label} {i}", "ph": "X", "ts": t, "dur": ms * 1e3, "pid": 1,
                           "tid": tid, "cat": label})
            t += ms * 1e3
    meta = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
            for tid, name in ((1, "host phases"), (2, "GPU eager steps"), (3, "GPU graph replays"))]
    return {"traceEvents": meta + events, "displayTimeUnit": "ms"}


def plot_latency(path: Path, eager_ms, replay_ms, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(eager_ms, label=f"eager (median {statistics.median(eager_ms):.3f} ms)")
    ax.plot(replay_ms, label=f"graph replay (median {statistics.median(replay_ms):.3f} ms)")
    ax.set_xlabel("step")
    ax.set_ylabel("ms per decode step (CUDA events)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_kernels(args, launch, stream, kernels_per_step: int, torch) -> str:
    """Per-kernel GPU time of replays (kernels.txt/json, kernels-trace.json); '' when skipped or
    when the profiler has no kernel records here (the rest of the trace does not depend on it)."""
    from tools import kernel_profile

    if args.profile_steps == 0:
        return ""
    try:
        with torch.cuda.stream(stream):
            prof = kernel_profile.profile_replays(launch, args.profile_steps, args.out / "kernels-trace.json",
                                                  kernels_per_step)
    except (RuntimeError, ValueError) as e:
        print(f"kernel profile skipped: {e}", file=sys.stderr)
        return ""
    text = kernel_profile.format_profile(prof, top=25)
    (args.out / "kernels.txt").write_text(text + "\n")
    (args.out / "kernels.json").write_text(json.dumps(dataclasses.asdict(prof), indent=1))
    return text


def device_loop_tree(gen, out: Path) -> str:
    """Capture the device loop (model/device_loop.py: a conditional WHILE node whose body is the
    step, sampling and the stop rule) and write its node tree: loop-tree.txt, loop-graph.dot."""
    from cugraph_rt import ConditionalRecord, conditional, node_tree
    from cugraph_rt.conditional_records import tree_lines, write_tree_dot

    why = conditional.conditional_support()
    if why is not None:
        return f"device loop: not captured ({why})"
    graph = gen._device_loop("while")._graphs["while"]
    tree = node_tree(graph)
    (out / "loop-tree.txt").write_text("\n".join(tree_lines(tree)) + "\n")
    write_tree_dot(graph, out / "loop-graph.dot")
    loops = [r for r in tree if isinstance(r, ConditionalRecord)]
    body = [len(b) for r in loops for b in r.bodies]
    return (f"device loop graph: {len(tree)} nodes, {len(loops)} conditional ({', '.join(str(r.kind) for r in loops)}),"
            f" bodies of {body} nodes (loop-tree.txt, loop-graph.dot)")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.require_gpu("capture_trace")
    from model.decoder import Decoder
    from model.generation import Generator, SamplingParams

    args.out.mkdir(parents=True, exist_ok=True)
    cfg, weights = common.build_model(args, batch=args.batch, max_seq=args.context + 8)
    decoder = Decoder(cfg, weights, max_batch=args.batch, max_seq=args.context + 8, backend="triton")
    gen = Generator(decoder, SamplingParams(), use_graph=True, prefill_graphs=False)   # the decode step only
    handle = gen.handle
    tokens = torch.ones(args.batch, dtype=torch.int64)
    positions = torch.full((args.batch,), args.context - 1, dtype=torch.int64)
    while handle.phase != "replay":              # warmup runs, then the capture
        # the handle directly: Generator.step would refuse a position the rows have not reached
        handle(tokens=tokens, positions=positions)
    handle.stream.synchronize()
    stats = handle.stats.as_dict()
    graph = handle.graph
    graph.to_dot(args.out / "graph.dot")
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", str(args.out / "graph.dot"), "-o", str(args.out / "graph.svg")],
                       check=False, timeout=300)
    nodes, counts = node_records(graph)
    kernels = [n for n in nodes if n["type"] == "Kernel"]
    (args.out / "nodes.json").write_text(json.dumps({"nodes": nodes, "counts": counts}, indent=1, default=str))

    dev_tokens = tokens.cuda()
    dev_positions = positions.cuda()
    torch.cuda.synchronize()   # made on torch's stream; the timed steps read them on the handle's
    stream = handle.stream.torch
    eager_ms = common.time_cuda(lambda: gen._step(dev_tokens, dev_positions), reps=args.steps, stream=stream)
    replay_ms = common.time_cuda(lambda: handle(tokens=dev_tokens, positions=dev_positions),
                                 reps=args.steps, stream=stream)
    eager, replay = statistics.median(eager_ms), statistics.median(replay_ms)
    kernel_text = profile_kernels(args, lambda: handle(tokens=dev_tokens, positions=dev_positions),
                                  stream, len(kernels), torch)

    from model.quant.cost import read_bytes_per_token

    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    # the weights as held (int4 codes, scales and zeros where int4): model/quant/cost.py
    step_bytes = read_bytes_per_token(weights, args.batch)["total"] + \
        common.kv_bytes_per_token(cfg, args.context, dtype_bytes, args.batch)
    bw = common.copy_bandwidth_gbs()
    floor_ms = step_bytes / (bw * 1e9) * 1e3
    summary = {
        "gpu": common.gpu_name(), "preset": args.preset or ("checkpoint" if args.checkpoint else "tiny"),
        "layers": cfg.num_layers, "batch": args.batch, "context": args.context, "dtype": args.dtype,
        "weights": common.weights_format(weights),
        "nodes": len(nodes), "kernel_nodes": len(kernels),
        "kernels_per_layer": round(len(kernels) / cfg.num_layers, 2),
        "warmup_ms": stats.get("warmup_s", 0) * 1e3, "capture_ms": stats.get("capture_s", 0) * 1e3,
        "instantiate_ms": stats.get("instantiate_s", 0) * 1e3, "upload_ms": stats.get("upload_s", 0) * 1e3,
        "eager_step_ms": eager, "replay_step_ms": replay, "speedup": eager / replay,
        "tok_s": args.batch * 1e3 / replay, "bytes_per_step": step_bytes,
        "achieved_GBs": step_bytes / (replay * 1e-3) / 1e9, "copy_bandwidth_GBs": bw, "floor_ms": floor_ms,
        "replay_over_floor": replay / floor_ms,
    }
    (args.out / "trace.json").write_text(json.dumps(chrome_trace(stats, eager_ms, replay_ms)))
    plot_latency(args.out / "latency.png", eager_ms, replay_ms,
                 f"{summary['preset']} decode step, batch {args.batch}, {summary['gpu']}")
    width = max(len(k) for k in summary)
    table = "\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                      for k, v in summary.items())
    top = "\n".join(f"  {c:5d}  {name}" for name, c in list(counts.items())[:20])
    text = f"{table}\n\nnodes per kernel (top 20):\n{top}\n"
    if kernel_text:
        text += f"\nGPU time per kernel in a replayed step (torch.profiler, {args.profile_steps} replays):\n{kernel_text}\n"
    if not args.no_device_loop:
        text += "\n" + device_loop_tree(gen, args.out) + "\n"
    (args.out / "summary.txt").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)
    gen.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
