"""Decode benchmark against the memory-bandwidth floor (a benchmark, not a test).

    python -m tools.bench_decode --preset 35b-a3b --batches 1,2,4,8 --context 1024 --out out/bench
    python -m tools.bench_decode --preset 35b-a3b --quant int4 [--group-size 128] [--lm-head bf16|int4]
    python -m tools.bench_decode --batches 1 --variants default,fused_router,fused_conv+fused_router,default

--variants compares process settings (model/settings.py; 'a+b' turns both on, 'a=0' off) in one
process on the same weights: each variant is checked (graph == eager, and int4 against the
reference) and timed in turn; a repeated 'default' shows the drift between the first and last.

For each batch: checks first that graph-replayed tokens equal eager tokens (greedy, from the same
state), then times with CUDA events (medians over --steps after warmup): our eager step, the
cugraph_rt replay, and torch.cuda.CUDAGraph capturing the very same step. Then transformers' own
eager decode at the same widths with --hf-layers layers (memory), and ours cut to the same layers.
With int4 weights (--quant int4, or an int4 checkpoint) the Triton step is first checked against
the reference backend on the same weights (--ref-steps teacher-forced steps over the first
--ref-layers layers; nothing is timed if it
differs), and the floor counts the bytes the int4 step reads (codes, scales and zeros of the active
weights; the lm_head in its own format: model/quant/cost.py).
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

from tools import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_decode.py", description=__doc__.split("\n")[0])
    common.add_model_args(p, default_preset="35b-a3b", quant=True)
    p.add_argument("--batches", type=common.positive_int_list, default=[1, 2, 4, 8],
                   help="comma-separated batch sizes")
    p.add_argument("--context", type=common.positive_int, default=1024)
    p.add_argument("--steps", type=common.positive_int, default=100)
    p.add_argument("--check-steps", type=common.positive_int, default=16, help="graph == eager tokens over N steps")
    p.add_argument("--hf-layers", type=int, default=8, help="layers for transformers' eager decode (0 = skip)")
    p.add_argument("--ref-steps", type=common.positive_int, default=4,
                   help="int4: Triton vs reference backend over N teacher-forced steps before timing")
    p.add_argument("--ref-layers", type=common.positive_int, default=4,
                   help="int4: layers of that check (random weights over all 40 layers are chaotic: a "
                        "summation-order difference grows layer by layer, see DESIGN.md)")
    p.add_argument("--variants", type=variant_list, default=[("default", {})],
                   help="comma-separated settings variants to compare, e.g. default,fused_router,"
                        "fused_conv+int4_moe_rows,default (names: model/settings.py)")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    args = p.parse_args(argv)
    common.check_batch(p, "--batches", max(args.batches))
    if args.hf_layers < 0:
        p.error(f"--hf-layers must be >= 0 (0 skips transformers), got {args.hf_layers}")
    if args.steps < 50:
        print(f"note: --steps {args.steps} < 50; medians are noisier", file=sys.stderr)
    return args


def variant_list(text: str) -> list:
    """'default,fused_router' -> [('default', {}), ('fused_router', {'fused_router': True})]."""
    from model.settings import parse_variant

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated variants, got {text!r}")
    try:
        return [(n, parse_variant(n)) for n in names]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


# int4 Triton vs reference logits at 35b-a3b widths: both dequantize to bf16 exactly alike, so they
# differ by summation order inside bf16 roundings, as the bf16 path (tests/gpu/test_decoder_gpu.py)
REF_TOL = 0.08


def check_against_reference(cfg, weights, batch: int, steps: int, torch) -> dict:
    """The Triton step against the reference backend on the same weights: `steps` teacher-forced
    steps of `batch` rows (the same random tokens into both), logits poisoned before each step.
    SystemExit (no speed reported) when a logit is not finite or a step's max |diff| / max |logit|
    exceeds REF_TOL; else the worst ratio and the top-1 agreement."""
    from model.decoder import Decoder

    decs = {b: Decoder(cfg, weights, max_batch=batch, max_seq=steps + 1, backend=b) for b in ("reference", "triton")}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (steps, batch), generator=g)
    worst, agree = 0.0, 0
    for p, tok in enumerate(tokens):
        out = {}
        for name, dec in decs.items():
            dec.logits.fill_(float("nan"))
            pos = torch.full((batch,), p, dtype=torch.int64, device="cuda")
            out[name] = dec.decode_step(tok.cuda(), pos).float().clone()
        tri, ref = out["triton"], out["reference"]
        if not (torch.isfinite(tri).all() and torch.isfinite(ref).all()):
            raise SystemExit(f"int4 check, batch {batch}, step {p}: non-finite logits; no speed reported")
        for r in range(batch):
            worst = max(worst, float((tri[r] - ref[r]).abs().max()) / max(float(ref[r].abs().max()), 1e-6))
        agree += int((tri.argmax(-1) == ref.argmax(-1)).sum())
    del decs
    gc.collect()
    torch.cuda.empty_cache()
    if worst > REF_TOL:
        raise SystemExit(f"int4 check, batch {batch}: Triton vs reference max |logit diff| / max |logit| = "
                         f"{worst:.4g} > {REF_TOL}; no speed reported")
    return {"steps": steps, "max_rel_logit_diff": worst, "top1_agreement": agree / (steps * batch)}


def bench_ours(cfg, weights, batch, args, torch):
    from model.decoder import Decoder
    from model.generation import Generator, SamplingParams

    decoder = Decoder(cfg, weights, max_batch=batch, max_seq=args.context + args.check_steps + 8,
                      backend="triton")
    eager = Generator(decoder, SamplingParams(), use_graph=False)
    graph = Generator(decoder, SamplingParams(), use_graph=True, prefill_graphs=False)   # decode only
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
    from model.quant.cost import read_bytes_per_token
    from model.quant.layout import int4_fields

    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    fmt = common.weights_format(weights)
    from model.settings import overridden

    floors = {}   # per batch: the bytes a step reads do not depend on the variant
    for batch in args.batches:
        weight_bytes = read_bytes_per_token(weights, batch)["total"]
        nbytes = weight_bytes + common.kv_bytes_per_token(cfg, args.context, dtype_bytes, batch)
        floors[batch] = {"weight_bytes": weight_bytes, "bytes": nbytes, "floor_ms": nbytes / (bw * 1e9) * 1e3}
    int4_check, rows = None, []
    for name, changes in args.variants:
        with overridden(**changes):
            if int4_fields(weights):     # correctness first: the int4 kernels against their references
                layers = min(args.ref_layers, cfg.num_layers)
                cut = weights.first_layers(layers)
                int4_check = check_against_reference(cut.cfg, cut, min(args.batches), args.ref_steps, torch)
                int4_check["layers"] = layers
                print(f"{name}: int4 check: {int4_check}", file=sys.stderr)
            for batch in args.batches:
                row = bench_ours(cfg, weights, batch, args, torch)
                row.update(variant=name, int4_check=int4_check, **floors[batch])
                rows.append(row)
                print(f"{name}, batch {batch}: {row}", file=sys.stderr)
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
              "layers": cfg.num_layers, "dtype": args.dtype, "weights": fmt, "int4_check": int4_check,
              "context": args.context, "steps": args.steps,
              "copy_bandwidth_GBs": bw, "rows": rows, "transformers": hf, "argv": sys.argv}
    (args.out / "bench_decode.json").write_text(json.dumps(result, indent=1))
    print(f"\n{gpu}, {result['preset']} ({cfg.num_layers} layers), {args.dtype}, weights {fmt}, context "
          f"{args.context}, copy bandwidth {bw:.0f} GB/s, medians of {args.steps} steps")
    if int4_check:
        print(f"int4 Triton vs reference over {int4_check['steps']} steps: max |logit diff| / max |logit| "
              f"{int4_check['max_rel_logit_diff']:.3g}, top-1 agreement {int4_check['top1_agreement']:.0%}")
    wide = max(len(r["variant"]) for r in rows)
    print(f"{'variant':<{wide}} {'batch':>5} {'GB/tok':>7} {'floor ms':>9} {'eager ms':>9} {'cugraph_rt ms':>14} {'torch graph ms':>15} "
          f"{'eager/replay':>12} {'ours/torch':>10} {'tok/s':>8} {'x floor':>8}")
    for r in rows:
        print(f"{r['variant']:<{wide}} {r['batch']:>5} {r['bytes'] / 1e9:>7.3f} {r['floor_ms']:>9.3f} {r['eager_ms']:>9.3f} {r['cugraph_rt_ms']:>14.3f} "
              f"{r['torch_graph_ms']:>15.3f} {r['eager_ms'] / r['cugraph_rt_ms']:>12.2f} "
              f"{r['cugraph_rt_ms'] / r['torch_graph_ms']:>10.3f} {r['batch'] * 1e3 / r['cugraph_rt_ms']:>8.1f} "
              f"{r['cugraph_rt_ms'] / r['floor_ms']:>8.2f}")
    if hf:
        print(f"at {hf['layers']} layers, batch 1: transformers eager {hf['transformers_eager_ms']:.2f} ms, "
              f"ours eager {hf['ours_eager_ms']:.2f} ms, ours cugraph_rt {hf['ours_cugraph_rt_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
