"""The decode step's GEMV shapes against the memory-bandwidth floor, and a sweep of their configs.

    python -m tools.bench_gemv --preset 35b-a3b --sweep --out out/gemv
    python -m tools.bench_gemv --preset 35b-a3b --quant int4 [--group-size 128] --sweep

With --quant int4 each shape's weights are quantized (RTN; the speed does not depend on the method)
and the int4 GEMV (model/ops/linear/int4.py) is checked against its reference (dequantize, then
the bf16 GEMV) and timed; the floor counts the codes, scales and zeros.

One entry per projection the decoder runs at batch 1 (GDN in/out, attention qkv/o, the fused
router + shared-expert rows, lm_head). Each is checked against torch's linear first, then timed in
a CUDA graph of one call per weight copy (enough distinct copies that L2 cannot hold them, as in
the real step) with CUDA events. Floor = the weight bytes over the measured device copy bandwidth.
With --sweep the CUDA-core kernel's (block_n, block_k, warps, stages) are swept per shape (all
but lm_head, which runs once per step and already streams at the copy bandwidth).
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

L2_BYTES = 50 << 20   # H100's L2; copies are added until they hold 4x this
NORM_FUSED = ("gdn in_proj", "attn qkv", "router+shared")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_gemv.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=common.PRESETS, default="35b-a3b")
    p.add_argument("--reps", type=common.positive_int, default=50)
    p.add_argument("--sweep", action="store_true", help="sweep the launch configuration per shape")
    p.add_argument("--norm", action="store_true",
                   help="the projections that take a fused RMSNorm prologue (norm_gemv) instead")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop the sweep after this long")
    p.add_argument("--quant", choices=("none", "int4"), default="none", help="int4: the int4 GEMV kernels")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128, help="int4 group size")
    p.add_argument("--out", type=Path, default=Path("out/gemv"))
    args = p.parse_args(argv)
    if not 0 < args.max_seconds < float("inf"):     # nan fails too
        p.error(f"--max-seconds must be > 0, got {args.max_seconds} (a finite number of seconds)")
    return args


def decode_shapes(cfg) -> list[tuple[str, int, int, int]]:
    """(name, N, K, calls per step) of every GEMV in one decode step."""
    gdn = sum(1 for t in cfg.layer_types if t != "full_attention")
    attn = cfg.num_layers - gdn
    shapes = [("gdn in_proj", cfg.gdn_in_proj_rows, cfg.hidden_size, gdn),
              ("gdn out_proj", cfg.hidden_size, cfg.linear_value_dim, gdn),
              ("attn qkv", cfg.attn_qkv_rows, cfg.hidden_size, attn),
              ("attn o_proj", cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, attn),
              ("router+shared", cfg.router_shared_rows, cfg.hidden_size, cfg.num_layers),
              ("lm_head", cfg.vocab_size, cfg.hidden_size, 1)]
    return [s for s in shapes if s[3] > 0]


def config_grid(k: int):
    """Candidate (block_n, block_k, warps, stages) of the CUDA-core GEMV at batch 1."""
    from model.ops._util import next_pow2

    for bn, bk, w, s in itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048, 4096), (4, 8), (1, 3)):
        if bk <= next_pow2(k) and 1024 <= bn * bk <= 4096 * w:
            yield bn, bk, w, s


def int4_config_grid(k: int, group_size: int, sm_count: int):
    """Candidates of the int4 CUDA-core GEMV at batch 1 on a GPU of sm_count SMs: its accumulator is
    one fp32 per word, so programs hold up to 16x the bf16 kernel's weights; K tiles hold whole groups."""
    from model.ops._util import next_pow2

    for bn, bk, w, s in itertools.product((2, 4, 8, 16, 32, 64), (256, 512, 1024, 2048), (4, 8), (1, 3)):
        if group_size <= bk <= next_pow2(k) and 4096 <= bn * bk <= 16384 * w:
            yield bn, bk, w, s, 0
    # the whole-row kernel: blocks of bn rows over a fixed number of programs (per SM)
    if k <= 4096:
        for bn, w, per_sm in itertools.product((1, 2, 4, 8), (4, 8), (2, 4, 8, 16)):
            if 1024 <= bn * next_pow2(k) <= 4096 * w:
                yield bn, next_pow2(k), w, 1, per_sm * sm_count


class Shape:
    """Weight copies of one GEMV shape, its input and outputs. With norm, the GEMV with the
    residual add + RMSNorm in its prologue (norm_gemv, writing the new residual and normed rows)."""

    def __init__(self, n: int, k: int, torch, device="cuda", seed=0, norm=False, group_size=None):
        from model.ops import linear

        self.torch, self.linear, self.n, self.k, self.norm = torch, linear, n, k, norm
        self.int4 = group_size is not None
        # int4: codes plus a bf16 scale and zero per group
        self.nbytes = n * k // 2 + 4 * n * (k // group_size) if self.int4 else n * k * 2
        copies = max(1, min(16, -(-4 * L2_BYTES // self.nbytes)))
        g = torch.Generator(device=device).manual_seed(seed)
        bf16 = torch.bfloat16
        self.weights = [(torch.randn(n, k, generator=g, device=device) * 0.02).to(bf16) for _ in range(copies)]
        if self.int4:
            from model.quant.quantizers import quantize
            from model.ops.linear import int4

            self.int4_ops = int4
            self.weights = [quantize(w, group_size, "rtn") for w in self.weights]
            assert self.weights[0].nbytes() == self.nbytes, "int4 byte count"
        ref_w = self.weights[0].dequantize(bf16) if self.int4 else self.weights[0]
        self.x = torch.randn(1, k, generator=g, device=device).to(bf16)
        self.outs = [torch.empty(1, n, dtype=bf16, device=device) for _ in range(copies)]
        if norm:
            self.residual = (torch.randn(1, k, generator=g, device=device) * 3).to(bf16)
            self.norm_weight = (torch.randn(k, generator=g, device=device) * 0.2).to(bf16)
            self.residual_out = torch.empty(1, k, dtype=bf16, device=device)
            self.normed_out = torch.empty(1, k, dtype=bf16, device=device)
            ref = torch.empty(1, n, dtype=bf16, device=device)
            linear.norm_gemv_reference(self.x, self.residual, self.norm_weight, 1e-6, ref_w, ref)
            self.reference = ref.float()
        else:
            self.reference = torch.nn.functional.linear(self.x, ref_w).float()

    def default_launch(self):
        if self.int4:
            return self.int4_ops.gemv_int4_config(1, self.n, self.k, self.weights[0].group_size, norm=self.norm)
        return self.linear.gemv_config(1, self.n, self.k, 2, norm=self.norm)

    def launch(self, bn, bk, w, s, programs=0):
        if self.int4:
            return self.int4_ops.GemvInt4Launch(1, bn, bk, w, s, programs)
        return self.linear.GemvLaunch(1, bn, bk, w, s)

    def grid(self):
        if self.int4:
            from model.ops.hardware import current_profile

            return int4_config_grid(self.k, self.weights[0].group_size, current_profile().sm_count)
        return config_grid(self.k)

    def _call(self, w, out, launch) -> None:
        if self.int4 and self.norm:
            self.int4_ops.norm_gemv_int4_triton(self.x, self.residual, self.norm_weight, 1e-6, w, out,
                                                residual_out=self.residual_out, normed_out=self.normed_out,
                                                launch=launch)
        elif self.int4:
            self.int4_ops.gemv_int4_triton(self.x, w, out, launch=launch)
        elif self.norm:
            self.linear.norm_gemv_triton(self.x, self.residual, self.norm_weight, 1e-6, w, out,
                                         residual_out=self.residual_out, normed_out=self.normed_out, launch=launch)
        else:
            self.linear.gemv_triton(self.x, w, out, launch=launch)

    def check(self, launch) -> float:
        """Max error of copy 0 relative to the reference's largest magnitude; AssertionError past 1%."""
        self._call(self.weights[0], self.outs[0], launch)
        err = ((self.outs[0].float() - self.reference).abs().max() / self.reference.abs().max()).item()
        assert err <= 0.01, f"{launch}: relative error {err:.3g} against the reference"
        return err

    def time_us(self, launch, reps: int) -> float:
        def step():
            for w, o in zip(self.weights, self.outs):
                self._call(w, o, launch)

        return common.time_graph_us(step, reps, len(self.weights))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.require_gpu("bench_gemv")
    from model.config import ModelConfig
    from model.ops import linear

    deadline = time.monotonic() + args.max_seconds
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.preset(args.preset)
    bw = common.copy_bandwidth_gbs()
    lines, rows = [], []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    weights = f"int4 g{args.group_size}" if args.quant == "int4" else "bf16"
    log(f"{common.gpu_name()}: {args.preset} {'norm_gemv' if args.norm else 'GEMV'}s at batch 1, {weights} weights; "
        f"copy bandwidth {bw:.0f} GB/s")
    log(f"{'shape':14s} {'N':>7s} {'K':>5s} {'calls':>5s} {'MB':>7s} {'floor us':>8s} {'default us':>10s} "
        f"{'best us':>8s} {'best GB/s':>9s}  best configuration")
    shapes = decode_shapes(cfg)
    if args.norm:   # the decoder fuses the norms into these (the lm_head keeps its own norm kernel)
        shapes = [sh for sh in shapes if sh[0] in NORM_FUSED]
    for name, n, k, calls in shapes:
        shape = Shape(n, k, torch, norm=args.norm, group_size=args.group_size if args.quant == "int4" else None)
        base = shape.default_launch()
        shape.check(base)
        default_us = shape.time_us(base, args.reps)
        tried = [{**dataclasses.asdict(base), "us": default_us}]
        for params in (shape.grid() if args.sweep and calls > 1 else ()):   # lm_head: 1 call
            if time.monotonic() > deadline:
                log("sweep stopped at --max-seconds")
                break
            launch = shape.launch(*params)
            if launch == base:
                continue
            try:
                shape.check(launch)
            except Exception as e:   # a configuration the compiler refuses (e.g. out of resources)
                log(f"{name} {launch}: skipped ({type(e).__name__}: {str(e)[:100]})")
                continue
            tried.append({**dataclasses.asdict(launch), "us": shape.time_us(launch, args.reps)})
        tried.sort(key=lambda r: r["us"])
        best = tried[0]
        floor_us = shape.nbytes / (bw * 1e3)
        rows.append({"shape": name, "N": n, "K": k, "calls": calls, "bytes": shape.nbytes, "floor_us": floor_us,
                     "default_us": default_us, "default": dataclasses.asdict(base), "tried": tried})
        conf = " ".join(f"{key}={best[key]}" for key in ("block_n", "block_k", "warps", "stages", "programs")
                        if key in best)
        log(f"{name:14s} {n:7d} {k:5d} {calls:5d} {shape.nbytes / 1e6:7.1f} {floor_us:8.2f} {default_us:10.2f} "
            f"{best['us']:8.2f} {shape.nbytes / (best['us'] * 1e3):9.0f}  {conf}")
        del shape
        torch.cuda.empty_cache()
    step_default = sum(r["default_us"] * r["calls"] for r in rows)
    step_best = sum(r["tried"][0]["us"] * r["calls"] for r in rows)
    step_floor = sum(r["floor_us"] * r["calls"] for r in rows)
    log(f"per decode step: default {step_default:.0f} us, best {step_best:.0f} us, floor {step_floor:.0f} us")
    (args.out / "bench_gemv.json").write_text(json.dumps(
        {"gpu": common.gpu_name(), "preset": args.preset, "quant": args.quant, "group_size": args.group_size,
         "copy_bandwidth_GBs": bw, "shapes": rows}, indent=1))
    (args.out / "bench_gemv.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
