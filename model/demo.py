"""The demo: decode with the tiny Qwen3.5-MoE preset through a CUDA graph captured by cugraph_rt,
check it against eager decoding, and show what the captured step is made of.

    python -m model.demo [--preset tiny] [--layers N] [--max-new-tokens 32]
    python -m model.demo --preset 35b-a3b --quant int4 [--group-size 128] [--lm-head bf16|int4]

The weights are random, so the tokens mean nothing: it shows the machinery. With no GPU it says
why once and runs the same decode on the CPU with the torch reference path. A preset too large for
the free memory is refused before anything is allocated.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time

from model.cli_args import PRESETS, add_quant_args, positive_int


def _no_gpu_reason(cugraph_rt, torch) -> str | None:
    """Why CUDA graphs cannot run here (one sentence), or None when they can."""
    if not cugraph_rt.is_available():
        try:
            cugraph_rt.device_info()
        except cugraph_rt.CudaUnavailableError as e:
            return str(e)
        return "no usable CUDA driver or GPU"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (a CUDA build of torch is needed)"
    if not torch.cuda.is_available():
        return "torch sees no usable CUDA device"
    return None


def _check_memory(p, cfg, max_seq, device, dtype_bytes, backend, quant=None):
    from model.memory_plan import (NotEnoughMemoryError, check_fits, decode_memory, free_memory,
                                   max_layers_that_fit)

    plan = dict(batch=1, max_seq=max_seq, dtype_bytes=dtype_bytes, backend=backend, quant=quant)
    free = free_memory(device)
    n = max_layers_that_fit(cfg, free[0], **plan)
    hints = ([f"--layers {n} (the first {n} of {cfg.num_layers} layers fit)"] if 0 < n < cfg.num_layers else []) \
        + (["--preset tiny"] if cfg.name != "tiny" else [])
    try:
        check_fits(decode_memory(cfg, **plan), device, what=f"the {cfg.name} preset ({cfg.num_layers} layers)",
                   free=free, suggestion=("try " + ", or ".join(hints)) if hints else "")
    except NotEnoughMemoryError as e:
        p.error(f"not enough memory: {e}; nothing was allocated")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--layers", type=positive_int, default=None, help="keep only the first N layers (memory)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    add_quant_args(p)   # --quant int4: the int4 kernels (model/quant/cli.py); the tiny preset cannot be int4
    args = p.parse_args(argv)

    import torch

    import cugraph_rt
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.generation import Generator, SamplingParams

    cfg = ModelConfig.preset(args.preset)
    if args.layers is not None:
        if args.layers > cfg.num_layers:
            p.error(f"--layers {args.layers}: the {args.preset} preset has {cfg.num_layers} layers")
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    max_seq = len(prompt) + args.max_new_tokens
    if max_seq - 1 > cfg.max_position_embeddings:
        p.error(f"--max-new-tokens {args.max_new_tokens}: with the {len(prompt)}-token prompt it needs "
                f"{max_seq - 1} positions, beyond the model's max_position_embeddings={cfg.max_position_embeddings}")
    why = _no_gpu_reason(cugraph_rt, torch)
    from model.quant.cli import build_weights, plan_quant

    dtype = torch.float32 if why else torch.bfloat16
    try:
        quant = plan_quant(args, cfg, dtype)
    except ValueError as e:
        p.error(f"--quant {args.quant}: {e}" if args.quant != "none" else str(e))
    _check_memory(p, cfg, max_seq, "cpu" if why else "cuda", 4 if why else 2, "reference" if why else "triton",
                  quant.memory_spec)
    print(f"The {args.preset} preset with random weights (seed 0): the tokens it generates mean nothing; "
          "the demo shows the decode machinery, not a trained model.")
    if why is not None:
        print(f"No CUDA graphs here: {why}.\n"
              f"Running instead: the same decode, eagerly on the CPU with the torch reference kernels "
              "(the math the Triton kernels are tested against).")
        _, weights = build_weights(quant, cfg, "cpu", torch.float32, seed=0)
        dec = Decoder(cfg, weights, max_batch=1, max_seq=max_seq, backend="reference")
        t = time.perf_counter()
        res = Generator(dec, SamplingParams(), use_graph=False).generate([prompt], args.max_new_tokens)
        dt = time.perf_counter() - t
        print(f"prompt {prompt}\ngenerated {res.tokens[0]}\n{res.decode_tokens} tokens in {dt:.2f} s on the CPU")
        return 0

    _, weights = build_weights(quant, cfg, "cuda", torch.bfloat16, seed=0)
    dec = Decoder(cfg, weights, max_batch=1, max_seq=max_seq, backend="triton")
    print(f"{torch.cuda.get_device_name()}: {args.preset} preset, {cfg.num_layers} layers, {quant.describe()}")
    eager = Generator(dec, SamplingParams(), use_graph=False).generate([prompt], args.max_new_tokens)
    with Generator(dec, SamplingParams(), use_graph=True) as gen:
        graph = gen.generate([prompt], args.max_new_tokens)
        nodes = gen.handle.graph.nodes()
        stats = gen.handle.stats
    same = eager.tokens == graph.tokens
    print(f"prompt    {prompt}\ngenerated {graph.tokens[0]}")
    print(f"graph tokens == eager tokens: {same}")
    print(f"eager decode {eager.decode_tok_s:8.1f} tok/s\ngraph decode {graph.decode_tok_s:8.1f} tok/s "
          f"({graph.decode_tok_s / eager.decode_tok_s:.1f}x)")
    kinds = collections.Counter(n.type for n in nodes)
    print(f"captured step: {len(nodes)} nodes {dict(kinds)}; capture {stats.capture_s * 1e3:.1f} ms, "
          f"instantiate {stats.instantiate_s * 1e3:.1f} ms, {stats.replays} replays")
    print("more: python -m tools.capture_trace --out out/trace ; python -m tools.bench_decode")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
