"""The decode loop on the device: one launch runs decode steps until every row has stopped.

Two graphs over the same body (decode step -> in-graph sampling into the token buffer that the
next step reads -> `advance_rows`, which records the tokens, stops rows on end-of-sequence or at
their budget, advances the positions and sets a flag; model/ops/loop_rows.py):

- "while": [advance_rows on the first tokens] -> WHILE(flag) { body }: a conditional node
  (cugraph_rt.while_loop, CUDA 12.4+ drivers) re-runs the body until no row is active. One
  launch per request.
- "fixed": the body unrolled K times in one graph, K in `FIXED_STEPS` (no conditional nodes: for
  older drivers, and for measurement). The host launches the largest K that does not pass the
  longest remaining budget, waits, and launches again while a row is active. A step after every
  row stopped (a row ended by end-of-sequence mid-graph) records and advances nothing, but it still
  runs the decode step on the rows' last tokens: their state then is not the state a continuation
  needs, so "fixed" refuses to continue rows (start_positions) and "while" does not.

Tokens reach the host while the loop runs through a ring in pinned, mapped host memory that the
device writes (write-through) and the host polls without synchronising: one ring row per step,
the token of each active row, -1 for stopped rows. The ring holds max_seq rows, the most steps
any request can take (a budget is bounded by the cache), so the device never waits for the host
and the host can never fall behind by more than the ring holds. The host fills the rows it will
read with a sentinel (-2) before the launch and reads a row once none of its entries is the
sentinel (each entry is one aligned 4-byte store), so it never needs the device's stores ordered.
"""
from __future__ import annotations

import time

import torch

MODES = ("while", "fixed")
FIXED_STEPS = (1, 4, 16, 64)
UNWRITTEN = -2


def check_mode(mode) -> str | None:
    """None (the per-step loop), or the device loop's mode: True means "while"."""
    if mode is None or mode is False:
        return None
    if mode is True:
        return "while"
    if mode not in MODES:
        raise ValueError(f"device_loop must be False, True, or one of {MODES}, got {mode!r}")
    return mode


def check_fixed_steps(ks) -> tuple[int, ...]:
    """The K of the fixed-K graphs, sorted; 1 is always among them (it ends a request exactly
    where no larger K fits its remaining budget)."""
    try:
        ks = list(ks)
    except TypeError:
        raise ValueError(f"fixed_steps must be a sequence of ints >= 1, got {ks!r}") from None
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4096]
    if bad or not ks:
        raise ValueError(f"fixed_steps must be ints in [1, 4096], got {bad[0] if bad else ks!r}")
    return tuple(sorted(set(ks) | {1}))


class DeviceLoop:
    """Static buffers, the captured loop graphs and the host-side ring reader for `decoder` and
    its `sampler` (both already warmed up: the capture records kernels and runs nothing)."""

    def __init__(self, decoder, sampler, *, fixed_steps=FIXED_STEPS):
        import cugraph_rt as cg
        from cugraph_rt.stream_pool import borrow_stream

        if torch.device(decoder.device).type != "cuda":
            raise ValueError(f"the device loop needs a CUDA device, the decoder is on {decoder.device!s}")
        self.decoder, self.sampler, self.ops = decoder, sampler, decoder.ops
        B, dev = decoder.max_batch, decoder.device
        self.batch, self.ring_rows = B, decoder.max_seq
        self.tokens = torch.zeros(B, dtype=torch.int64, device=dev)       # sampled here, read by the next step
        self.ctl = torch.zeros(self.ops.loop_ctl_numel(B), dtype=torch.int64, device=dev)
        self.positions = self.ctl[:B]
        self.flag = torch.zeros(1, dtype=torch.int32, device=dev)
        self._staging = torch.zeros(self.ctl.numel(), dtype=torch.int64, pin_memory=True)
        self._ring_buf = cg.HostBuffer(self.ring_rows * B * 4, mapped=True)
        self.ring = self._ring_buf.as_device_tensor(torch.int32, (self.ring_rows, B))
        self.ring_host = self._ring_buf.numpy("int32", (self.ring_rows, B))
        self.ring_host.fill(UNWRITTEN)
        self.stream = borrow_stream()
        self.fixed_steps = check_fixed_steps(fixed_steps)
        self._execs: dict = {}     # "while" or K -> GraphExec
        self._graphs: dict = {}
        self.startup_s = 0.0
        self._closed = False

    # ---- capture -----------------------------------------------------------------------------
    def _advance(self):
        self.ops.advance_rows(self.tokens, self.ctl, self.ring, self.flag)

    def _body(self):
        logits = self.decoder.forward(self.tokens, self.positions)
        self.sampler(logits, self.tokens)
        self._advance()

    def prepare(self, mode: str) -> None:
        """Capture the graph(s) of `mode` (one-time start-up; a no-op when they exist)."""
        import cugraph_rt as cg
        from cugraph_rt import conditional, nvrtc_kernels

        self._check_open()
        keys = ["while"] if check_mode(mode) == "while" else list(self.fixed_steps)
        if all(k in self._execs for k in keys):
            return
        t0 = time.perf_counter()
        if mode == "while":
            conditional.require_conditional_support()
            nvrtc_kernels.condition_kernel()
        s = self.stream
        with torch.cuda.stream(s.torch):
            self.ctl.zero_()
            self._advance()            # compiles advance_rows outside the capture (no row active: writes the flag only)
            s.synchronize()
            for key in keys:
                if key in self._execs:
                    continue
                with cg.capture(s) as cap:
                    if key == "while":
                        self._advance()                     # the first tokens (sampled from the prefill)
                        with cg.while_loop(self.flag, s):
                            self._body()
                    else:
                        for _ in range(key):
                            self._body()
                self._graphs[key] = cap.graph
                self._execs[key] = cap.graph.instantiate()
                self._execs[key].upload(s)
        s.synchronize()
        self.startup_s += time.perf_counter() - t0

    # ---- one request ---------------------------------------------------------------------------
    def run(self, mode: str, positions, budgets, active_rows: int, eos_ids, on_row) -> int:
        """Decode from the first tokens already in `self.tokens` (sampled from the prefill on the
        current torch stream). Row r < active_rows starts at positions[r] (where its first new
        token goes) with budgets[r] tokens (the first included); rows beyond are idle (stepped
        along, never recorded). Every row's position advances once per ring row. on_row(r,
        tokens) is called for ring row r = 0, 1, ... in order, while the loop runs. Returns the
        ring rows read (the first tokens included)."""
        self._check_open()
        self.prepare(mode)
        B, E = self.batch, self.ops.loop_ctl_numel(self.batch) - 4 * self.batch - 1
        eos = sorted(set(int(t) for t in eos_ids))
        if len(eos) > E:
            raise ValueError(f"{len(eos)} end-of-sequence ids; the device loop takes at most {E}")
        most = max(budgets[:active_rows])
        if most > self.ring_rows:
            raise ValueError(f"a budget of {most} tokens exceeds the ring of {self.ring_rows} steps (max_seq)")
        st = self._staging
        st.zero_()
        for r in range(B):
            live = r < active_rows
            st[r] = positions[r] - 1                         # advance_rows moves every row by one first
            st[B + r] = 1 if live else 0
            st[3 * B + r] = budgets[r] if live else 0
        st[4 * B:4 * B + E] = -1
        st[4 * B:4 * B + len(eos)] = torch.tensor(eos, dtype=torch.int64)
        self.ring_host[:most].fill(UNWRITTEN)
        caller = torch.cuda.current_stream()
        self.ctl.copy_(st, non_blocking=True)                # ordered after the first tokens' sampling
        s = self.stream
        s.torch.wait_stream(caller)
        reader = _RingReader(self.ring_host, active_rows, budgets, eos, on_row)
        if mode == "while":
            self._execs["while"].launch(s)
            reader.follow(s)
        else:
            with torch.cuda.stream(s.torch):
                self._advance()
            reader.follow(s)
            ks = self.fixed_steps
            while not reader.done:
                left = reader.most_left()
                k = max([k for k in ks if k <= left] or [ks[0]])
                self._execs[k].launch(s)
                reader.follow(s)
        if not reader.done:
            raise RuntimeError(f"the device loop ended with rows still active after {reader.rows} steps "
                               "(advance_rows and the host's stop rule disagree)")
        caller.wait_stream(s.torch)
        return reader.rows

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this DeviceLoop is closed")

    def close(self) -> None:
        """Release the graphs, the mapped ring and the stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        from cugraph_rt.stream_pool import give_back_stream

        self.stream.synchronize()
        for ex in self._execs.values():
            ex.close()
        for g in self._graphs.values():
            g.close()
        self._execs.clear()
        self._graphs.clear()
        self.ring = self.ring_host = None
        self._ring_buf.close()
        give_back_stream(self.stream)


class _RingReader:
    """Reads ring rows as they appear and mirrors the device's stop rule (to know when a
    fixed-K launch must be followed by another, and to check the device)."""

    def __init__(self, ring, rows: int, budgets, eos, on_row, poll_s: float = 1e-4):
        self.ring, self.on_row, self.poll_s = ring, on_row, poll_s
        self.budgets, self.eos = list(budgets[:rows]), set(eos)
        self.count = [0] * rows
        self.active = [True] * rows
        self.rows = 0

    @property
    def done(self) -> bool:
        return not any(self.active)

    def most_left(self) -> int:
        return max(b - c for b, c, a in zip(self.budgets, self.count, self.active) if a)

    def _take(self) -> int:
        n = 0
        while self.rows < len(self.ring) and not self.done:
            row = self.ring[self.rows]
            if (row == UNWRITTEN).any():
                break
            toks = row.tolist()
            for r, a in enumerate(self.active):
                t = toks[r]
                if a != (t >= 0):
                    raise RuntimeError(f"device loop step {self.rows}, row {r}: token {t} but the host has "
                                       f"the row {'active' if a else 'stopped'}")
                if a:
                    self.count[r] += 1
                    if t in self.eos or self.count[r] >= self.budgets[r]:
                        self.active[r] = False
            self.on_row(self.rows, toks)
            self.rows += 1
            n += 1
        return n

    def follow(self, stream) -> None:
        """Read rows until `stream` has finished, then the rest."""
        while True:
            finished = stream.query()
            if self._take() == 0 and not finished:
                time.sleep(self.poll_s)
            if finished:
                self._take()
                return
