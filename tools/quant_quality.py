"""int4 quality report: per-tensor relative reconstruction error (RTN vs HQQ) and the int4 model's
logits against the bf16 model's (relative error, KL, top-1 / top-5 agreement), teacher-forced over
--steps decode steps. Runs on the reference backend (CPU or GPU).

    python -m tools.quant_quality --preset tiny --steps 256 --group-size 32
    python -m tools.quant_quality --checkpoint DIR --steps 256 [--json out.json]

--preset tiny is widened to expert widths of 32 (its 16 and 24 do not group); preset linears are
and embedding redrawn from N(0, --init-std^2) (default 0.02, transformers' init; 0 keeps random_weights' init,
the chaotic regime).

--noise REL[,REL...] also compares the bf16 model with every int4 field multiplied by (1 + REL * N(0, 1))
(no quantization): how far a weight error of relative size REL moves this model's logits, the scale
against which the int4 figures are read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from model.cli_args import PRESETS, positive_int, seed


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tools.quant_quality", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, default=None, help="random weights (default tiny)")
    src.add_argument("--checkpoint", help="bf16 safetensors checkpoint directory")
    p.add_argument("--layers", type=positive_int, default=None, help="keep only the first N layers")
    p.add_argument("--steps", type=positive_int, default=256)
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128)
    p.add_argument("--lm-head", choices=("bf16", "int4"), default="bf16")
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--prompt-ids", default="1,2,3,4")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                   help="dtype the logits are computed in (weights are quantized from bf16 either way)")
    p.add_argument("--noise", default=None, metavar="REL[,REL...]",
                   help="also compare the bf16 model with its int4 fields times (1 + REL*N(0,1)) (sensitivity reference)")
    p.add_argument("--json", default=None, help="also write the report here")
    return p


def compare(ref, dq, prompt, steps) -> dict:
    """logit_metrics of dq against ref over `steps` teacher-forced steps, with the median and 90th
    percentile of the per-step relative error (a routing flip shows as a jump in a few steps)."""
    from model.quant.quality import logit_metrics, teacher_forced_logits
    import torch

    a, b = teacher_forced_logits(ref, dq, prompt, steps)
    m = logit_metrics(b, a)
    per = (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-30)
    m["rel_err_median"] = float(per.median())
    m["rel_err_p90"] = float(torch.quantile(per, 0.9))
    return m


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.quant import dequantize_weights, map_weights, quantize_weights
    from model.quant.layout import is_int4_field
    from model.quant.quality import tensor_errors, with_init_std

    try:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    except ValueError:
        print(f"error: --prompt-ids wants comma-separated integers, got {args.prompt_ids!r}", file=sys.stderr)
        return 2
    try:
        noise = [float(x) for x in args.noise.split(",")] if args.noise else []
        if any(not x > 0 for x in noise):
            raise ValueError
    except ValueError:
        print(f"error: --noise wants comma-separated positive numbers, got {args.noise!r}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    try:
        if args.checkpoint:
            from model.checkpoint import load_checkpoint

            cfg, w = load_checkpoint(args.checkpoint, device=device, dtype=torch.bfloat16)
            source = f"checkpoint {args.checkpoint}"
        else:
            from model.weights import random_weights

            cfg = ModelConfig.preset(args.preset or "tiny")
            if cfg.name == "tiny":
                cfg = dataclasses.replace(cfg, moe_intermediate_size=32, shared_expert_intermediate_size=32)
            if args.layers:
                cfg = dataclasses.replace(cfg, num_layers=min(args.layers, cfg.num_layers))
            w = random_weights(cfg, device, torch.bfloat16, seed=args.seed)
            if args.init_std > 0:
                w = with_init_std(w, args.init_std, args.seed)
            source = f"preset {cfg.name} ({cfg.num_layers} layers), embedding and linears N(0, {args.init_std}^2)"
        if args.layers and args.checkpoint:
            w = w.first_layers(min(args.layers, cfg.num_layers))
            cfg = w.cfg
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        rows = tensor_errors(w, args.group_size, args.lm_head)
        report = {"source": source, "group_size": args.group_size, "lm_head": args.lm_head, "steps": args.steps,
                  "device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "tensors": rows}
        ref_w = map_weights(w, lambda n, t: t.to(dtype))
        max_seq = len(prompt) + args.steps + 1
        ref = Decoder(cfg, ref_w, max_batch=1, max_seq=max_seq, backend="reference")
        for method in ("rtn", "hqq"):
            wq = dequantize_weights(quantize_weights(w, args.group_size, method, lm_head=args.lm_head), dtype)
            ref.reset()
            dq = Decoder(cfg, wq, max_batch=1, max_seq=max_seq, backend="reference")
            report[f"logits_{method}"] = compare(ref, dq, prompt, args.steps)
            del dq, wq
        for rel in noise:
            g = torch.Generator(device=device).manual_seed(args.seed)
            wn = map_weights(w, lambda n, t: (t.float() * (1 + rel * torch.randn(t.shape, generator=g, device=t.device))
                                              ).to(dtype)
                             if is_int4_field(n, args.lm_head) else t.to(dtype))
            ref.reset()
            dn = Decoder(cfg, wn, max_batch=1, max_seq=max_seq, backend="reference")
            report[f"logits_noise_{rel:g}"] = compare(ref, dn, prompt, args.steps)
            del dn, wn
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"int4 quality, {source}, group {args.group_size}, lm_head {args.lm_head}, {report['device']}")
    print(f"{'tensor':40s} {'shape':>18s} {'RTN':>8s} {'HQQ':>8s}")
    for r in rows:
        print(f"{r['name']:40s} {str(r['shape']):>18s} {r['rtn']:8.4f} {r['hqq']:8.4f}")
    for m, label in [("rtn", "RTN"), ("hqq", "HQQ")] + [(f"noise_{r:g}", f"noise {r:g}") for r in noise]:
        x = report[f"logits_{m}"]
        print(f"logits {label} vs bf16 over {args.steps} teacher-forced steps: rel err {x['rel_err']:.4f} "
              f"(median {x['rel_err_median']:.4f}, p90 {x['rel_err_p90']:.4f}), "
              f"KL {x['kl']:.2e}, top-1 {100 * x['top1']:.1f} %, top-5 overlap {100 * x['top5']:.1f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
