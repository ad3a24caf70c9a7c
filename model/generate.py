"""Command line: generate text or token ids with the Qwen3.5-MoE decoder.

    python -m model.generate --preset tiny --prompt-ids 1,2,3 --max-new-tokens 32
    python -m model.generate --checkpoint DIR --prompt "Hello" --temperature 0.7 --top-p 0.9

Decoding runs through a CUDA graph (cugraph_rt) unless --no-graph; with no GPU it runs the torch
reference path on the CPU and says so. Ends with prefill and decode tokens per second.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.cli_args import PRESETS, positive_int
from model.config import ModelConfig



def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids wants comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, default=None,
                     help="random weights at these shapes (default: tiny, unless --checkpoint)")
    src.add_argument("--checkpoint", type=Path, help="Hugging Face safetensors checkpoint directory")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    prompt.add_argument("--prompt-ids", type=_prompt_ids, help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")  # < 0: SamplingParams names it
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and random-weight seed)")
    p.add_argument("--batch", type=positive_int, default=1, help="rows decoded together (same prompt)")
    p.add_argument("--max-seq", type=positive_int, default=None, help="KV cache capacity (default: fits)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying a graph")
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="prompt tokens per prefill step (default 2048; longer prompts run as several chunks)")
    return p


def _tokenizer(checkpoint: Path | None):
    if checkpoint is None or not (checkpoint / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from model.generation import SamplingParams

    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        parser.error(str(e))
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint}: no such directory")
    tokenizer = _tokenizer(args.checkpoint)
    if args.prompt is not None and tokenizer is None:
        parser.error("--prompt needs a tokenizer.json in --checkpoint; use --prompt-ids instead")

    import torch
    from tqdm import tqdm

    from model.decoder import Decoder

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print("note: no CUDA GPU found; CUDA graphs need an NVIDIA GPU. Running the torch reference "
              "path on the CPU, eagerly.", file=sys.stderr)
    device = "cuda" if on_gpu else "cpu"
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32
    if args.checkpoint is not None:
        from model.checkpoint import load_checkpoint

        try:
            cfg, weights = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
        except (ValueError, OSError) as e:   # CheckpointError, ConfigError, missing files
            parser.error(f"--checkpoint {args.checkpoint}: {e}")
    else:
        from model.weights import random_weights

        cfg = ModelConfig.preset(args.preset or "tiny")
        weights = random_weights(cfg, device=device, dtype=dtype, seed=args.seed)
    if args.prompt is not None:
        prompt = tokenizer.encode(args.prompt).ids
    else:
        prompt = args.prompt_ids or [1, 2, 3, 4]
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        parser.error(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    need = len(prompt) + args.max_new_tokens - 1
    if args.max_seq is not None and args.max_seq < need:
        parser.error(f"--max-seq {args.max_seq} is too small: a {len(prompt)}-token prompt and "
                     f"--max-new-tokens {args.max_new_tokens} need {need} cache positions")
    max_seq = args.max_seq or len(prompt) + args.max_new_tokens
    try:
        decoder = Decoder(cfg, weights, max_batch=args.batch, max_seq=max_seq,
                          backend="triton" if on_gpu else "reference")
    except ValueError as e:              # e.g. --batch above what the Triton GEMV handles
        parser.error(str(e))
    from model.generation import Generator

    use_graph = on_gpu and not args.no_graph
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, (tuple, list)) else \
        (() if cfg.eos_token_id is None else (cfg.eos_token_id,))
    # Tokens stream to stdout; the progress bar goes to stderr only when stdout is not the
    # terminal (interactively the streaming text is the progress, and the two would collide).
    import time

    t_start = time.perf_counter()
    with Generator(decoder, sampling, use_graph=use_graph, prefill_chunk=args.prefill_chunk) as gen, \
            tqdm(total=args.max_new_tokens, desc="decode", unit="tok", file=sys.stderr,
                 disable=sys.stdout.isatty()) as bar:
        def show(step, tokens):
            t = tokens[0]
            if t is not None:
                print(tokenizer.decode([t]) if tokenizer is not None else f"{t} ", end="", flush=True)

        startup_s = time.perf_counter() - t_start
        print(f"prompt ({len(prompt)} tokens): {prompt if tokenizer is None else args.prompt!r}")
        result = gen.generate([prompt] * args.batch, args.max_new_tokens, eos_token_ids=eos,
                              on_tokens=show, progress=bar)
    print()
    mode = "graph (cugraph_rt)" if use_graph else "eager"
    where = torch.cuda.get_device_name() if on_gpu else "CPU"
    def rate(x):
        return "n/a" if x is None else f"{x:.1f} tok/s"

    print(f"{mode} on {where}, batch {args.batch}: time to first token {result.ttft_s * 1e3:.1f} ms "
          f"(prefill {result.prefill_tokens} tok, {rate(result.prefill_tok_s)}); decode "
          f"{result.decode_tokens} tok, after the first {rate(result.decode_tok_s)}; "
          f"stop: {', '.join(result.stop_reasons)}; start-up (JIT, capture) {startup_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
