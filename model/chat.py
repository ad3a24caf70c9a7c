"""Command line: an interactive multi-turn chat with a checkpoint.

    python -m model.chat --checkpoint DIR [--system "Be brief."] [--max-new-tokens 512]

Each line read from stdin is a user message; the reply streams to stdout. `/reset` forgets the
conversation, `/exit` (or the end of the input, Ctrl-D) ends the chat with exit code 0.

The KV cache and the GDN states are kept between turns. A turn renders the whole conversation with
the checkpoint's chat template and tokenizes it; where the tokens already in the cache, followed by
the last reply's final token (sampled but never fed), are a prefix of it, only the rest is
prefilled, at the position where the last reply stopped. Where the template renders the earlier
turns differently (it may drop a reply's reasoning, say), the cache is reset and the whole
conversation prefilled again, with a note on stderr. A turn whose prompt and reply budget
(--max-new-tokens) would not fit in the cache (--max-seq) is not run: the message says so and the
conversation stays as it was. Bad flags, or a checkpoint without a tokenizer or chat template, end
with a message and exit code 2 before anything is allocated.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from model.chat_template import ChatTemplateError
from model.cli_args import add_quant_args, finite_float, nonnegative_int, positive_int, sampling_params, seed

DEFAULT_MAX_SEQ = 4096
MIN_PROMPT_ROOM = 64        # cache positions a turn's prompt gets at least, beside the reply budget


class ChatError(ValueError):
    """A turn that was not run (the conversation is unchanged): the message says why."""


class CacheFullError(ChatError):
    """The turn's prompt and reply budget do not fit in the cache."""


@dataclass
class Turn:
    tokens: list[int]      # generated ids (the end-of-turn token included where it ended the reply)
    text: str              # the reply as the history keeps it (special tokens dropped)
    start: int             # cache position the turn's prompt was fed from
    prompt_tokens: int     # tokens prefilled for the turn
    appended: bool         # False: the whole conversation was prefilled from position 0
    stop_reason: str       # "eos" or "length"


class ChatSession:
    """A conversation over one Generator (batch 1) whose cache row 0 holds it.

    `fed` lists the ids in the cache (positions 0..len(fed)-1, so the decoder's next position is
    len(fed)); `pending` is the last reply's final token, sampled but not fed: the next turn's
    prompt starts with it. `messages` is the history the template renders."""

    def __init__(self, generator, tokenizer, template, *, eos_token_ids=(), max_new_tokens: int = 512,
                 system: str | None = None, out=None, err=None):
        if generator.batch != 1:
            raise ValueError(f"a chat runs one conversation: the generator's batch must be 1, got {generator.batch}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a string or None, got {type(system).__name__}")
        self.generator, self.tokenizer, self.template = generator, tokenizer, template
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.reset()

    @property
    def decoder(self):
        return self.generator.decoder

    @property
    def capacity(self) -> int:
        return self.decoder.max_seq

    @property
    def position(self) -> int:
        """The cache position the next prompt is fed from."""
        return len(self.fed)

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and clear the cache."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.fed: list[int] = []
        self.pending: int | None = None
        self.decoder.reset()

    def render_ids(self, messages) -> list[int]:
        """The token ids of `messages` rendered with the template, the assistant's turn opened."""
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise ChatError(str(e)) from e
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ChatError("the chat template rendered the conversation as no tokens")
        vocab = self.decoder.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ChatError(f"the tokenizer gave id {bad[0]}, outside the model's vocabulary [0, {vocab})")
        return ids

    def plan(self, ids: list[int]) -> tuple[int, list[int]]:
        """(start position, ids to prefill) for a conversation whose full ids are `ids`: the part
        after what the cache holds where the cache (+ the pending token) is a prefix of it, else
        everything from 0."""
        held = self.fed + ([] if self.pending is None else [self.pending])
        if self.fed and len(ids) > len(self.fed) and ids[:len(held)] == held:
            return len(self.fed), ids[len(self.fed):]
        return 0, ids

    def send(self, text: str) -> Turn:
        """Run one turn: the user's `text`, the reply streamed to `out`. ChatError (CacheFullError
        where it would not fit) leaves the conversation and the cache as they were."""
        if not isinstance(text, str):
            raise TypeError(f"a message must be a string, got {type(text).__name__}")
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.render_ids(messages)
        start, prompt = self.plan(ids)
        appended = start > 0
        need = start + len(prompt) + self.max_new_tokens - 1    # the last new token is never fed
        if need > self.capacity:
            budget = f"up to {self.max_new_tokens} for the reply"
            if self.fed:
                raise CacheFullError(
                    f"the conversation fills the cache ({need} of {self.capacity} positions: "
                    f"{start} held, {len(prompt)} for the new message, {budget}): /reset to start over")
            raise CacheFullError(
                f"the message is too long for the cache ({need} of {self.capacity} positions: "
                f"{len(prompt)} for the conversation, {budget}): send a shorter message, or restart "
                f"with a larger --max-seq or a smaller --max-new-tokens")
        if self.fed and not appended:
            print(f"note: the chat template renders the earlier turns differently from the tokens in the "
                  f"cache; prefilling the whole conversation again ({len(ids)} tokens)", file=self.err)
        from model.streaming import TokenPrinter

        printer = TokenPrinter(self.tokenizer, self.out)

        def show(step, tokens):
            if tokens[0] is not None:
                printer.push(tokens[0])

        # the first turn (after a reset) starts fresh; later ones continue the sampler's stream
        starts = [start] if self.fed else None
        try:
            result = self.generator.generate([prompt], self.max_new_tokens, eos_token_ids=self.eos_token_ids,
                                             on_tokens=show, start_positions=starts)
        except BaseException:
            # a reply cut short (Ctrl-C) left the cache part-way: drop the turn, and let the next
            # one prefill the conversation again
            self.fed, self.pending = [], None
            raise
        printer.finish()
        new = result.tokens[0]
        reply = self.tokenizer.decode(new, skip_special_tokens=True)
        self.fed = ids + new[:-1]
        self.pending = new[-1]
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return Turn(new, reply, start, len(prompt), appended, result.stop_reasons[0])


# ---- command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.chat", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="Hugging Face checkpoint directory (with tokenizer.json and a chat template)")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="reply budget per turn")
    p.add_argument("--max-seq", type=positive_int, default=None,
                   help=f"KV cache positions the whole conversation shares (default {DEFAULT_MAX_SEQ}, "
                        f"at most the model's max_position_embeddings)")
    p.add_argument("--temperature", type=finite_float(0.0, what="0 is greedy"), default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=finite_float(0.0, 1.0, lo_open=True), default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="bfloat16 (default) on a GPU; the CPU reference path runs in float32")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying graphs")
    add_quant_args(p)    # --quant none|int4|int4-dequant, --group-size, --lm-head (model/quant/cli.py)
    p.add_argument("--device-loop", choices=("off", "while"), default="off",
                   help="'while': each reply decodes in one graph launch that stops at end-of-sequence")
    return p


def _text_files(args, error):
    """(cfg, tokenizer, template, eos ids): the checkpoint's config and text side, no weights."""
    from model.chat_template import ChatTemplate
    from model.checkpoint import eos_token_ids, load_tokenizer
    from model.config import ModelConfig

    if not args.checkpoint.is_dir():
        error(f"--checkpoint {args.checkpoint}: no such directory")
    try:
        cfg = ModelConfig.from_hf(args.checkpoint)
        tokenizer = load_tokenizer(args.checkpoint)
        template = ChatTemplate.from_checkpoint(args.checkpoint)
        eos = eos_token_ids(cfg, args.checkpoint)
    except (ValueError, OSError) as e:    # ConfigError, CheckpointError, ChatTemplateError, unreadable files
        error(f"--checkpoint {args.checkpoint}: {e}")
    if tokenizer is None:
        error(f"--checkpoint {args.checkpoint}: a chat needs the checkpoint's tokenizer.json, and it has none")
    if template is None:
        error(f"--checkpoint {args.checkpoint}: a chat needs a chat template (chat_template.jinja, "
              f"chat_template.json or tokenizer_config.json's chat_template), and it has none")
    # the template must take the conversation's first turn (with --system, if given)
    probe = ([] if args.system is None else [{"role": "system", "content": args.system}]) \
        + [{"role": "user", "content": "hello"}]
    try:
        template.render(probe, add_generation_prompt=True)
    except ChatTemplateError as e:
        error(f"{'--system: ' if args.system is not None else ''}{e}")
    return cfg, tokenizer, template, eos


def _plan_cache(args, error, cfg, device, dtype_bytes, backend, quant=None) -> tuple[int, str]:
    """(cache positions, a note or ''): --max-seq checked against the model's context, the reply
    budget and the free memory; the default shrinks (halving) to what the memory holds."""
    from model.memory_plan import NotEnoughMemoryError, check_fits, decode_memory, free_memory

    limit = cfg.max_position_embeddings
    if args.max_seq is not None and args.max_seq > limit:
        error(f"--max-seq {args.max_seq} is beyond the model's max_position_embeddings={limit}")
    want = args.max_seq if args.max_seq is not None else min(DEFAULT_MAX_SEQ, limit)
    if args.max_new_tokens >= want:
        flag = f"--max-seq {want}" if args.max_seq is not None else f"the {want}-position cache"
        error(f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in {flag}; "
              f"use a smaller --max-new-tokens" + (f" or a larger --max-seq (up to {limit})" if want < limit else ""))
    free = free_memory(device)
    floor = min(want, args.max_new_tokens + MIN_PROMPT_ROOM)
    seq = want
    while True:
        parts = decode_memory(cfg, batch=1, max_seq=seq, dtype_bytes=dtype_bytes, backend=backend, quant=quant)
        try:
            check_fits(parts, device, what=f"--checkpoint {args.checkpoint} ({seq} cache positions)", free=free,
                       suggestion="try a smaller --max-seq or --max-new-tokens, or a GPU with more memory")
            break
        except NotEnoughMemoryError as e:
            if args.max_seq is not None or seq <= floor:
                error(f"not enough memory: {e}; nothing was allocated")
            seq = max(floor, seq // 2)
    note = "" if seq == want else (f"note: the cache holds {seq} positions ({want} would not fit in the free "
                                   f"memory); --max-seq sets it")
    return seq, note


def _read_line(interactive: bool) -> str:
    """The next input line without its newline; EOFError at the end of the input."""
    if interactive:
        return input("you> ")
    line = sys.stdin.readline()
    if line == "":
        raise EOFError
    return line.rstrip("\r\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    error = parser.error
    sampling = sampling_params(args, error)
    cfg, tokenizer, template, eos = _text_files(args, error)
    if args.top_k > cfg.vocab_size:
        error(f"--top-k {args.top_k} is larger than the vocabulary ({cfg.vocab_size}); 0 turns top-k off")

    import torch

    on_gpu = torch.cuda.is_available()
    if args.device_loop != "off" and (args.no_graph or not on_gpu):
        error(f"--device-loop {args.device_loop} replays the decode step as a CUDA graph: it needs a CUDA GPU "
              "and no --no-graph")
    device = "cuda" if on_gpu else "cpu"
    dtype = getattr(torch, args.dtype or "bfloat16") if on_gpu else torch.float32
    backend = "triton" if on_gpu else "reference"
    from model.quant import read_quantization_config
    from model.quant.cli import build_weights, plan_quant

    try:
        plan = plan_quant(args, cfg, dtype, read_quantization_config(args.checkpoint))
    except ValueError as e:   # ConfigError included
        error(f"--quant {args.quant}: {e}" if args.quant != "none" else str(e))
    max_seq, note = _plan_cache(args, error, cfg, device, dtype.itemsize, backend, plan.memory_spec)
    if not on_gpu:
        print("note: no CUDA GPU found; CUDA graphs need an NVIDIA GPU. Running the torch reference "
              "path on the CPU, eagerly, in float32"
              + (" (--dtype bfloat16 is not used there)" if args.dtype == "bfloat16" else "") + ".",
              file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    from model.decoder import Decoder
    from model.generation import Generator

    try:
        cfg, weights = build_weights(plan, cfg, device, dtype, checkpoint=args.checkpoint)
        decoder = Decoder(cfg, weights, max_batch=1, max_seq=max_seq, backend=backend)
    except (ValueError, OSError) as e:   # CheckpointError, ConfigError, missing files
        error(f"--checkpoint {args.checkpoint}: {e}")
    interactive = sys.stdin.isatty()
    with Generator(decoder, sampling, use_graph=on_gpu and not args.no_graph,
                   device_loop=args.device_loop == "while") as gen:
        chat = ChatSession(gen, tokenizer, template, eos_token_ids=eos, max_new_tokens=args.max_new_tokens,
                           system=args.system)
        if interactive:
            print(f"chat with {args.checkpoint} ({max_seq} cache positions, replies up to "
                  f"{args.max_new_tokens} tokens): /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
        return _loop(chat, interactive)


def _loop(chat: ChatSession, interactive: bool) -> int:
    while True:
        try:
            line = _read_line(interactive)
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return 0
        if command == "/reset":
            chat.reset()
            print("(conversation reset: the cache is empty)", file=sys.stderr)
            continue
        try:
            turn = chat.send(line)
        except ChatError as e:
            print(f"chat: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n(reply interrupted and dropped; the next message prefills the conversation again)",
                  file=sys.stderr)
            continue
        print(flush=True)
        if turn.stop_reason == "length":
            print(f"(reply cut at --max-new-tokens {chat.max_new_tokens})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
