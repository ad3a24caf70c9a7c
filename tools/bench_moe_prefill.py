"""The prefill MoE (grouped expert GEMMs, model/ops/moe/grouped.py) against its compute floor, and a
sweep of its tiles.

    python -m tools.bench_moe_prefill --preset 35b-a3b --tokens 1024,4096 [--sweep] --out out/moe-prefill

For each chunk of T tokens: random bf16 experts, router logits and a shared expert's gate/up rows
at the preset's widths; each token's k experts from a softmax top-k of random logits (every expert
gets about T*k/E pairs, as random routing gives). Every configuration is first checked against
moe_experts_grouped_reference (relative Frobenius error <= 2 %, outputs poisoned with NaN before
the run); only then timed inside a CUDA graph with CUDA events. The floor is the op's FLOPs (the
gate/up and down products of the T*k pairs and the shared expert's down product) at the dense bf16
rate of an 8192^3 matmul measured in the same run. With --sweep every configuration of sweep_grid
(each GEMM kernel's tiles in turn, per block_m) and then each block_m's best pair is checked and
timed (until --max-seconds); the best is printed beside the default.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

from tools import common

CHECK_BOUND = 0.02


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench_moe_prefill", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=common.PRESETS, default="35b-a3b")
    p.add_argument("--tokens", type=common.positive_int_list, default=[1024, 4096], help="tokens per prefill chunk")
    p.add_argument("--reps", type=common.positive_int, default=20, help="timed graph replays per configuration")
    p.add_argument("--sweep", action="store_true", help="sweep the tile configurations (sweep_grid)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop each sweep after this long")
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--out", type=Path, default=Path("out/moe-prefill"))
    args = p.parse_args(argv)
    if not 0 < args.max_seconds < float("inf"):     # nan fails too
        p.error(f"--max-seconds must be > 0, got {args.max_seconds} (a finite number of seconds)")
    return args


def op_flops(t: int, h: int, i: int, k: int, i_s: int) -> float:
    """FLOPs of one grouped MoE call: the T*k pairs' gate/up [2I, H] and down [H, I] products and the
    shared expert's down [H, Is] (its gate/up is a projection before the op)."""
    return 2.0 * t * k * (2 * i * h + h * i) + 2.0 * t * i_s * h


def tile_grid(kernel: str) -> list:
    """GemmTiles to try for one GEMM kernel ("gate_up": K = H, "down": K = I, wider N)."""
    from model.ops.moe.grouped import GemmTiles

    ns, ks = ((64, 128), (64, 128)) if kernel == "gate_up" else ((64, 128, 256), (32, 64, 128))
    return [GemmTiles(n, k, w, st) for n, k, w, st in itertools.product(ns, ks, (4, 8), (3, 4))]


def sweep_grid(base) -> list:
    """Configurations around `base` (a MoeGroupedLaunch), per block_m of BLOCK_MS from 32 up (base's
    first, then the nearest, larger before smaller, so a sweep cut by --max-seconds keeps the likeliest): every
    gate/up tiling with base's down tiles, then every down tiling with base's gate/up. The two GEMMs
    are separate kernels, so the op's time ranks one kernel's tiles while the other stays fixed;
    best_pairs then joins each block_m's best of both. `base` itself is excluded."""
    from model.ops.moe.grouped import BLOCK_MS

    out = []
    order = sorted((m for m in BLOCK_MS if m >= 32), key=lambda m: (abs(m.bit_length() - base.block_m.bit_length()), -m))
    for bm in order:
        out += [dataclasses.replace(base, block_m=bm, gate_up=t) for t in tile_grid("gate_up")]
        out += [dataclasses.replace(base, block_m=bm, down=t) for t in tile_grid("down")]
    return list(dict.fromkeys(c for c in out if c != base))


def best_pairs(base, timed: list) -> list:
    """Per block_m: the fastest gate/up tiles (among rows whose down is base's) joined with the
    fastest down tiles (among rows whose gate/up is base's); timed holds (launch, us)."""
    out = []
    for bm in sorted({c.block_m for c, _ in timed}):
        gu = [(us, c.gate_up) for c, us in timed if c.block_m == bm and c.down == base.down]
        dn = [(us, c.down) for c, us in timed if c.block_m == bm and c.gate_up == base.gate_up]
        if gu and dn:
            joined = dataclasses.replace(base, block_m=bm, gate_up=min(gu, key=lambda r: r[0])[1],
                                         down=min(dn, key=lambda r: r[0])[1])
            if joined not in (c for c, _ in timed) and joined != base:
                out.append(joined)
    return out


class Case:
    """Inputs of one grouped MoE call at T tokens, the reference output, and checked timing."""

    def __init__(self, cfg, tokens: int, seed: int, torch, device="cuda"):
        from model.ops import moe

        self.torch, self.moe = torch, moe
        g = torch.Generator(device=device).manual_seed(seed)
        dt, dev = torch.bfloat16, device
        E, H, I, Is, k = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                          cfg.shared_expert_intermediate_size, cfg.num_experts_per_tok)
        self.shape = dict(t=tokens, h=H, i=I, k=k, e=E, i_s=Is)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dt)

        ids = torch.empty(tokens, k, dtype=torch.int32, device=dev)
        wts = torch.empty(tokens, k, dtype=dt, device=dev)
        moe.router_topk_reference(randn(tokens, E), k, wts, ids)
        self.args = dict(x=randn(tokens, H), gate_up_proj=randn(E, 2 * I, H, scale=0.02),
                         down_proj=randn(E, H, I, scale=0.02), ids=ids, weights=wts,
                         shared_gate_up=randn(tokens, 2 * Is), shared_down=randn(H, Is, scale=0.02),
                         shared_gate_logit=randn(tokens, 1),
                         workspace=moe.moe_grouped_workspace(tokens, k, E, H, I, Is, dt, dev),
                         out=torch.empty(tokens, H, dtype=dt, device=dev))
        moe.moe_experts_grouped_reference(**self.args)
        self.reference = self.args["out"].float().clone()
        self.flops = op_flops(tokens, H, I, k, Is)

    def default_launch(self):
        return self.moe.moe_grouped_launch_config(**self.shape)

    def check(self, launch) -> float:
        """Run with `launch` (compiling it outside any capture) on a NaN-poisoned output; relative
        Frobenius error against the reference. Raises AssertionError past CHECK_BOUND."""
        out = self.args["out"]
        out.fill_(float("nan"))
        self.moe.moe_experts_grouped_triton(**self.args, launch=launch)
        err = ((out.float() - self.reference).norm() / self.reference.norm()).item()
        assert err <= CHECK_BOUND, f"{launch}: relative error {err:.3g} against the reference"
        return err

    def time_us(self, launch, reps: int) -> float:
        return common.time_graph_us(lambda: self.moe.moe_experts_grouped_triton(**self.args, launch=launch), reps, 1)


def _tiles(c) -> str:
    t = lambda g: f"n{g.block_n} k{g.block_k} w{g.num_warps} s{g.num_stages}"  # noqa: E731
    return f"m{c.block_m} gate/up {t(c.gate_up)} | down {t(c.down)}"


def _row(launch, us: float, err: float, flops: float, tflops: float) -> dict:
    return {**dataclasses.asdict(launch), "tiles": _tiles(launch), "us": us, "TFLOPs": flops / (us * 1e-6) / 1e12,
            "x_floor": us / (flops / (tflops * 1e12) * 1e6), "rel_err": err}


def _sweep(case, base, base_us: float, args, tflops: float) -> list:
    """Rows of the sweep_grid configurations of each block_m, then of that block_m's best pair
    (best_pairs), each checked before it is timed, until --max-seconds."""
    deadline = time.monotonic() + args.max_seconds
    timed, rows = [(base, base_us)], []
    for _, group in itertools.groupby(sweep_grid(base), key=lambda c: c.block_m):
        for phase in (lambda: list(group), lambda: best_pairs(base, timed)):
            for launch in phase():
                if time.monotonic() > deadline:
                    print(f"T={case.shape['t']}: sweep stopped at --max-seconds", flush=True)
                    return rows
                try:
                    err = case.check(launch)
                except AssertionError:
                    raise
                except Exception as e:   # a configuration the compiler refuses (out of resources)
                    print(f"T={case.shape['t']} {_tiles(launch)}: skipped ({type(e).__name__}: {str(e)[:100]})",
                          flush=True)
                    continue
                us = case.time_us(launch, args.reps)
                timed.append((launch, us))
                rows.append(dict(_row(launch, us, err, case.flops, tflops), default=False))
                print(f"T={case.shape['t']} {_tiles(launch)}: {us:.1f} us", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.require_gpu("bench_moe_prefill")
    from model.config import ModelConfig
    from tools.bench_prefill import dense_tflops

    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.preset(args.preset)
    tflops = dense_tflops(torch)
    gpu = common.gpu_name()
    results = []
    for t in args.tokens:
        case = Case(cfg, t, args.seed, torch)
        base = case.default_launch()
        err = case.check(base)         # correctness first, then the time
        rows = [dict(_row(base, case.time_us(base, args.reps), err, case.flops, tflops), default=True)]
        if args.sweep:
            rows += _sweep(case, base, rows[0]["us"], args, tflops)
        rows.sort(key=lambda r: r["us"])
        results.append({"tokens": t, "flops": case.flops, "rows": rows})
        del case
        torch.cuda.empty_cache()
    report = {"gpu": gpu, "preset": args.preset, "dense_bf16_TFLOPs": tflops, "results": results, "argv": sys.argv}
    (args.out / "bench_moe_prefill.json").write_text(json.dumps(report, indent=1))
    print(f"\n{gpu}, {args.preset} prefill MoE (grouped GEMMs), bf16; floor = FLOPs at the dense bf16 "
          f"{tflops:.0f} TFLOP/s of this run; every row checked against the reference first")
    print(f"{'tokens':>7} {'config':>70} {'us':>9} {'TFLOP/s':>8} {'x floor':>8}")
    for r in results:
        default = next(x for x in r["rows"] if x["default"])
        best = r["rows"][0]
        for name, x in (("default", default), ("best", best)):
            print(f"{r['tokens']:>7} {name + ' ' + x['tiles']:>70} {x['us']:>9.1f} {x['TFLOPs']:>8.0f} {x['x_floor']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
