"""The demo: decode with the tiny Qwen3.5-MoE preset through a CUDA graph captured by cugraph_rt,
check it against eager decoding, and show what the captured step is made of.

    python -m model.demo [--preset tiny] [--max-new-tokens 32]

With no GPU it says so and runs the same decode on the CPU with the torch reference path.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "35b-a3b", "122b-a10b"))
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")

    import torch

    import cugraph_rt
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.generation import Generator, SamplingParams
    from model.weights import random_weights

    cfg = ModelConfig.preset(args.preset)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    max_seq = len(prompt) + args.max_new_tokens
    if not cugraph_rt.is_available() or not torch.cuda.is_available():
        why = "no usable CUDA driver/GPU"
        try:
            cugraph_rt.device_info()
        except cugraph_rt.CudaUnavailableError as e:
            why = str(e)
        print(f"CUDA graphs need an NVIDIA GPU with its driver, and this machine has none ({why}).\n"
              f"Running instead: the {args.preset} preset decoded eagerly on the CPU with the torch "
              "reference kernels (the same math the Triton kernels are tested against).")
        weights = random_weights(cfg, device="cpu", dtype=torch.float32, seed=0)
        dec = Decoder(cfg, weights, max_batch=1, max_seq=max_seq, backend="reference")
        t = time.perf_counter()
        res = Generator(dec, SamplingParams(), use_graph=False).generate([prompt], args.max_new_tokens)
        dt = time.perf_counter() - t
        print(f"prompt {prompt}\ngenerated {res.tokens[0]}\n{res.decode_tokens} tokens in {dt:.2f} s on the CPU")
        return 0

    weights = random_weights(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    dec = Decoder(cfg, weights, max_batch=1, max_seq=max_seq, backend="triton")
    print(f"{torch.cuda.get_device_name()}: {args.preset} preset, {cfg.num_layers} layers, bf16")
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
    print("more: python tools/capture_trace.py --out out/trace ; python tools/bench_decode.py")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
