"""Train a small Qwen3.5-MoE on bytes (CPU is enough), so that int4 quality has trained weights.

    python -m tools.train_tiny_moe --out /tmp/trained-moe [--steps 2000]
    python -m tools.quant_quality --checkpoint /tmp/trained-moe --group-size 32 --prompt-ids "$(python -m tools.train_tiny_moe --ids 'def forward(self, ')"

Randomly initialised MoE models of this family route almost uniformly, so an int4 weight error
flips expert choices and the logits measure those flips rather than int4's precision
(docs/int4.md, Quality). A model trained for a few minutes has routers that prefer experts, and
logits that follow the text. Model: the tiny preset widened (hidden 128, 16 experts, top-4,
expert width 64; every int4 K is 64 or 128, so groups of 32 and 64 divide it), byte vocabulary
(256). Corpus: this repository's Python and Markdown files, the last 5 % held out. transformers
trains it (its reference PyTorch paths; fp32), with its router load-balancing loss, AdamW and a
cosine schedule; the checkpoint is written by save_pretrained in bf16 with training.json beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from model.cli_args import positive_int, seed


def model_config():
    """The trained model's ModelConfig: the tiny preset widened, byte vocabulary."""
    from model.config import ModelConfig

    return dataclasses.replace(
        ModelConfig.preset("tiny"), name="trained-tiny-moe", hidden_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=64, shared_expert_intermediate_size=64)


def corpus(patterns) -> bytes:
    files = sorted({f for pat in patterns for f in glob.glob(str(ROOT / pat), recursive=True)})
    if not files:
        raise SystemExit(f"no corpus files match {patterns} under {ROOT}")
    return b"\n".join(Path(f).read_bytes() for f in files)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.train_tiny_moe", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="checkpoint directory to write")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--seq", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--corpus", default="model/**/*.py,tools/*.py,docs/*.md",
                   help="comma-separated globs under the repository root")
    p.add_argument("--ids", default=None, metavar="TEXT",
                   help="only print TEXT's byte ids, comma-separated (a --prompt-ids for the tools), and exit")
    args = p.parse_args(argv)
    if args.ids is None and args.out is None:
        p.error("--out is required (or --ids TEXT)")
    if not (0 < args.lr < 1):
        p.error(f"--lr must be in (0, 1), got {args.lr}")
    if args.seq < 2:
        p.error(f"--seq must be >= 2, got {args.seq}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ids is not None:
        print(",".join(str(b) for b in args.ids.encode()))
        return 0
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    data = corpus(args.corpus.split(","))
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(len(ids) * 0.95)
    train, held = ids[:split], ids[split:]
    if len(held) <= args.seq + 1:
        raise SystemExit(f"corpus too small for --seq {args.seq}: {len(ids)} bytes")
    cfg = model_config()
    hf = cfg.to_hf()
    hf.output_router_logits, hf.router_aux_loss_coef = True, 0.01
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed)

    def batch(src):
        start = torch.randint(0, len(src) - args.seq, (args.batch,), generator=g)
        return torch.stack([src[i:i + args.seq] for i in start.tolist()])

    def held_loss():
        model.eval()
        with torch.no_grad():
            losses = [model(input_ids=(b := batch(held)), labels=b, output_router_logits=False).loss.item()
                      for _ in range(8)]
        model.train()
        return sum(losses) / len(losses)

    curve, t0 = [], time.time()
    first = held_loss()
    bar = tqdm(range(args.steps), desc="train", mininterval=5)
    for step in bar:
        b = batch(train)
        loss = model(input_ids=b, labels=b).loss     # transformers shifts the labels; + router balance
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 100 == 0 or step == args.steps - 1:
            curve.append((step, round(loss.item(), 4)))
            bar.set_postfix(loss=f"{loss.item():.3f}")
    last = held_loss()
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    report = {"config": dataclasses.asdict(cfg), "steps": args.steps, "batch": args.batch, "seq": args.seq,
              "lr": args.lr, "seed": args.seed, "corpus": args.corpus, "corpus_bytes": len(data),
              "corpus_sha256": hashlib.sha256(data).hexdigest(), "held_out_loss_before": round(first, 4),
              "held_out_loss_after": round(last, 4), "train_loss_curve": curve,
              "seconds": round(time.time() - t0, 1)}
    (args.out / "training.json").write_text(json.dumps(report, indent=1))
    print(f"held-out loss {first:.3f} -> {last:.3f} nats per byte; "
          f"{time.time() - t0:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
