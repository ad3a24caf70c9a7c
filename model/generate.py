"""Command line: generate text or token ids with the Qwen3.5-MoE decoder.

    python -m model.generate --preset tiny --prompt-ids 1,2,3 --max-new-tokens 32
    python -m model.generate --checkpoint DIR --prompt "Hello" --temperature 0.7 --top-p 0.9
    python -m model.generate --checkpoint DIR --chat --prompt "Why is the sky blue?"
    python -m model.generate --preset 35b-a3b --quant int4 [--group-size 128] [--lm-head bf16|int4]

Decoding runs through a CUDA graph (cugraph_rt) unless --no-graph; with no GPU it runs the torch
reference path on the CPU and says so. Every input is checked before anything is allocated
(config fields, prompt, lengths against the model's context, batch, and the memory the run needs
against what is free); a bad one ends with a message and exit code 2. Text streams as it is
generated; the run ends with prefill and decode tokens per second. `--quant int4` runs int4
weights through the int4 kernels (an int4 checkpoint always does); `--quant int4-dequant` runs the
same int4 model's dequantized weights through the bf16 kernels, the reference (model/quant/cli.py).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import NamedTuple

from model.cli_args import PRESETS, add_quant_args, positive_int, sampling_params, seed

CPU_MAX_BATCH = 256   # the reference path runs attention and experts row by row in Python


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
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user turn in the checkpoint's chat template, the assistant's "
                        "turn opened")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")  # < 0: SamplingParams names it
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (and random-weight seed)")
    p.add_argument("--batch", type=positive_int, default=1, help="rows decoded together (same prompt)")
    p.add_argument("--max-seq", type=positive_int, default=None, help="KV cache capacity (default: fits)")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="keep only the first N layers of --preset (less memory)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="bfloat16 (default) on a GPU; the CPU reference path runs in float32")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying a graph")
    p.add_argument("--device-loop", choices=("off", "while", "fixed"), default="off",
                   help="run the decode loop on the device: 'while' (one launch, a conditional node stops "
                        "at end-of-sequence), 'fixed' (graphs of K steps); tokens still stream")
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="prompt tokens per prefill step (default 4096; longer prompts run as several chunks)")
    add_quant_args(p)    # --quant none|int4|int4-dequant, --group-size, --lm-head (model/quant/cli.py)
    return p


def _quant_plan(args, error, cfg, dtype):
    """The int4 plan of --quant/--group-size/--lm-head (and an int4 checkpoint's own config),
    checked against the model's shapes before anything is allocated."""
    from model.quant import read_quantization_config
    from model.quant.cli import plan_quant

    try:
        qcfg = read_quantization_config(args.checkpoint) if args.checkpoint is not None else None
        return plan_quant(args, cfg, dtype, qcfg)
    except ValueError as e:   # ConfigError included
        error(f"--quant {args.quant}: {e}" if args.quant != "none" else str(e))


def _load_weights(args, error, cfg, device, dtype, plan):
    """(cfg, weights) as the plan says: the checkpoint's (int4 kept int4, or quantized while
    loading) or seeded random ones (built int4 tensor by tensor where asked)."""
    from model.quant.cli import build_weights

    try:
        return build_weights(plan, cfg, device, dtype, checkpoint=args.checkpoint, seed=args.seed)
    except (ValueError, OSError) as e:   # CheckpointError, ConfigError, missing files
        error(f"--checkpoint {args.checkpoint}: {e}" if args.checkpoint is not None else str(e))


def _model_files(args, error):
    """(cfg, tokenizer or None, chat template or None, eos ids) from --checkpoint or --preset:
    the config and the text files only, no weights."""
    import dataclasses

    from model.config import ModelConfig

    if args.checkpoint is None:
        cfg = ModelConfig.preset(args.preset or "tiny")
        if args.layers is not None:
            if args.layers > cfg.num_layers:
                error(f"--layers {args.layers}: the {cfg.name} preset has {cfg.num_layers} layers")
            cfg = dataclasses.replace(cfg, num_layers=args.layers)
        eos = cfg.eos_token_id
        return cfg, None, None, (() if eos is None else tuple(eos) if isinstance(eos, tuple) else (eos,))
    from model.chat_template import ChatTemplate
    from model.checkpoint import eos_token_ids, load_tokenizer

    if args.layers is not None:
        error("--layers applies to --preset (random weights); a checkpoint is loaded whole")
    try:
        cfg = ModelConfig.from_hf(args.checkpoint)
        tokenizer = load_tokenizer(args.checkpoint)
        template = ChatTemplate.from_checkpoint(args.checkpoint) if args.chat else None
        eos = eos_token_ids(cfg, args.checkpoint)
    except (ValueError, OSError) as e:    # ConfigError, CheckpointError, ChatTemplateError, unreadable files
        error(f"--checkpoint {args.checkpoint}: {e}")
    return cfg, tokenizer, template, eos


def _prompt(args, error, cfg, tokenizer, template) -> tuple[list[int], str]:
    """(prompt token ids, how to show the prompt)."""
    if args.prompt is None:
        ids = args.prompt_ids or [1, 2, 3, 4]
        shown = str(ids)
        if tokenizer is not None and all(0 <= t < tokenizer.get_vocab_size(True) for t in ids):
            shown += f" = {tokenizer.decode(ids, skip_special_tokens=False)!r}"
    else:
        text, shown = args.prompt, repr(args.prompt)
        if template is not None:
            from model.chat_template import ChatTemplateError

            try:
                text = template.render([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
            except ChatTemplateError as e:
                error(f"--chat: {e}")
            shown = f"{args.prompt!r} as a user turn of the chat template in {Path(template.origin).name}"
        ids = tokenizer.encode(text, add_special_tokens=template is None).ids
        if not ids:
            error(f"--prompt {args.prompt!r} encodes to no tokens; give some text (or --prompt-ids)")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        error(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    return ids, shown


def _check_lengths(args, error, cfg, prompt) -> int:
    """The KV cache capacity to build, after checking it against the model's context."""
    limit = cfg.max_position_embeddings
    need = len(prompt) + args.max_new_tokens - 1
    if len(prompt) > limit:
        error(f"the {len(prompt)}-token prompt is longer than the model's max_position_embeddings={limit}")
    if need > limit:
        error(f"a {len(prompt)}-token prompt and --max-new-tokens {args.max_new_tokens} need {need} positions, "
              f"beyond the model's max_position_embeddings={limit}; use --max-new-tokens "
              f"{limit - len(prompt) + 1} or less")
    if args.max_seq is not None:
        if args.max_seq > limit:
            error(f"--max-seq {args.max_seq} is beyond the model's max_position_embeddings={limit}")
        if args.max_seq < need:
            error(f"--max-seq {args.max_seq} is too small: a {len(prompt)}-token prompt and "
                  f"--max-new-tokens {args.max_new_tokens} need {need} cache positions")
        return args.max_seq
    return need + 1


def _check_memory(args, error, cfg, device, dtype_bytes, max_seq, backend, quant=None, *, weights=None,
                  shard_of=""):
    """Refuse (exit 2) a run whose memory does not fit. A rank of a parallel run passes its shard's
    config, its weight bytes (`weights`) and `shard_of` ("rank r of N's shard of")."""
    from model.memory_plan import (NotEnoughMemoryError, check_fits, decode_memory, free_memory,
                                   max_layers_that_fit)

    plan = dict(batch=args.batch, max_seq=max_seq, dtype_bytes=dtype_bytes, backend=backend, quant=quant)
    parts = decode_memory(cfg, **plan)
    if weights is not None:
        parts["weights"] = weights
    free = free_memory(device)
    hints = []
    if args.checkpoint is None and weights is None:
        n = max_layers_that_fit(cfg, free[0], **plan)
        if 0 < n < cfg.num_layers:
            hints.append(f"--layers {n} (the first {n} of {cfg.num_layers} layers fit)")
        if cfg.name != "tiny":
            hints.append("a smaller preset (--preset tiny)")
    weights = parts["weights"]
    if sum(parts.values()) - weights > weights / 4:
        hints.append("a smaller --max-new-tokens, --max-seq or --batch (cache and workspaces take "
                     "more than a quarter of the total)")
    if device == "cpu":
        hints.append("a GPU with enough memory")
    what = shard_of + (f"--checkpoint {args.checkpoint}" if args.checkpoint is not None else
                       f"the {cfg.name} preset{f' cut to {cfg.num_layers} layers' if args.layers else ''}")
    try:
        check_fits(parts, device, what=f"{what} (batch {args.batch}, {max_seq} positions)", free=free,
                   suggestion=("try " + ", or ".join(hints)) if hints else "")
    except NotEnoughMemoryError as e:
        error(f"not enough memory: {e}; nothing was allocated")


def _format_summary(result, mode, where, batch, startup_s) -> str:
    """Time to first token (prefill + the first sampled tokens) and the decode rate after it;
    one-time start-up (Triton JIT, graph capture) on its own."""
    prefill = (f"time to first token {result.ttft_s * 1e3:.1f} ms (prefill {result.prefill_tokens} tok, "
               f"{result.prefill_tok_s:.1f} tok/s)")
    later = result.decode_tok_s
    rate = f"{later:.1f} tok/s after the first" if later is not None else "no step after the first"
    if batch == 1:
        stop = result.stop_reasons[0]
    else:
        stop = ", ".join(f"{r} ({n} rows)" for r, n in collections.Counter(result.stop_reasons).items())
    return (f"{mode} on {where}, batch {batch}: {prefill}; decode {result.decode_tokens} tok ({rate}); "
            f"stop: {stop}; start-up (JIT, capture) {startup_s:.2f} s")


class Inputs(NamedTuple):
    """What the arguments ask for, checked before anything is allocated."""
    sampling: object            # SamplingParams
    cfg: object                 # ModelConfig
    tokenizer: object
    template: object
    eos: tuple
    prompt: list
    shown: str
    max_seq: int


def _inputs(args, error) -> Inputs:
    """Check every argument against the model's config and text files (no weights, no device)."""
    sampling = sampling_params(args, error)
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        error(f"--checkpoint {args.checkpoint}: no such directory")
    if args.chat and args.prompt is None:
        error("--chat wraps --prompt text in the chat template: give --prompt")
    cfg, tokenizer, template, eos = _model_files(args, error)
    if args.prompt is not None and tokenizer is None:
        error("--prompt needs a tokenizer.json in --checkpoint; use --prompt-ids instead")
    if args.chat and template is None:
        error(f"--chat: {args.checkpoint} has no chat template (chat_template.jinja, chat_template.json "
              f"or tokenizer_config.json's chat_template)")
    if args.top_k > cfg.vocab_size:
        error(f"--top-k {args.top_k} is larger than the vocabulary ({cfg.vocab_size}); 0 turns top-k off")
    prompt, shown = _prompt(args, error, cfg, tokenizer, template)
    max_seq = _check_lengths(args, error, cfg, prompt)
    return Inputs(sampling, cfg, tokenizer, template, eos, prompt, shown, max_seq)


def main(argv=None) -> int:
    from model.parallel.env import torchrun_env

    try:
        as_rank = torchrun_env() is not None
    except ValueError as e:
        print(f"python -m model.generate: error: {e}", file=sys.stderr)
        return 2
    if as_rank:    # started by torchrun: one rank of a parallel run (model/parallel/cli.py)
        from model.parallel.cli import main as rank_main

        return rank_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    error = parser.error
    inp = _inputs(args, error)
    cfg, max_seq = inp.cfg, inp.max_seq

    import torch

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        from model.ops.linear import MAX_BATCH
        if args.batch > MAX_BATCH:
            error(f"--batch {args.batch}: the Triton GEMV decodes at most {MAX_BATCH} rows together")
    elif args.batch > CPU_MAX_BATCH:
        error(f"--batch {args.batch}: the CPU reference path decodes row by row in Python, so more than "
              f"{CPU_MAX_BATCH} rows would take minutes per token; use at most {CPU_MAX_BATCH}")
    device_loop = None if args.device_loop == "off" else args.device_loop
    if device_loop and (args.no_graph or not on_gpu):
        error(f"--device-loop {args.device_loop} replays the decode step as a CUDA graph: it needs a CUDA GPU "
              "and no --no-graph")
    device = "cuda" if on_gpu else "cpu"
    dtype = getattr(torch, args.dtype or "bfloat16") if on_gpu else torch.float32
    backend = "triton" if on_gpu else "reference"
    quant = _quant_plan(args, error, cfg, dtype)
    _check_memory(args, error, cfg, device, dtype.itemsize, max_seq, backend, quant.memory_spec)
    _notes(args, cfg, on_gpu)
    cfg, weights = _load_weights(args, error, cfg, device, dtype, quant)
    from model.decoder import Decoder

    try:
        decoder = Decoder(cfg, weights, max_batch=args.batch, max_seq=max_seq, backend=backend)
    except ValueError as e:
        error(str(e))
    where = torch.cuda.get_device_name() if on_gpu else "CPU"
    return _generate(args, inp, decoder, use_graph=on_gpu and not args.no_graph, device_loop=device_loop,
                     where=where)


def _notes(args, cfg, on_gpu) -> None:
    if not on_gpu:
        print("note: no CUDA GPU found; CUDA graphs need an NVIDIA GPU. Running the torch reference "
              "path on the CPU, eagerly, in float32"
              + (" (--dtype bfloat16 is not used there)" if args.dtype == "bfloat16" else "") + ".",
              file=sys.stderr)
    if args.checkpoint is None:
        print(f"note: the {cfg.name} preset has random weights: its tokens mean nothing.", file=sys.stderr)


def _generate(args, inp: Inputs, decoder, *, use_graph: bool, device_loop, where: str) -> int:
    """Generate from the prompt, streaming the text, then print the summary line."""
    from tqdm import tqdm

    from model.generation import Generator
    from model.streaming import TokenPrinter

    printer = TokenPrinter(inp.tokenizer)
    print(f"prompt ({len(inp.prompt)} tokens): {inp.shown}", flush=True)
    # Tokens stream to stdout; the progress bar goes to stderr only when stdout is not the
    # terminal (interactively the streaming text is the progress, and the two would collide).
    import time

    t_start = time.perf_counter()
    try:
        with Generator(decoder, inp.sampling, use_graph=use_graph, prefill_chunk=args.prefill_chunk,
                       device_loop=device_loop) as gen, \
                tqdm(total=args.max_new_tokens, desc="decode", unit="tok", file=sys.stderr,
                     disable=sys.stdout.isatty()) as bar:
            def show(step, tokens):
                if tokens[0] is not None:
                    printer.push(tokens[0])

            startup_s = time.perf_counter() - t_start
            result = gen.generate([inp.prompt] * args.batch, args.max_new_tokens, eos_token_ids=inp.eos,
                                  on_tokens=show, progress=bar)
    except KeyboardInterrupt:
        printer.finish()
        print("\ninterrupted", file=sys.stderr)
        return 130
    printer.finish()
    print()
    mode = ("graph (cugraph_rt)" + (f", decode loop on the device ({device_loop})" if device_loop else "")
            if use_graph else "eager")
    print(_format_summary(result, mode, where, args.batch, startup_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
