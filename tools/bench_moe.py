"""Routed-expert kernels against the memory-bandwidth floor, and a sweep of their launch configs.

    python tools/bench_moe.py --preset 35b-a3b --batch 1 --sweep --out out/moe

Builds --copies layers' worth of distinct expert weights (more than L2 holds, like the real step),
routes each with its own random router logits, checks every configuration against the torch
reference first, then times it inside a CUDA graph of one call per copy (graph launches, as in
decode) with CUDA events. Bytes = the distinct chosen experts' gate/up and down rows plus the
shared expert's down rows; floor = bytes over the measured device copy bandwidth. With --sweep the
two kernels' configurations are swept separately and the best pair is timed against the default.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_moe.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=common.PRESETS, default="35b-a3b")
    p.add_argument("--batch", type=common.positive_int, default=1)
    p.add_argument("--copies", type=common.positive_int, default=8, help="layers of distinct weights cycled")
    p.add_argument("--reps", type=common.positive_int, default=50, help="timed graph replays per configuration")
    p.add_argument("--sweep", action="store_true", help="sweep both kernels' launch configurations")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop the sweep after this long")
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--out", type=Path, default=Path("out/moe"))
    args = p.parse_args(argv)
    if not 0 < args.max_seconds < float("inf"):     # nan fails too
        p.error(f"--max-seconds must be > 0, got {args.max_seconds} (a finite number of seconds)")
    return args


def gate_up_grid(h: int, i: int):
    """Candidate (block_i, block_h, warps, stages) for the gate/up kernel."""
    for bi, bh, w, s in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8), (1, 3)):
        if bh <= max(h, 256) and bi <= i and 1024 <= bi * bh <= 4096 * w:
            yield bi, bh, w, s


def down_grid(h: int, i: int, k: int):
    """Candidate (block_ho, block_i, warps, stages) for the down kernel."""
    from model.ops._util import next_pow2

    bk = next_pow2(k)
    for ho, bi, w, s in itertools.product((1, 2, 4, 8, 16), (64, 128, 256, 512), (4, 8), (1, 3)):
        if bi <= max(next_pow2(i), 64) and ho <= h and 1024 <= bk * ho * bi <= 2048 * w:
            yield ho, bi, w, s


class Bench:
    """Weights, routed inputs and outputs for --copies layers, plus graph timing of kernel calls."""

    def __init__(self, cfg, batch: int, copies: int, seed: int, torch, device="cuda"):
        from model.ops import moe

        self.torch, self.moe = torch, moe
        g = torch.Generator(device=device).manual_seed(seed)
        dt, dev = torch.bfloat16, device
        E, H, I, Is, k = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                          cfg.shared_expert_intermediate_size, cfg.num_experts_per_tok)
        self.shape = dict(b=batch, h=H, i=I, k=k, i_s=Is)

        def randn(*shape, scale=0.02):
            return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dt)

        self.layers = []
        for _ in range(copies):
            ids = torch.empty(batch, k, dtype=torch.int32, device=dev)
            wts = torch.empty(batch, k, dtype=dt, device=dev)
            moe.router_topk_reference(randn(batch, E, scale=1.0), k, wts, ids)
            self.layers.append(dict(
                x=randn(batch, H, scale=1.0), gate_up_proj=randn(E, 2 * I, H), down_proj=randn(E, H, I),
                ids=ids, weights=wts, shared_gate_up=randn(batch, 2 * Is, scale=1.0), shared_down=randn(H, Is),
                shared_gate_logit=randn(batch, 1, scale=1.0), act_ws=moe.moe_workspace(batch, k, I, dt, dev),
                out=torch.empty(batch, H, dtype=dt, device=dev)))
        distinct = statistics.mean(len(set(L["ids"].flatten().tolist())) for L in self.layers)
        self.gate_up_bytes = distinct * 2 * I * H * 2
        self.down_bytes = distinct * H * I * 2 + H * Is * 2
        ref = dict(self.layers[0])
        ref["out"] = torch.empty_like(ref["out"])
        ref["act_ws"] = torch.empty_like(ref["act_ws"])
        moe.moe_experts_reference(**ref)
        self.reference = ref["out"].float()

    def check(self, launch) -> float:
        """Run layer 0 with `launch` (compiling it outside any capture); max error relative to the
        reference's largest magnitude. Raises AssertionError past 2%."""
        L = self.layers[0]
        self.moe.moe_experts_triton(**L, launch=launch)
        err = ((L["out"].float() - self.reference).abs().max() / self.reference.abs().max()).item()
        assert err <= 0.02, f"{launch}: relative error {err:.3g} against the reference"
        return err

    def time_us(self, part: str, launch, reps: int) -> float:
        """Median device time per layer of a graph holding one `part` call per copy."""
        moe = self.moe

        def step():
            for L in self.layers:
                if part in ("gate_up", "both"):
                    moe.launch_moe_gate_up(L["x"], L["gate_up_proj"], L["ids"], L["act_ws"], launch)
                if part in ("down", "both"):
                    moe.launch_moe_down(L["act_ws"], L["down_proj"], L["ids"], L["weights"], L["shared_gate_up"],
                                        L["shared_down"], L["shared_gate_logit"], L["out"], launch)

        return common.time_graph_us(step, reps, len(self.layers))


def sweep(bench, base, reps, deadline, log) -> tuple:
    """Best gate/up and down configurations (each swept with the other kernel's default)."""
    sh = bench.shape
    results = {"gate_up": [], "down": []}
    grids = {"gate_up": [dict(gate_up_block_i=a, gate_up_block_h=b, gate_up_warps=w, gate_up_stages=s)
                         for a, b, w, s in gate_up_grid(sh["h"], sh["i"])],
             "down": [dict(down_block_ho=a, down_block_i=b, down_warps=w, down_stages=s)
                      for a, b, w, s in down_grid(sh["h"], sh["i"], sh["k"])]}
    for part, grid in grids.items():
        nbytes = bench.gate_up_bytes if part == "gate_up" else bench.down_bytes
        for fields in grid:
            if time.monotonic() > deadline:
                log(f"{part}: sweep stopped at --max-seconds")
                break
            launch = dataclasses.replace(base, **fields)
            try:
                bench.check(launch)
            except Exception as e:   # a configuration the compiler refuses (e.g. out of resources)
                log(f"{part} {fields}: skipped ({type(e).__name__}: {str(e)[:120]})")
                continue
            us = bench.time_us(part, launch, reps)
            results[part].append({**fields, "us": us, "GBs": nbytes / (us * 1e-6) / 1e9})
        results[part].sort(key=lambda r: r["us"])
    best = dataclasses.replace(base, **{k: v for part in results if results[part]
                                        for k, v in results[part][0].items() if k not in ("us", "GBs")})
    return best, results


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.require_gpu("bench_moe")
    from model.config import ModelConfig
    from model.ops import moe

    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.preset(args.preset)
    E, H, I, Is = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    per_copy = (3 * E * I * H + H * Is) * 2 + args.batch * (3 * cfg.num_experts_per_tok + 2 * H + 2 * Is + 1) * 2
    common.check_memory({"expert weight copies": args.copies * per_copy,
                         "fp32 init temporaries": E * 2 * I * H * 4},
                        f"{args.copies} copies of the {args.preset} experts", "try fewer --copies")
    bench = Bench(cfg, args.batch, args.copies, args.seed, torch)
    bw = common.copy_bandwidth_gbs()
    base = moe.moe_launch_config(**bench.shape)
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    total = bench.gate_up_bytes + bench.down_bytes
    log(f"{common.gpu_name()}: {args.preset} experts, batch {args.batch}, {args.copies} weight copies; "
        f"{total / 1e6:.1f} MB per layer (gate/up {bench.gate_up_bytes / 1e6:.1f}, down+shared "
        f"{bench.down_bytes / 1e6:.1f}); copy bandwidth {bw:.0f} GB/s, floor {total / bw / 1e3:.2f} us")
    rows = {}
    for name, launch in [("default", base)] + ([("best", None)] if args.sweep else []):
        if launch is None:
            launch, swept = sweep(bench, base, args.reps, t_start + args.max_seconds, log)
            for part in ("gate_up", "down"):
                log(f"top {part} configurations:")
                for r in swept[part][:5]:
                    log(f"  {r['us']:7.2f} us  {r['GBs']:6.0f} GB/s  " +
                        " ".join(f"{k}={v}" for k, v in r.items() if k not in ("us", "GBs")))
            rows["sweep"] = swept
        err = bench.check(launch)
        parts = {p: bench.time_us(p, launch, args.reps) for p in ("gate_up", "down", "both")}
        rows[name] = {"launch": dataclasses.asdict(launch), "us": parts, "rel_err": err}
        log(f"{name:8s} gate/up {parts['gate_up']:6.2f} us  down {parts['down']:6.2f} us  both "
            f"{parts['both']:6.2f} us ({total / (parts['both'] * 1e-6) / 1e9:.0f} GB/s; floor "
            f"{total / bw / 1e3:.2f} us)  err {err:.2g}  {launch}")
    (args.out / "bench_moe.json").write_text(json.dumps(
        {"gpu": common.gpu_name(), "preset": args.preset, "batch": args.batch, "copy_bandwidth_GBs": bw,
         "bytes_per_layer": total, **rows}, indent=1))
    (args.out / "bench_moe.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
