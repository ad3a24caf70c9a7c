"""Generation: chunked prefill of the prompts, then decode with sampling, both as CUDA graphs
(cugraph_rt.GraphHandle).

Prefill runs each row's prompt through `model.prefill` (one graph per chunk-size bucket); the
first new token is sampled from its last-token logits. One decode step is
`decoder.forward(tokens, positions)` (the raw decode step) followed by on-device sampling; the
graph's inputs are the tokens and positions, its output the sampled tokens, which feed the next
step without leaving the device (a device-to-device copy into the graph's static input); the host
only reads them to stream text and to stop on end-of-sequence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from model import ops as _ops


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]          # generated tokens per row (prompt excluded)
    prefill_s: float                 # time to first token: prefill + sampling the first tokens
    decode_s: float                  # the later tokens
    prefill_tokens: int              # prompt tokens processed, all rows together
    decode_tokens: int               # generated tokens, all rows together
    stop_reasons: list[str] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.prefill_s

    @property
    def prefill_tok_s(self) -> float | None:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first per second (None when no step after the first ran)."""
        later = self.decode_tokens - len(self.tokens)
        return later / self.decode_s if self.decode_s > 0 and later > 0 else None


class Generator:
    """Prefill and decode through one step function, replayed as a CUDA graph or run eagerly
    (use_graph); with use_graph and prefill_graphs=False only the decode step is a graph.

    The graph (or eager) step takes `tokens[B]` and `positions[B]` (int64) and returns the sampled
    next tokens `[B]` (int64, on the device); `decoder.logits` keeps the step's logits.
    """

    def __init__(self, decoder, sampling: SamplingParams = SamplingParams(), *,
                 use_graph: bool = True, warmup: int = 2, prefill_chunk: int | None = None,
                 device_loop=False, prefill_graphs: bool = True):
        from .device_loop import check_mode

        self.device_loop = check_mode(device_loop)   # generate()'s default; its graphs are made now
        self.decoder = decoder
        self.sampling = sampling
        self.batch = decoder.max_batch
        device = decoder.device
        self._ops = _ops.backend(decoder.backend)
        self._next_tokens = torch.zeros(self.batch, dtype=torch.int64, device=device)
        self._sampler = self._ops.Sampler(decoder.cfg.vocab_size, self.batch, sampling, device=device)
        self.use_graph = bool(use_graph)
        self._handle = None
        if self.use_graph:
            if torch.device(device).type != "cuda":
                raise ValueError(f"use_graph=True needs a CUDA device, the decoder is on {device!s}")
            from cugraph_rt import GraphHandle

            example = {
                "tokens": torch.zeros(self.batch, dtype=torch.int64, device=device),
                "positions": torch.zeros(self.batch, dtype=torch.int64, device=device),
            }
            self._handle = GraphHandle(self._step, example, warmup=warmup)
        elif self.device_loop:
            raise ValueError(f"device_loop={device_loop!r} replays the decode step as a CUDA graph: it needs "
                             "use_graph=True")
        self._loop = None
        # the chunked prefill step; with graphs, captured per chunk-size bucket now (start-up).
        # prefill_graphs=False keeps the prefill eager: for users of the decode step alone (the
        # decode benchmarks), who need not pay its capture
        step = decoder.prefill_step(prefill_chunk)
        self._prefill_graphs = None
        if self.use_graph:
            # warm up and capture the decode step now (Triton JIT, cuBLAS): start-up, and every
            # later capture (the device loop's graphs) then records compiled kernels only
            for _ in range(warmup + 1):
                self._handle(tokens=example["tokens"], positions=example["positions"])
            if self.device_loop:
                self._device_loop(self.device_loop)
            if prefill_graphs:
                from .prefill import PrefillGraphs

                self._prefill_graphs = PrefillGraphs(step)
                self._prefill_graphs.prepare(row=0)
            decoder.reset()
            self._sampler.reset()

    # The one step both paths run: decode, then sample into the static next-token buffer.
    def _step(self, tokens, positions):
        logits = self.decoder.forward(tokens, positions)
        self._sampler(logits, self._next_tokens)
        return self._next_tokens

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step on host or device int64 tensors [B]; returns the sampled tokens [B] on
        the device (a static buffer, overwritten by the next step).

        Host (CPU) tokens and positions are checked before anything runs, without touching the
        device: token ids inside the vocabulary, positions inside the cache and one past each
        row's previous step (ValueError naming the row and values; the generator stays usable).
        Device tensors are not read (that would synchronise): the sampled tokens fed back are in
        the vocabulary by construction, and device positions make the decoder forget the rows'
        history (until their reset) while the kernels still never write outside the cache."""
        dec = self.decoder
        for name, t in (("tokens", tokens), ("positions", positions)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (self.batch,):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor of shape ({self.batch},) (the generator's batch); "
                                 f"got {got}")
        host_pos = None
        if isinstance(tokens, torch.Tensor) and tokens.device.type == "cpu":
            dec.check_tokens(tokens)
        if isinstance(positions, torch.Tensor) and positions.device.type == "cpu":
            host_pos = positions.tolist()
            dec.check_positions(host_pos)
        if self._handle is not None:
            out = self._handle(tokens=tokens, positions=positions)
        else:
            device = dec.device
            out = self._step(tokens.to(device), positions.to(device))
        dec.advance_positions(host_pos, self.batch)
        return out

    @property
    def handle(self):
        return self._handle

    def _device_loop(self, mode: str):
        """The device loop with `mode`'s graphs captured (made on first use: the capture runs
        nothing, so this never touches the rows' state)."""
        if not self.use_graph:
            raise ValueError(f"device_loop={mode!r} replays the decode step as a CUDA graph: make the "
                             "Generator with use_graph=True")
        if self._loop is None:
            from .device_loop import DeviceLoop

            self._loop = DeviceLoop(self.decoder, self._sampler)
        self._loop.prepare(mode)
        return self._loop

    @property
    def device_loop_startup_s(self) -> float:
        """One-time capture time of the device loop's graphs so far."""
        return self._loop.startup_s if self._loop is not None else 0.0

    def generate(self, prompts: list[list[int]], max_new_tokens, *, eos_token_ids=(),
                 on_tokens=None, progress=None, start_positions=None, device_loop=None) -> GenerationResult:
        """Prefill every row's prompt (row r from position 0), sample each row's first token from
        its last-token logits, then decode all rows together, each at its own position; a row
        stops at an end-of-sequence token or after max_new_tokens (an int, or one per prompt).

        start_positions (one per row of the decoder's batch) continues the rows instead: prompt r
        is appended at position start_positions[r] of row r, which must be where the row's last
        turn left it (the last generated token was never fed: put it at the prompt's head). The
        state and the sampler's random stream carry on (a chat's next turn).

        device_loop (default: the Generator's) runs the decode loop on the device: True or
        "while" (one launch; a conditional WHILE node stops when every row has stopped), "fixed"
        (graphs of K unrolled steps, relaunched by the host), False the host's per-step loop. The
        tokens are the same in every mode (model/device_loop.py).

        on_tokens(step, tokens_by_row) is called with the rows' new tokens (None for rows already
        stopped); progress is a tqdm-like object with update(n), once per step.
        """
        from .device_loop import check_mode

        mode = self.device_loop if device_loop is None else check_mode(device_loop)
        prompts, budgets = self._check_prompts(prompts, max_new_tokens, start_positions)
        if mode == "fixed" and start_positions is not None:
            raise ValueError("device_loop='fixed' runs whole K-step graphs, whose steps after the last row "
                             "stopped move the rows' state on: continue rows (start_positions) with "
                             "device_loop='while' or the per-step loop")
        eos = set(int(t) for t in eos_token_ids)
        if mode:
            from .ops.loop_rows import EOS_SLOTS

            if len(eos) > EOS_SLOTS:     # refused before the prefill touches any row
                raise ValueError(f"{len(eos)} end-of-sequence ids; the device loop takes at most {EOS_SLOTS} "
                                 "(device_loop=False takes any number)")
        loop = self._device_loop(mode) if mode else None
        rows = len(prompts)
        if rows < self.batch:   # idle rows repeat row 0; their output is ignored
            if start_positions is not None:
                raise ValueError(f"start_positions continues every row: give {self.batch} prompts, got {rows}")
            prompts = prompts + [prompts[0]] * (self.batch - rows)
        dec = self.decoder
        if start_positions is None:
            dec.reset()
            self._sampler.reset()
            starts = [0] * self.batch
        else:
            starts = [int(s) for s in start_positions]
        lengths = [len(p) for p in prompts]
        first_positions = [s + n for s, n in zip(starts, lengths)]
        generated: list[list[int]] = [[] for _ in range(rows)]
        stop = ["" for _ in range(rows)]
        clock = {"t0": time.perf_counter(), "first": None, "steps": 0}

        def take(new) -> None:
            """One step's tokens (one per batch row; rows stopped before it are skipped)."""
            if clock["first"] is None:
                clock["first"] = time.perf_counter()
            clock["steps"] += 1
            emitted = [None] * rows
            for r in range(rows):
                if stop[r]:
                    continue
                generated[r].append(new[r])
                emitted[r] = new[r]
                if new[r] in eos:
                    stop[r] = "eos"
                elif len(generated[r]) >= budgets[r]:
                    stop[r] = "length"
            if on_tokens is not None and any(t is not None for t in emitted):
                on_tokens(clock["steps"], emitted)
            if progress is not None:
                progress.update(1)

        logits = dec.prefill(prompts, starts if start_positions is not None else None,
                             chunk_runner=self._prefill_graphs)
        if loop is not None:
            self._sampler(logits, loop.tokens)
            n = loop.run(mode, first_positions, budgets + [1] * (self.batch - rows), rows, eos,
                         lambda i, toks: take(toks))
            for r in range(self.batch):      # every row advanced once per step but the last
                dec.next_positions[r] = first_positions[r] + n - 1
        else:
            self._per_step_loop(logits, first_positions, stop, take)
        end = time.perf_counter()
        first = clock["first"] if clock["first"] is not None else end
        prefill_tokens = sum(lengths[:rows])
        decode_tokens = sum(len(g) for g in generated)
        return GenerationResult(generated, first - clock["t0"], end - first, prefill_tokens, decode_tokens, stop)

    def _per_step_loop(self, logits, first_positions, stop, take) -> None:
        """The host drives: one graph launch, one copy back and one synchronisation per step."""
        host_next = torch.empty(self.batch, dtype=torch.int64, pin_memory=self._pinned())
        self._sampler(logits, self._next_tokens)
        next_dev = self._next_tokens
        positions = torch.tensor(first_positions, dtype=torch.int64)
        while True:
            host_next.copy_(next_dev, non_blocking=True)
            self._synchronize()
            take(host_next.tolist())
            if all(stop):
                return
            next_dev = self.step(next_dev, positions)   # the sampled tokens stay on the device
            positions = positions + 1

    def _check_prompts(self, prompts, max_new_tokens, start_positions=None):
        """(prompts as int lists, one token budget per prompt), or ValueError naming the value."""
        if not prompts or not all(len(p) > 0 for p in prompts):
            raise ValueError("every prompt needs at least one token; got an empty prompt list or prompt")
        if len(prompts) > self.batch:
            raise ValueError(f"{len(prompts)} prompts but the decoder was built for batch {self.batch}")
        if isinstance(max_new_tokens, (list, tuple)):
            if len(max_new_tokens) != len(prompts):
                raise ValueError(f"max_new_tokens has {len(max_new_tokens)} budgets for {len(prompts)} prompts")
            budgets = list(max_new_tokens)
        else:
            budgets = [max_new_tokens] * len(prompts)
        for r, b in enumerate(budgets):
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"max_new_tokens must be a positive int, got {b!r}"
                                 + (f" for prompt {r}" if len(budgets) > 1 else ""))
        vocab = self.decoder.cfg.vocab_size
        out = []
        for r, p in enumerate(prompts):
            p = [int(t) for t in p]
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {r}: token id {bad[0]} outside the vocabulary [0, {vocab})")
            out.append(p)
        starts = [0] * len(out) if start_positions is None else [int(s) for s in start_positions]
        if len(starts) < len(out):
            raise ValueError(f"{len(starts)} start positions for {len(out)} prompts")
        # every row is stepped until the longest budget is spent (the last new token is never fed)
        most = max(budgets)
        for r, (p, s) in enumerate(zip(out, starts)):
            need = s + len(p) + most - 1
            if need > self.decoder.max_seq:
                at = f" from position {s}" if s else ""
                raise ValueError(f"prompt {r} of {len(p)} tokens{at} + {most} new tokens needs "
                                 f"{need} cache positions; the decoder holds {self.decoder.max_seq}")
        return out, budgets

    def _pinned(self) -> bool:
        return torch.device(self.decoder.device).type == "cuda"

    def _synchronize(self):
        if torch.device(self.decoder.device).type == "cuda":
            torch.cuda.current_stream().synchronize()

    def close(self):
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._prefill_graphs is not None:
            self._prefill_graphs.close()
            self._prefill_graphs = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
