"""Routed-expert kernels against the memory-bandwidth floor, and a sweep of their launch configs.

    python -m tools.bench_moe --preset 35b-a3b --batch 1 --sweep --out out/moe
    python -m tools.bench_moe --preset 35b-a3b --batch 1 --quant int4 --group-size 128 --sweep --out out/moe-int4

Builds --copies layers' worth of distinct expert weights (more than L2 holds, like the real step),
routes each with its own random router logits, checks every configuration against the torch
reference first, then times it inside a CUDA graph of one call per copy (graph launches, as in
decode) with CUDA events. Bytes = the distinct chosen experts' gate/up and down rows plus the
shared expert's down rows; floor = bytes over the measured device copy bandwidth. With --sweep the
two kernels' configurations are swept separately and the best pair is timed against the default.

--quant int4 [--group-size 128] times the int4 expert kernels (model/ops/moe/int4.py) instead: each
copy's gate/up, down and shared down weights are quantized on the GPU with RTN (a speed benchmark:
the codes' quality does not matter), every configuration is checked against
moe_experts_int4_reference on the same codes, the swept K tiles (gate/up block_h, down block_i)
hold whole groups, and the bytes count each weight's codes (half a byte) plus a bf16 scale and zero
per group (QuantizedLinear.nbytes).
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

from tools import common

GROUP_SIZES = (32, 64, 128)      # model/quant/format.py's
DEFAULT_GROUP_SIZE = 128
QUANT_CHUNK = 1 << 26            # weights quantized at once (bounds quantize()'s ~30 bytes a weight of temporaries)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_moe.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=common.PRESETS, default="35b-a3b")
    p.add_argument("--batch", type=common.positive_int, default=1)
    p.add_argument("--copies", type=common.positive_int, default=8, help="layers of distinct weights cycled")
    p.add_argument("--reps", type=common.positive_int, default=50, help="timed graph replays per configuration")
    p.add_argument("--sweep", action="store_true", help="sweep both kernels' launch configurations")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop the sweep after this long")
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--quant", choices=("none", "int4"), default="none",
                   help="int4: time the int4 expert kernels over the weights quantized in memory (RTN)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                   help=f"int4 group size (--quant int4; default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--out", type=Path, default=Path("out/moe"))
    args = p.parse_args(argv)
    if not 0 < args.max_seconds < float("inf"):     # nan fails too
        p.error(f"--max-seconds must be > 0, got {args.max_seconds} (a finite number of seconds)")
    if args.quant == "none":
        if args.group_size is not None:
            p.error("--group-size applies to --quant int4")
    else:
        from model.config import ModelConfig

        args.group_size = args.group_size or DEFAULT_GROUP_SIZE
        if bad := int4_misfits(ModelConfig.preset(args.preset), args.group_size):
            p.error(f"--quant int4 --group-size {args.group_size}: the {args.preset} experts' {', '.join(bad)} "
                    f"{'is' if len(bad) == 1 else 'are'} not a multiple of {args.group_size} (int4 groups run "
                    f"along the input dim)")
    return args


def int4_misfits(cfg, group_size: int) -> list:
    """The experts' input dims (gate/up H, down I, shared down Is) that are not whole groups."""
    dims = {"hidden_size": cfg.hidden_size, "moe_intermediate_size": cfg.moe_intermediate_size,
            "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}
    return [f"{name}={v}" for name, v in dims.items() if v % group_size]


def expert_bytes(distinct, h: int, i: int, i_s: int, group_size: int | None = None, elem: int = 2) -> tuple:
    """(gate/up, down + shared down) bytes one layer reads: the gate/up [2I, H] and down [H, I] rows
    of `distinct` experts, and the shared expert's down [H, Is]. bf16 (group_size None): `elem`
    bytes a weight; int4: the codes (half a byte a weight) plus a scale and a zero of `elem` bytes
    per row and group of `group_size` inputs (what QuantizedLinear.nbytes counts)."""
    def matrix(n, k):
        return n * k * elem if group_size is None else n * k // 2 + 2 * n * (k // group_size) * elem

    return distinct * matrix(2 * i, h), distinct * matrix(h, i) + matrix(h, i_s)


def holds_groups(block: int, group_size: int | None) -> bool:
    """Whether a K tile of `block` columns suits the int4 kernels: a power of two of whole groups."""
    return group_size is None or (block >= group_size and block % group_size == 0 and not block & (block - 1))


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

    def __init__(self, cfg, batch: int, copies: int, seed: int, torch, device="cuda", group_size: int | None = None):
        from model.ops import moe
        from model.quant.build import quantize_chunked

        self.torch, self.moe, self.group_size = torch, moe, group_size
        if group_size is None:
            self.experts, reference = moe.moe_experts_triton, moe.moe_experts_reference
            self.gate_up, self.down = moe.launch_moe_gate_up, moe.launch_moe_down
        else:
            from model.ops.moe import int4

            self.experts, reference = int4.moe_experts_int4_triton, int4.moe_experts_int4_reference
            self.gate_up, self.down = int4.launch_moe_gate_up_int4, int4.launch_moe_down_int4
        g = torch.Generator(device=device).manual_seed(seed)
        dt, dev = torch.bfloat16, device
        E, H, I, Is, k = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                          cfg.shared_expert_intermediate_size, cfg.num_experts_per_tok)
        self.shape = dict(b=batch, h=H, i=I, k=k, i_s=Is)

        def randn(*shape, scale=0.02):
            return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dt)

        def weight(name, *shape):
            w = randn(*shape)
            return w if group_size is None else quantize_chunked(w, group_size, "rtn", name=name,
                                                                 chunk_elems=QUANT_CHUNK)

        self.layers = []
        for _ in range(copies):
            ids = torch.empty(batch, k, dtype=torch.int32, device=dev)
            wts = torch.empty(batch, k, dtype=dt, device=dev)
            moe.router_topk_reference(randn(batch, E, scale=1.0), k, wts, ids)
            self.layers.append(dict(
                x=randn(batch, H, scale=1.0), gate_up_proj=weight("gate_up_proj", E, 2 * I, H),
                down_proj=weight("down_proj", E, H, I), ids=ids, weights=wts,
                shared_gate_up=randn(batch, 2 * Is, scale=1.0), shared_down=weight("shared_down", H, Is),
                shared_gate_logit=randn(batch, 1, scale=1.0), act_ws=moe.moe_workspace(batch, k, I, dt, dev),
                out=torch.empty(batch, H, dtype=dt, device=dev)))
        from model.ops.hardware import profile_for

        self.sm_count = profile_for(self.layers[0]["out"]).sm_count   # the whole-row kernels' programs
        distinct = statistics.mean(len(set(L["ids"].flatten().tolist())) for L in self.layers)
        self.gate_up_bytes, self.down_bytes = expert_bytes(distinct, H, I, Is, group_size)
        ref = dict(self.layers[0])
        ref["out"] = torch.empty_like(ref["out"])
        ref["act_ws"] = torch.empty_like(ref["act_ws"])
        reference(**ref)
        self.reference = ref["out"].float()

    def default_launch(self):
        """The kernels' own configuration for these shapes (int4: with K tiles of whole groups)."""
        if self.group_size is None:
            return self.moe.moe_launch_config(**self.shape)
        from model.ops.moe.int4 import moe_int4_launch_config

        return moe_int4_launch_config(**self.shape, group_size=self.group_size)

    def check(self, launch) -> float:
        """Run layer 0 with `launch` (compiling it outside any capture); max error relative to the
        reference's largest magnitude. Raises AssertionError past 2%."""
        L = self.layers[0]
        self.experts(**L, launch=launch)
        err = ((L["out"].float() - self.reference).abs().max() / self.reference.abs().max()).item()
        assert err <= 0.02, f"{launch}: relative error {err:.3g} against the reference"
        return err

    def time_us(self, part: str, launch, reps: int) -> float:
        """Median device time per layer of a graph holding one `part` call per copy."""
        def step():
            for L in self.layers:
                if part in ("gate_up", "both"):
                    self.gate_up(L["x"], L["gate_up_proj"], L["ids"], L["act_ws"], launch)
                if part in ("down", "both"):
                    self.down(L["act_ws"], L["down_proj"], L["ids"], L["weights"], L["shared_gate_up"],
                              L["shared_down"], L["shared_gate_logit"], L["out"], launch)

        return common.time_graph_us(step, reps, len(self.layers))


def sweep_grids(shape: dict, group_size: int | None = None, sm_count: int = 132) -> dict:
    """{part: [MoeLaunch fields]} swept per kernel; int4 keeps the K tiles that hold whole groups,
    and at batch 1 adds the whole-row kernels (model/ops/moe/int4_rows.py: rows per block, warps,
    programs per SM), the per-block entries then pinned to the per-block kernels."""
    g = group_size
    grids = {"gate_up": [dict(gate_up_block_i=a, gate_up_block_h=b, gate_up_warps=w, gate_up_stages=s)
                         for a, b, w, s in gate_up_grid(shape["h"], shape["i"]) if holds_groups(b, g)],
             "down": [dict(down_block_ho=a, down_block_i=b, down_warps=w, down_stages=s)
                      for a, b, w, s in down_grid(shape["h"], shape["i"], shape["k"]) if holds_groups(b, g)]}
    if g is None or shape["b"] != 1:
        return grids
    from model.ops._util import next_pow2

    for part in grids:
        for fields in grids[part]:
            fields[f"{part}_programs"] = 0
    whole = {"gate_up": ("gate_up_block_i", "gate_up_block_h", max(g, next_pow2(shape["h"]))),
             "down": ("down_block_ho", "down_block_i", max(g, next_pow2(max(shape["i"], shape["i_s"]))))}
    for part, (rows_field, k_field, k_tile) in whole.items():   # first: the sweep may stop at --max-seconds
        grids[part][:0] = [{rows_field: r, k_field: k_tile, f"{part}_warps": w, f"{part}_stages": 1, f"{part}_tc": False,
                         f"{part}_programs": p * sm_count}
                        for r, w, p in itertools.product((1, 2, 4), (4, 8), (2, 4, 8))]
    return grids


def sweep(bench, base, reps, deadline, log) -> tuple:
    """Best gate/up and down configurations (each swept with the other kernel's default)."""
    results = {"gate_up": [], "down": []}
    grids = sweep_grids(bench.shape, bench.group_size, bench.sm_count)
    for n, (part, grid) in enumerate(grids.items()):
        nbytes = bench.gate_up_bytes if part == "gate_up" else bench.down_bytes
        part_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(grids) - n)   # a share for each
        for fields in grid:
            if time.monotonic() > part_deadline:
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

    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.preset(args.preset)
    E, H, I, Is = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    g = args.group_size
    per_copy = sum(expert_bytes(E, H, I, Is, g)) + args.batch * (3 * cfg.num_experts_per_tok + 2 * H + 2 * Is + 1) * 2
    # the largest transient, per gate/up weight: its fp32 init (int4: the reference's dequantize, ~16 bytes)
    temps = E * 2 * I * H * (4 if g is None else 16)
    common.check_memory({"expert weight copies": args.copies * per_copy, "init temporaries": temps},
                        f"{args.copies} copies of the {args.preset} experts", "try fewer --copies")
    t0 = time.monotonic()
    bench = Bench(cfg, args.batch, args.copies, args.seed, torch, group_size=g)
    torch.cuda.synchronize()
    build_s = time.monotonic() - t0
    bw = common.copy_bandwidth_gbs()
    base = bench.default_launch()
    fmt = "bf16" if g is None else f"int4 g{g}"
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    total = bench.gate_up_bytes + bench.down_bytes
    log(f"{common.gpu_name()}: {args.preset} experts {fmt}, batch {args.batch}, {args.copies} weight copies "
        f"(built{'' if g is None else ' and quantized (RTN)'} in {build_s:.1f} s); "
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
        {"gpu": common.gpu_name(), "preset": args.preset, "batch": args.batch, "quant": args.quant,
         "group_size": g, "copy_bandwidth_GBs": bw,
         "bytes_per_layer": total, **rows}, indent=1))
    (args.out / "bench_moe.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
