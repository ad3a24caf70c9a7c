"""Prefill benchmark against the compute floor (a benchmark, not a test).

    python -m tools.bench_prefill --preset 35b-a3b --lengths 128,1024,4096,16384 --out out/prefill

First a correctness check at the same widths with --check-layers layers: a --check-tokens prompt
prefilled in chunks of --check-chunk tokens through the graphs (several chunks and a padded bucket)
against the token-by-token decode path (the decode step fed one prompt token per step): last-token
logits and the KV cache, conv and recurrent states after prefill. In fp32 every element within
1e-3 (relative to the largest); in bf16, whose two paths sum in different orders, within 8e-2 in
norm (measured on an H200: 4e-2 at 4 layers), the top-1 token among the other's top 5. Deeper
random-weight models amplify bf16 rounding differences (see DESIGN.md), so the check stays shallow. Then, per prompt
length at batch 1, time to first token (prefill through the graphs, the last-token logits ready on
the device; median of --reps) and tok/s, with the compute floor beside it: 2 x active parameters x
tokens (+ causal attention) / dense bf16 FLOP/s measured in the same run with a large matmul. Then
rows of mixed lengths in one call, and transformers' own prefill at the same widths with
--hf-layers layers beside ours cut to the same layers. One-time start-up (JIT, capture) is
reported on its own. Writes bench_prefill.json.

--quant int4 [--group-size 128] [--lm-head bf16|int4] measures the prefill over int4 weights: every
linear of the layers (and the lm_head where asked) quantized in memory with HQQ as
`python -m model.generate --quant int4` quantizes them (model.quant.layout.quantize_weights), so the
chunked prefill reads the packed weights (int4 GEMMs and grouped experts). Its check compares the
Triton prefill graphs with the reference backend (the torch references, the int4 weights
dequantized) on the same int4 weights, at --check-layers, with the bounds above; the weight floor
counts int4 bytes (0.5 + 4 / group per weight, bf16 scales and zeros) for the quantized tensors.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

from tools import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench_prefill", description=__doc__.split("\n")[0])
    common.add_model_args(p, default_preset="35b-a3b")
    ints = common.positive_int_list
    p.add_argument("--lengths", type=ints, default=[128, 1024, 4096, 16384], help="prompt lengths, batch 1")
    p.add_argument("--mixed", type=ints, default=[100, 1000, 3000], help="row lengths of one mixed call")
    p.add_argument("--chunk", type=common.positive_int, default=None, help="tokens per prefill step (default 4096)")
    p.add_argument("--sweep-chunks", type=ints, default=[],
                   help="also time --lengths with each of these chunk sizes (to choose the default by measurement)")
    p.add_argument("--reps", type=common.positive_int, default=3)
    p.add_argument("--check-tokens", type=common.positive_int, default=300)
    p.add_argument("--check-chunk", type=common.positive_int, default=128)
    p.add_argument("--check-layers", type=common.positive_int, default=4)
    p.add_argument("--profile-tokens", type=int, default=4096,
                   help="per-kernel GPU time of one prefill of this many tokens (0 = skip)")
    p.add_argument("--hf-layers", type=int, default=8, help="layers for transformers' prefill (0 = skip)")
    p.add_argument("--hf-max-len", type=common.positive_int, default=4096, help="longest prompt given to transformers")
    p.add_argument("--out", type=Path, default=Path("out/prefill"))
    p.add_argument("--quant", choices=("none", "int4"), default="none",
                   help="int4: quantize the weights in memory (HQQ, docs/int4.md) and prefill over the packed weights")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128, help="int4 group size (--quant int4)")
    p.add_argument("--lm-head", choices=("bf16", "int4"), default="bf16", help="the lm_head under --quant int4")
    p.add_argument("--quant-method", choices=("hqq", "rtn"), default="hqq",
                   help="the quantizer under --quant int4 (rtn: faster to build; the kernels are the same)")
    args = p.parse_args(argv)
    if args.quant == "none" and (args.group_size != 128 or args.lm_head != "bf16" or args.quant_method != "hqq"):
        p.error("--group-size, --lm-head and --quant-method apply to --quant int4")
    if args.hf_layers < 0:
        p.error(f"--hf-layers must be >= 0 (0 skips transformers), got {args.hf_layers}")
    if args.profile_tokens < 0:
        p.error(f"--profile-tokens must be >= 0 (0 skips the profile), got {args.profile_tokens}")
    return args


def dense_tflops(torch, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(common.time_cuda(lambda: a @ b, reps=reps, warmup=3))
    del a, b
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def prefill_flops(cfg, tokens: int) -> float:
    """2 x active parameters (lm_head once) x tokens, plus causal attention's two products."""
    act = cfg.weight_counts(1)["active"]
    per_token = sum(v for k, v in act.items() if k not in ("lm_head", "embedding_row"))
    attn = len(cfg.attn_layers) * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * tokens * (tokens + 1) / 2
    return 2 * per_token * tokens + 2 * cfg.vocab_size * cfg.hidden_size + attn


def weight_floor_ms(cfg, tokens: int, bandwidth_gbs: float, args=None) -> float:
    """Reading every weight the prompt touches once (experts: those its tokens are expected to
    pick, uniform routing): at few tokens prefill is bound by this, not by the FLOPs. Under
    --quant int4 the linears count 0.5 + 4 / group bytes a weight (norms, the embedding row and a
    bf16 lm_head 2; the conv weights, < 0.1 %, are counted with the linears)."""
    if args is None or args.quant == "none":
        return cfg.bytes_per_token(2, batch=tokens) / (bandwidth_gbs * 1e9) * 1e3
    b4 = 0.5 + 4 / args.group_size
    plain = {"embedding_row", "norms"} | ({"lm_head"} if args.lm_head == "bf16" else set())
    active = cfg.weight_counts(tokens)["active"]
    nbytes = sum(v * (2 if k in plain else b4) for k, v in active.items())
    return nbytes / (bandwidth_gbs * 1e9) * 1e3


def quantize(weights, args):
    """The int4 layout of `weights` under --quant int4 (--quant-method, HQQ by default as in
    model.generate --quant int4); the weights as they are otherwise."""
    if args.quant == "none":
        return weights
    from model.quant.layout import quantize_weights

    return quantize_weights(weights, args.group_size, args.quant_method, lm_head=args.lm_head)


def rel(a, b) -> float:
    """max |a - b| / max |b|"""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def fro(a, b) -> float:
    """||a - b|| / ||b||"""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(cfg, dtype, args, torch) -> dict:
    """Chunked graph prefill against the token-by-token decode step, from the same weights; under
    --quant int4 against the reference backend's prefill of the same int4 weights."""
    from model.decoder import Decoder
    from model.prefill import PrefillGraphs
    from model.weights import random_weights

    cfg = dataclasses.replace(cfg, num_layers=min(args.check_layers, cfg.num_layers))
    weights = quantize(random_weights(cfg, device="cuda", dtype=dtype, seed=args.seed), args)
    n = args.check_tokens
    prompt = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    a = Decoder(cfg, weights, max_batch=1, max_seq=n + 8, backend="triton")
    graphs = PrefillGraphs(a.prefill_step(args.check_chunk))
    graphs.prepare(row=0)
    la = a.prefill([prompt], chunk_runner=graphs)[0].clone()
    graphs.close()
    if args.quant == "int4":   # the reference ops in the same chunks, eagerly
        b = Decoder(cfg, weights, max_batch=1, max_seq=n + 8, backend="reference")
        b.prefill_step(args.check_chunk)
        b.prefill([prompt])
        against = "reference backend (int4 weights dequantized)"
    else:
        b = Decoder(cfg, weights, max_batch=1, max_seq=n + 8, backend="triton")
        for pos, tok in enumerate(prompt):   # the decode step, eagerly, one prompt token at a time
            b.decode_step(torch.tensor([tok], device="cuda"), torch.tensor([pos], device="cuda"))
        against = "token-by-token decode"
    torch.cuda.synchronize()
    lb = b.logits[0].clone()
    out = {"dtype": str(dtype).removeprefix("torch."), "against": against, "layers": cfg.num_layers, "tokens": n,
           "chunk": args.check_chunk, "top1_equal": int(la.argmax()) == int(lb.argmax()),
           "top1_in_top5": int(la.argmax()) in lb.float().topk(5).indices.tolist()}
    for name, x, y in (("logits", la, lb), ("kv", a.state.kv, b.state.kv), ("conv", a.state.conv, b.state.conv),
                       ("recurrent", a.state.recurrent, b.state.recurrent)):
        out[f"{name}_max"], out[f"{name}_fro"] = rel(x, y), fro(x, y)
    del a, b, weights
    gc.collect()
    torch.cuda.empty_cache()
    bound, key = (8e-2, "_fro") if dtype == torch.bfloat16 else (1e-3, "_max")
    bad = {k: v for k, v in out.items() if k.endswith(key) and v > bound}
    if bad or not out["top1_in_top5"]:
        raise SystemExit(f"prefill differs from the {against} path: {out} (bound {bound}); no speed reported")
    out["bound"] = bound
    return out


def _cfg(args):
    """The model's widths (random weights are checked at them, also for --checkpoint)."""
    from model.config import ModelConfig

    if args.checkpoint is not None:
        return ModelConfig.from_hf(args.checkpoint)
    return ModelConfig.preset(args.preset or args.default_preset)


def time_prefill(decoder, graphs, prompts, reps, torch) -> float:
    """Median wall ms of Decoder.prefill through the graphs, logits ready on the device."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        decoder.prefill(prompts, chunk_runner=graphs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_ours(cfg, weights, lengths, mixed, args, torch) -> dict:
    from model.decoder import Decoder
    from model.prefill import PrefillGraphs

    longest = max(max(lengths), max(mixed))
    dec = Decoder(cfg, weights, max_batch=max(1, len(mixed)), max_seq=longest + 8, backend="triton")
    t0 = time.perf_counter()
    graphs = PrefillGraphs(dec.prefill_step(args.chunk))
    graphs.prepare(row=0)
    torch.cuda.synchronize()
    startup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(2)
    rows = []
    for n in lengths:
        p = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
        ms = time_prefill(dec, graphs, [p], args.reps, torch)
        rows.append({"tokens": n, "ttft_ms": ms, "tok_s": n / ms * 1e3})
    ps = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in mixed]
    mixed_ms = time_prefill(dec, graphs, ps, args.reps, torch)
    profile = None
    if getattr(args, "profile_tokens", 0) and args.profile_tokens <= longest and args.out is not None:
        from tools import kernel_profile

        p = torch.randint(0, cfg.vocab_size, (args.profile_tokens,), generator=g).tolist()
        prof = kernel_profile.profile_replays(lambda: dec.prefill([p], chunk_runner=graphs), 1,
                                              args.out / "prefill-trace.json")
        profile = kernel_profile.format_profile(prof, top=16)
        (args.out / "prefill-kernels.txt").write_text(profile + "\n")
    out = {"profile": profile, "startup_s": startup_s, "chunk": graphs.step.chunk, "buckets": list(graphs.buckets),
           "workspace_MB": graphs.step.nbytes() / 1e6, "graph_mem_MB": graphs.handle.refresh_stats().graph_mem_bytes / 1e6,
           "rows": rows, "mixed": {"lengths": mixed, "ms": mixed_ms, "tok_s": sum(mixed) / mixed_ms * 1e3}}
    graphs.close()
    del dec, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bench_transformers(cfg, layers, lengths, reps, torch) -> list:
    """transformers' own prefill (forward over the prompt with a cache), batch 1, `layers` layers."""
    from transformers import AutoModelForCausalLM, DynamicCache

    small = dataclasses.replace(cfg, num_layers=layers)
    hf_cfg = small.to_hf()
    # seeded: every run times the same weights and routing (its times moved 2x between two runs)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    model.eval()
    out = []
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
            times = []
            for _ in range(reps + 2):
                cache = DynamicCache(config=hf_cfg)
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            out.append({"tokens": n, "ms": statistics.median(times[2:])})   # two warm-up calls
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.require_gpu("bench_prefill")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = common.gpu_name()
    tflops = dense_tflops(torch)
    checked = []
    for dtype in (torch.float32, torch.bfloat16):
        checked.append(check(_cfg(args), dtype, args, torch))
        print(f"check: {checked[-1]}", file=sys.stderr)
    cfg, weights = common.build_model(args)
    t0 = time.perf_counter()
    weights = quantize(weights, args)
    quantize_s = time.perf_counter() - t0
    ours = bench_ours(cfg, weights, args.lengths, args.mixed, args, torch)
    bw = common.copy_bandwidth_gbs()
    for r in ours["rows"]:
        r["floor_ms"] = prefill_flops(cfg, r["tokens"]) / (tflops * 1e12) * 1e3
        r["weight_floor_ms"] = weight_floor_ms(cfg, r["tokens"], bw, args)
    sweep = []
    for chunk in args.sweep_chunks:
        one = bench_ours(cfg, weights, args.lengths, [args.lengths[0]],
                         argparse.Namespace(**{**vars(args), "chunk": chunk, "profile_tokens": 0}), torch)
        sweep.append({"chunk": chunk, "startup_s": one["startup_s"], "workspace_MB": one["workspace_MB"],
                      "ttft_ms": {r["tokens"]: r["ttft_ms"] for r in one["rows"]}})
    hf = None
    if args.hf_layers:
        layers = min(args.hf_layers, cfg.num_layers)
        hf_lengths = [n for n in args.lengths if n <= args.hf_max_len]
        cut = dataclasses.replace(cfg, num_layers=layers)
        cut_args = argparse.Namespace(**{**vars(args), "profile_tokens": 0})
        ours_cut = bench_ours(cut, weights.first_layers(layers), hf_lengths, [hf_lengths[0]], cut_args, torch)
        del weights
        gc.collect()
        torch.cuda.empty_cache()
        theirs = bench_transformers(cfg, layers, hf_lengths, args.reps, torch)
        hf = {"layers": layers, "rows": [{"tokens": t["tokens"], "transformers_ms": t["ms"], "ours_ms": o["ttft_ms"],
                                          "speedup": t["ms"] / o["ttft_ms"]}
                                         for t, o in zip(theirs, ours_cut["rows"])]}
    result = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "preset": args.preset or args.default_preset,
              "layers": cfg.num_layers, "dtype": args.dtype,
              "quant": None if args.quant == "none" else {"bits": 4, "method": args.quant_method, "group_size": args.group_size,
                                                          "lm_head": args.lm_head, "quantize_s": quantize_s},
              "dense_bf16_TFLOPs": tflops, "copy_bandwidth_GBs": bw, "check": checked,
              "ours": ours, "chunk_sweep": sweep, "transformers": hf, "argv": sys.argv}
    (args.out / "bench_prefill.json").write_text(json.dumps(result, indent=1))
    weights_kind = args.dtype if args.quant == "none" else \
        f"int4 weights ({args.quant_method}, group {args.group_size}, lm_head {args.lm_head}; quantized in {quantize_s:.0f} s), {args.dtype}"
    print(f"\n{gpu}, {result['preset']} ({cfg.num_layers} layers), {weights_kind}, batch 1, chunk {ours['chunk']}, "
          f"dense bf16 {tflops:.0f} TFLOP/s; start-up (JIT + capture of {len(ours['buckets'])} buckets) "
          f"{ours['startup_s']:.1f} s, workspaces {ours['workspace_MB']:.0f} MB, graph memory {ours['graph_mem_MB']:.0f} MB")
    for c in checked:
        print(f"check {c['dtype']}, {c['layers']} layers, vs {c['against']} ({c['tokens']} tokens, chunks of "
              f"{c['chunk']}), relative error max / norm: " + ", ".join(
                  f"{k} {c[k + '_max']:.1e} / {c[k + '_fro']:.1e}" for k in ("logits", "kv", "conv", "recurrent"))
              + f"; top-1 equal {c['top1_equal']}")
    print(f"floors: compute = 2 x active parameters x tokens (+ attention) at {tflops:.0f} TFLOP/s; weights = "
          f"each weight the prompt touches read once at {bw:.0f} GB/s; the figure is against the larger")
    print(f"{'tokens':>7} {'TTFT ms':>9} {'tok/s':>9} {'compute ms':>11} {'weights ms':>11} {'x floor':>8}")
    for r in ours["rows"]:
        floor = max(r["floor_ms"], r["weight_floor_ms"])
        print(f"{r['tokens']:>7} {r['ttft_ms']:>9.1f} {r['tok_s']:>9.0f} {r['floor_ms']:>11.1f} "
              f"{r['weight_floor_ms']:>11.1f} {r['ttft_ms'] / floor:>8.2f}")
    if ours["profile"]:
        print(f"where the time of one {args.profile_tokens}-token prefill goes (kernel records of the graph replays):")
        print(ours["profile"])
    if sweep:
        print("chunk sweep, TTFT ms by prompt length (start-up and workspaces of each chunk size apart):")
        print(f"{'chunk':>6} " + " ".join(f"{n:>9}" for n in args.lengths) + f" {'start-up s':>11} {'ws MB':>7}")
        for s in sweep:
            print(f"{s['chunk']:>6} " + " ".join(f"{s['ttft_ms'][n]:>9.1f}" for n in args.lengths)
                  + f" {s['startup_s']:>11.1f} {s['workspace_MB']:>7.0f}")
    m = ours["mixed"]
    print(f"mixed rows {m['lengths']} in one call: {m['ms']:.1f} ms ({m['tok_s']:.0f} tok/s)")
    if hf:
        for r in hf["rows"]:
            print(f"at {hf['layers']} layers, {r['tokens']} tokens: transformers (bf16) {r['transformers_ms']:.1f} ms, "
                  f"ours{'' if args.quant == 'none' else ' (int4)'} {r['ours_ms']:.1f} ms ({r['speedup']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
