"""The decode loop on the device against the host's per-step loop (a benchmark, not a test).

    python -m tools.bench_loop --preset 35b-a3b --batches 1,8 --prompt 1024 --new 257 --out out/loop

Per batch: one Generator (graphs captured at start-up, reported apart), greedy, no end-of-sequence
(every row runs its whole budget). Checks first that every mode gives the per-step loop's tokens.
Then times generate() in each mode, decode only (after the first token): the per-step loop (one
launch, one copy back and one synchronisation per step), the fixed-K graphs for each K alone, and
the WHILE loop (one launch); beside them the bare replay of the captured step (CUDA events, no
host work between steps), the figure a loop on the device can at best reach.
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
    p = argparse.ArgumentParser(prog="python -m tools.bench_loop", description=__doc__.split("\n")[0])
    common.add_model_args(p, default_preset="tiny")
    p.add_argument("--batches", type=common.positive_int_list, default=[1, 8])
    p.add_argument("--prompt", type=common.positive_int, default=128, help="prompt tokens per row")
    p.add_argument("--new", type=common.positive_int, default=257,
                   help="new tokens per row (1 + a multiple of 64: every fixed K divides the decode steps)")
    p.add_argument("--ks", type=common.positive_int_list, default=[4, 16, 64], help="fixed-K graphs to time")
    p.add_argument("--reps", type=common.positive_int, default=3, help="generate() calls per mode (median)")
    p.add_argument("--out", type=Path, default=Path("out/loop"))
    args = p.parse_args(argv)
    common.check_batch(p, "--batches", max(args.batches))
    if args.new < 2:
        p.error(f"--new must be >= 2 (the decode time is the time after the first token), got {args.new}")
    return args


def bench_batch(cfg, weights, batch, args, torch) -> dict:
    from model.decoder import Decoder
    from model.generation import Generator

    dec = Decoder(cfg, weights, max_batch=batch, max_seq=args.prompt + args.new + 8, backend="triton")
    t0 = time.perf_counter()
    gen = Generator(dec, device_loop="while")
    loop = gen._device_loop("fixed")
    startup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(batch)]
    steps = args.new - 1

    def run(mode):
        res = gen.generate(prompts, args.new, device_loop=mode)
        return res.tokens, res.decode_s * 1e3 / steps

    want, _ = run(False)
    modes = [("per-step", False, None)] + [(f"fixed K={k}", "fixed", k) for k in args.ks] + [("while", "while", None)]
    rows = []
    for name, mode, k in modes:
        if k is not None:
            loop.fixed_steps = (1, k)
            loop.prepare("fixed")
        got, _ = run(mode)
        if got != want:
            raise SystemExit(f"batch {batch}, {name}: tokens differ from the per-step loop; no speed reported")
        ms = statistics.median(run(mode)[1] for _ in range(args.reps))
        rows.append({"mode": name, "ms_per_step": ms, "tok_s": batch * 1e3 / ms})
    # the bare replay of the captured step at the middle of the decoded context, each row on its own
    # generated token (rows on one token would all pick the same experts: fewer bytes, a false floor)
    tok = torch.tensor([t[args.new // 2] for t in want], dtype=torch.int64, device="cuda")
    pos = torch.full((batch,), args.prompt + args.new // 2, dtype=torch.int64, device="cuda")
    stream = gen.handle.stream.torch
    torch.cuda.synchronize()
    bare = statistics.median(common.time_cuda(lambda: gen.handle(tokens=tok, positions=pos), 100, stream=stream))
    out = {"batch": batch, "startup_s": startup_s + loop.startup_s, "bare_replay_ms": bare, "modes": rows,
           "check": f"every mode's tokens == the per-step loop's ({batch} x {args.new})"}
    gen.close()
    del gen, dec
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.require_gpu("bench_loop")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = common.gpu_name()
    cfg, weights = common.build_model(args, batch=max(args.batches), max_seq=args.prompt + args.new + 8)
    results = [bench_batch(cfg, weights, b, args, torch) for b in args.batches]
    result = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "preset": args.preset or args.default_preset,
              "layers": cfg.num_layers, "dtype": args.dtype, "prompt": args.prompt, "new": args.new,
              "batches": results, "argv": sys.argv}
    (args.out / "bench_loop.json").write_text(json.dumps(result, indent=1))
    print(f"\n{gpu}, {result['preset']} ({cfg.num_layers} layers), {args.dtype}, prompt {args.prompt}, "
          f"{args.new} new tokens per row, greedy; decode ms per step (after the first token), median of {args.reps}")
    for r in results:
        bare = r["bare_replay_ms"]
        per_step = r["modes"][0]["ms_per_step"]
        print(f"batch {r['batch']}: bare replay {bare:.3f} ms ({r['batch'] * 1e3 / bare:.0f} tok/s); "
              f"start-up (graphs) {r['startup_s']:.1f} s; {r['check']}")
        print(f"  {'mode':<12} {'ms/step':>9} {'tok/s':>9} {'vs bare':>8} {'vs per-step':>12}")
        for m in r["modes"]:
            print(f"  {m['mode']:<12} {m['ms_per_step']:>9.3f} {m['tok_s']:>9.0f} "
                  f"{m['ms_per_step'] / bare:>8.3f} {per_step / m['ms_per_step']:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
