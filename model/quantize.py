"""Command line: quantize a bf16 Hugging Face checkpoint of Qwen3.5-MoE to int4 (docs/int4.md).

    python -m model.quantize --checkpoint IN --out OUT [--method hqq|rtn] [--group-size 128]
                             [--lm-head bf16|int4] [--scale-dtype model|bf16|fp16] [--device cuda]

Every linear layer becomes group-wise int4 (codes, scales, zeros); embeddings, norms and the small
GDN tensors stay in the model dtype; lm_head stays unless --lm-head int4. The input is checked
whole before anything is written; a bad input, or an existing non-empty OUT, ends with a message
and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from model.quant.format import DEFAULT_GROUP_SIZE, GROUP_SIZES

_SCALE_DTYPES = {"model": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="input: a bf16 safetensors checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--method", choices=("hqq", "rtn"), default="hqq",
                   help="hqq: optimised zeros (default); rtn: min/max round to nearest")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                   help="input columns per scale/zero (default %(default)s)")
    p.add_argument("--lm-head", choices=("bf16", "int4"), default="bf16",
                   help="bf16: keep lm_head in the model dtype (default); int4: quantize it too")
    p.add_argument("--scale-dtype", choices=tuple(_SCALE_DTYPES), default="model",
                   help="dtype of scales and zeros (default: the model dtype)")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda when available, else cpu)")
    p.add_argument("--shard-gb", type=float, default=4.0, help="output shard size in GB (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.shard_gb > 0:
        print("error: --shard-gb must be > 0", file=sys.stderr)
        return 2
    import torch

    from model.checkpoint import CheckpointError
    from model.config_checks import ConfigError
    from model.quant.writer import quantize_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        qcfg = quantize_checkpoint(args.checkpoint, args.out, method=args.method, group_size=args.group_size,
                                   lm_head=args.lm_head, scale_dtype=_SCALE_DTYPES[args.scale_dtype],
                                   device=device, shard_bytes=int(args.shard_gb * 2 ** 30),
                                   progress=not args.quiet)
    except (CheckpointError, ConfigError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {args.out}: {qcfg.to_dict()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
