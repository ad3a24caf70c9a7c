"""Decode benchmark against the memory-bandwidth floor (a benchmark, not a test).

    python tools/bench_decode.py --preset 35b-a3b --batches 1,2,4,8 --context 1024 --out out/bench

For each batch: checks first that graph-replayed tokens equal eager tokens (greedy, from the same
state), then times with CUDA events (medians over --steps after warmup): our eager step, the
cugraph_rt replay, and torch.cuda.CUDAGraph capturing the very same step. Then transformers' own
eager decode at the same widths with --hf-layers layers (memory), and ours cut to the same layers.
Prints a table with the GPU named and the floor beside each figure; writes bench_decode.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_decode.py", description=__doc__.split("\n")[0])
    common.add_model_args(p, default_preset="35b-a3b")
    p.add_argument("--batches", type=common.positive_int_list, default=[1, 2, 4, 8],
                   help="comma-separated batch sizes")
    p.add_argument("--context", type=common.positive_int, default=1024)
    p.add_argument("--steps", type=common.positive_int, default=100)
    p.add_argument("--check-steps", type=common.positive_int, default=16, help="graph == eager tokens over N steps")
    p.add_argument("--hf-layers", type=int, default=8, help="layers for transformers' eager decode (0 = skip)")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    args = p.parse_args(argv)
    common.check_batch(p, "--batches", max(args.batches))
    if args.hf_layers < 0:
        p.error(f"--hf-layers must be >= 0 (0 skips transformers), got {args.hf_layers}")
    if args.steps < 50:
        print(f"note: --steps {args.steps} < 50; medians are noisier", file=sys.stderr)
    return args


def fill_context(gen, batch: int, context: int, torch):
    """Run the graph over positions 0..context-2 so the timed steps attend over `context` tokens."""
    tokens = torch.ones(batch, dtype=torch.int64)
    for pos in range(context - 1):
        gen.step(tokens, torch.full((batch,), pos, dtype=torch.int64))


def greedy_tokens(gen, batch: int, steps: int, stream, torch) -> tuple[list, "torch.Tensor"]:
    """Greedy tokens over `steps` positions from a reset state, and the last logits; run and read
    on `stream` so that host reads are ordered after the step."""
    with torch.cuda.stream(stream):
        gen.decoder.reset()
        tok = torch.arange(1, batch + 1, dtype=torch.int64)
        out = []
        for pos in range(steps):
            nxt = gen.step(tok, torch.full((batch,), pos, dtype=torch.int64))
            tok = nxt.cpu()
            out.append(tok.tolist())
        return out, gen.decoder.logits[:batch].clone()


def bench_ours(cfg, weights, batch, args, torch):
    from model.decoder import Decoder
    from model.generation import Generator, SamplingParams

    decoder = Decoder(cfg, weights, max_batch=batch, max_seq=args.context + args.check_steps + 8,
                      backend="triton")
    eager = Generator(decoder, SamplingParams(), use_graph=False)
    graph = Generator(decoder, SamplingParams(), use_graph=True)
    stream = graph.handle.stream.torch
    eager_tokens, eager_logits = greedy_tokens(eager, batch, args.check_steps, stream, torch)
    graph_tokens, graph_logits = greedy_tokens(graph, batch, args.check_steps, stream, torch)
    if eager_tokens != graph_tokens or not torch.equal(eager_logits, graph_logits):
        raise SystemExit(f"batch {batch}: graph replay differs from eager (tokens equal: "
                         f"{eager_tokens == graph_tokens}); no speed reported")
    with torch.cuda.stream(stream):
        decoder.reset()
    fill_context(graph, batch, args.context, torch)
    tok = torch.ones(batch, dtype=torch.int64, device="cuda")
    pos = torch.full((batch,), args.context - 1, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()   # made on torch's stream; the timed steps read them on ours
    row = {"batch": batch}
    row["eager_ms"] = statistics.median(common.time_cuda(lambda: eager._step(tok, pos), args.steps, stream=stream))
    row["cugraph_rt_ms"] = statistics.median(
        common.time_cuda(lambda: graph.handle(tokens=tok, positions=pos), args.steps, stream=stream))
    # The peer: torch's own graph manager capturing the very same step on the same buffers.
    static_tok, static_pos = tok.clone(), pos.clone()
    with torch.cuda.stream(stream):
        eager._step(static_tok, static_pos)
    stream.synchronize()
    tgraph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(tgraph):
        eager._step(static_tok, static_pos)

    def torch_replay():
        static_tok.copy_(tok)
        static_pos.copy_(pos)
        tgraph.replay()

    stream.synchronize()
    row["torch_graph_ms"] = statistics.median(common.time_cuda(torch_replay, args.steps, stream=stream))
    row["check"] = f"graph == eager over {args.check_steps} steps"
    graph.close()
    del tgraph, graph, eager, decoder
    gc.collect()
    torch.cuda.empty_cache()
    return row


def bench_transformers(cfg, layers, context, steps, torch):
    """transformers' eager decode step (ms), batch 1, at the same widths with `layers` layers."""
    import dataclasses

    from transformers import AutoModelForCausalLM, DynamicCache

    small = dataclasses.replace(cfg, num_layers=layers)
    hf_cfg = small.to_hf()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16,
                                                 experts_implementation="eager", attn_implementation="eager")
    model.eval()
    cache = DynamicCache(config=hf_cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, context - 1), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = torch.ones(1, 1, dtype=torch.int64, device="cuda")
        times = []
        for i in range(steps + 3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=nxt, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
    del model, cache
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times[3:])


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.require_gpu("bench_decode")
    import dataclasses

    args.out.mkdir(parents=True, exist_ok=True)
    gpu = common.gpu_name()
    bw = common.copy_bandwidth_gbs()
    cfg, weights = common.build_model(args, batch=max(args.batches),
                                      max_seq=args.context + args.check_steps + 8)
    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    rows = []
    for batch in args.batches:
        row = bench_ours(cfg, weights, batch, args, torch)
        row["bytes"] = cfg.bytes_per_token(dtype_bytes, batch=batch) + \
            common.kv_bytes_per_token(cfg, args.context, dtype_bytes, batch)
        row["floor_ms"] = row["bytes"] / (bw * 1e9) * 1e3
        rows.append(row)
        print(f"batch {batch}: {row}", file=sys.stderr)
    hf = None
    if args.hf_layers:
        layers = min(args.hf_layers, cfg.num_layers)
        ours_cut = bench_ours(dataclasses.replace(cfg, num_layers=layers), weights.first_layers(layers), 1,
                              args, torch)
        del weights
        gc.collect()
        torch.cuda.empty_cache()
        hf = {"layers": layers, "transformers_eager_ms": bench_transformers(cfg, layers, args.context,
                                                                            min(args.steps, 50), torch),
              "ours_eager_ms": ours_cut["eager_ms"], "ours_cugraph_rt_ms": ours_cut["cugraph_rt_ms"]}
    result = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "preset": args.preset or args.default_preset,
              "layers": cfg.num_layers, "dtype": args.dtype, "context": args.context, "steps": args.steps,
              "copy_bandwidth_GBs": bw, "rows": rows, "transformers": hf, "argv": sys.argv}
    (args.out / "bench_decode.json").write_text(json.dumps(result, indent=1))
    print(f"\n{gpu}, {result['preset']} ({cfg.num_layers} layers), {args.dtype}, context {args.context}, "
          f"copy bandwidth {bw:.0f} GB/s, medians of {args.steps} steps")
    print(f"{'batch':>5} {'floor ms':>9} {'eager ms':>9} {'cugraph_rt ms':>14} {'torch graph ms':>15} "
          f"{'eager/replay':>12} {'ours/torch':>10} {'tok/s':>8} {'x floor':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['floor_ms']:>9.3f} {r['eager_ms']:>9.3f} {r['cugraph_rt_ms']:>14.3f} "
              f"{r['torch_graph_ms']:>15.3f} {r['eager_ms'] / r['cugraph_rt_ms']:>12.2f} "
              f"{r['cugraph_rt_ms'] / r['torch_graph_ms']:>10.3f} {r['batch'] * 1e3 / r['cugraph_rt_ms']:>8.1f} "
              f"{r['cugraph_rt_ms'] / r['floor_ms']:>8.2f}")
    if hf:
        print(f"at {hf['layers']} layers, batch 1: transformers eager {hf['transformers_eager_ms']:.2f} ms, "
              f"ours eager {hf['ours_eager_ms']:.2f} ms, ours cugraph_rt {hf['ours_cugraph_rt_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
