"""The Qwen3.5-MoE decode step over preallocated state and workspaces.

`Decoder.decode_step(tokens, positions)` runs one token per row for rows 0..b-1 and writes the
logits into the static buffer `decoder.logits` [max_batch, V], returning its [b, V] view. Every
intermediate lives in a workspace allocated once here, and the state (KV cache, GDN conv and
recurrent states) is updated in place, so with the Triton backend a step allocates nothing and
can be captured in a CUDA graph. The same code runs on the torch references (backend="reference").
Prompts go through `prefill` (model/prefill.py: T tokens of one row per step, on tensor cores),
which leaves the state exactly as decode steps would.

Per layer (ops in `model.ops`, fused weights in `model.weights`):
  GDN:        norm_gemv(in_proj) -> gated_delta_step (conv1d_update first, + gated RMSNorm) -> gemv(out_proj)
  attention:  norm_gemv(qkv) -> qk_norm_rope_store -> decode_attention (x sigmoid gate) -> gemv(o_proj)
  then        norm_gemv(router + shared gate/up + shared gate, route: + router_topk) -> moe_experts
and finally add_rmsnorm -> gemv(lm_head). Weights may be int4 (QuantizedLinear in the linear fields,
docs/int4.md): the ops dispatch on the weight's type (model/ops/dispatch.py), so the step is the
same code, capturable alike; the constructor checks every field against the config
(model.quant.layout.check_decoder_weights). Inside the layers each RMSNorm (with the residual add
before it) runs in the prologue of the projection that consumes it (norm_gemv): the residual
stream alternates between two buffers, since every program of that kernel reads the old residual
while one of them stores the new one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import LINEAR, ModelConfig
from .ops.gated_delta.step import ConvIn, gated_delta_conv_counters
from .ops.moe.route import Route, route_counter
from .state import DecodeState
from .weights import ModelWeights

BACKENDS = ("reference", "triton")


def resolve_ops(backend: str):
    """The op namespace of a backend (`model.ops.backend(name)`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from . import ops

    return ops.backend(backend)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq [R/2] in fp32, computed as transformers does (on the host, then moved)."""
    R = cfg.rotary_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.int64).float() / R))


class Decoder:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, max_batch: int, max_seq: int,
                 backend: str = "triton"):
        if weights.cfg != cfg:
            raise ValueError(f"weights were built for a different config ({weights.cfg.name}, "
                             f"{weights.cfg.num_layers} layers) than the decoder's ({cfg.name}, {cfg.num_layers} layers)")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not isinstance(max_seq, int) or max_seq < 1:
            raise ValueError(f"max_seq must be an int >= 1, got {max_seq!r}")
        self._check_weights(weights)
        self.cfg, self.weights = cfg, weights
        self.max_batch, self.max_seq, self.backend = max_batch, max_seq, backend
        self.device, self.dtype = weights.device, weights.dtype
        if backend == "triton" and self.device.type not in ("cuda", "meta"):
            from .settings import SETTINGS
            if not SETTINGS.interpret:
                raise ValueError(f"backend='triton' needs a CUDA device (or TRITON_INTERPRET=1; "
                                 f"'meta' plans launches only), the weights are on {self.device}")
        self.ops = resolve_ops(backend)
        from .ops.linear import MAX_BATCH

        if backend == "triton" and max_batch > MAX_BATCH:
            raise ValueError(f"max_batch={max_batch}: the Triton GEMV handles batches up to {MAX_BATCH}")
        self.state = DecodeState(cfg, max_batch, max_seq, self.device, self.dtype)
        # host-side bookkeeping per row: the position its next step must have (None: unknown, the
        # last step's positions stayed on the device)
        self.next_positions: list[int | None] = [0] * max_batch
        self._prefill = None     # the chunked prefill step, made on first use (prefill_step())
        self._alloc_workspaces()

    def _check_weights(self, weights: ModelWeights) -> None:
        """Shapes as the config says, and int4 (QuantizedLinear) only where a kernel reads it (a
        sharded decoder, model/parallel, checks its shard's shapes instead)."""
        from .quant.layout import check_decoder_weights

        check_decoder_weights(weights)

    # ---- buffers --------------------------------------------------------------------------------
    def _alloc_workspaces(self):
        cfg, B, dev, dt = self.cfg, self.max_batch, self.device, self.dtype
        H = cfg.hidden_size

        def buf(*shape, dtype=dt):
            return torch.zeros(shape, device=dev, dtype=dtype)

        self.residual = buf(B, H)
        self.residual_alt = buf(B, H)    # the residual stream ping-pongs between the two
        self.normed = buf(B, H)
        self.mixer_out = buf(B, H)
        self.moe_out = buf(B, H)
        self.logits = buf(B, cfg.vocab_size)
        # GDN
        self.gdn_proj = buf(B, cfg.gdn_in_proj_rows)
        self.conv_out = buf(B, cfg.conv_dim)
        self.gdn_out = buf(B, cfg.linear_value_dim)
        self.gdn_counters = self.ops.gated_delta_workspace(B, cfg.linear_num_value_heads, dev)
        self.conv_counters = gated_delta_conv_counters(B, cfg.linear_num_key_heads, dev)   # the fused conv's
        # attention
        NH, D = cfg.num_attention_heads, cfg.head_dim
        self.attn_proj = buf(B, cfg.attn_qkv_rows)
        self.q = buf(B, NH, D)
        self.attn_out = buf(B, NH * D)
        self.inv_freq = rope_inv_freq(cfg).to(dev)
        self.attn_ws = self.ops.attention_workspace(B, NH, D, self.max_seq, dev)
        # set to 1 on the device when a step's position is outside the cache (nothing is written then)
        self.kv_error_flag = torch.zeros(1, device=dev, dtype=torch.int32)
        # MoE
        k = cfg.num_experts_per_tok
        self.router_shared = buf(B, cfg.router_shared_rows)
        self.topk_weights = buf(B, k)
        self.topk_ids = buf(B, k, dtype=torch.int32)
        self.route_counter = route_counter(dev)   # the fused router's (moe/route.py): zero between steps
        self.moe_ws = self.ops.moe_workspace(B, k, cfg.moe_intermediate_size, dt, dev)

    # ---- public API -----------------------------------------------------------------------------
    def reset(self, row: int | None = None) -> None:
        """Forget the sequence in `row` (all rows when None: also clears kv_error_flag): zero its KV
        cache and GDN states; its next step must be at position 0."""
        self.state.reset(row)
        if row is None:
            self.kv_error_flag.zero_()
            self.gdn_counters.zero_()   # zero after every step already; a reset makes sure
            self.route_counter.zero_()
            self.conv_counters.zero_()
            self.next_positions = [0] * self.max_batch
        else:
            self.next_positions[row] = 0

    def check_kv_error(self) -> None:
        """Raise ValueError if a step since the last full reset had a position outside the cache
        (the device-side flag the attention kernels set instead of writing; synchronises)."""
        if int(self.kv_error_flag.item()):
            raise ValueError(f"a decode step had a position outside the cache capacity max_seq={self.max_seq}; "
                             f"its K/V were not stored (kv_error_flag is set; reset() clears it)")

    @staticmethod
    def _host_list(values) -> list[int]:
        if isinstance(values, torch.Tensor):
            return values.reshape(-1).tolist()
        if isinstance(values, int):
            return [values]
        return [int(v) for v in values]

    def check_positions(self, positions, first_row: int = 0) -> None:
        """Raise ValueError (naming the row and the values) unless the host `positions` of rows
        first_row, first_row+1, ... are a valid next step: inside the cache (0 <= p < max_seq) and,
        for each row whose history is known, exactly one past its previous step (0 after a reset;
        a repeated, skipped or earlier position would corrupt the recurrent state or the cache).
        Host-side bookkeeping only: nothing is read from the device."""
        positions = self._host_list(positions)
        if first_row + len(positions) > self.max_batch:
            raise ValueError(f"{len(positions)} positions from row {first_row}: the decoder holds rows "
                             f"0..{self.max_batch - 1} (max_batch={self.max_batch})")
        for i, p in enumerate(positions):
            if not 0 <= p < self.max_seq:
                raise ValueError(f"position {p} (row {first_row + i}) is outside the cache capacity: "
                                 f"max_seq={self.max_seq} holds positions 0..{self.max_seq - 1}")
        for i, p in enumerate(positions):
            row = first_row + i
            want = self.next_positions[row]
            if want is not None and p != want:
                held = "nothing (reset)" if want == 0 else f"positions 0..{want - 1}"
                raise ValueError(f"row {row}: position {p} given, but the row holds {held}: its next step "
                                 f"must be at position {want} (positions advance by one per step; "
                                 f"reset({row}) starts the row over)")

    def check_tokens(self, tokens) -> None:
        """Raise ValueError naming the row and id when a host token id is outside the vocabulary."""
        V = self.cfg.vocab_size
        for row, t in enumerate(self._host_list(tokens)):
            if not 0 <= t < V:
                raise ValueError(f"token id {t} (row {row}) is outside the vocabulary [0, {V})")

    def advance_positions(self, positions, rows: int = 0, first_row: int = 0) -> None:
        """Record a step that ran: with host `positions`, each row's next position is p + 1; with
        None (the positions lived on the device and were not read), rows first_row..first_row+rows-1
        become unknown (only the cache bounds are checked for them until their next reset)."""
        if positions is None:
            for r in range(first_row, first_row + rows):
                self.next_positions[r] = None
            return
        for i, p in enumerate(self._host_list(positions)):
            self.next_positions[first_row + i] = p + 1

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row for rows 0..b-1 (tokens, positions: int64 [b] on the decoder's
        device); returns the [b, V] view of the static logits buffer.

        Where the decoder lives on the CPU the values are host values and are checked for free:
        token ids inside the vocabulary, positions inside the cache and one past each row's
        previous step (`check_positions`), else ValueError and nothing runs. On a GPU the values
        are not read (that would synchronise): check host copies with `check_tokens` /
        `check_positions` first (Generator.step does); the kernels never write outside the cache
        (they set kv_error_flag instead, see `check_kv_error`)."""
        b = self._check_inputs(tokens, positions)
        host = None
        if positions.device.type == "cpu":
            self.check_tokens(tokens)
            host = positions.tolist()
            self.check_positions(host)
        out = self._forward(tokens, positions, 0, b)
        self.advance_positions(host, b)
        return out

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The raw step a CUDA graph captures: like decode_step, but no value checks and no
        position bookkeeping (the caller owns both, as Generator does)."""
        b = self._check_inputs(tokens, positions)
        return self._forward(tokens, positions, 0, b)

    def prefill(self, prompts, start_positions=None, *, chunk_runner=None) -> torch.Tensor:
        """Feed prompt r into row r (r = 0..len(prompts)-1) through the chunked prefill step and
        return the [len(prompts), V] logits of each prompt's last token (a view of `logits`).

        start_positions None: every row starts over at position 0 (reset first). Otherwise
        start_positions[r] is where prompt r continues row r: 0 starts the row over, p > 0 must
        be the row's next position (a second chat turn appends after the first). Rows of
        different lengths are fine. All checks run on the host before anything is written
        (ValueError naming the row and value). Prompts longer than the step's chunk run as
        several chunks. `chunk_runner(tokens, info)` runs one chunk (a PrefillGraphs, say);
        by default the step runs eagerly."""
        prompts, starts = self._check_prefill(prompts, start_positions)
        step = self.prefill_step()
        run = chunk_runner if chunk_runner is not None else self._eager_chunk
        for r, (p, s) in enumerate(zip(prompts, starts)):
            if s == 0:
                self.reset(r)
            for off in range(0, len(p), step.chunk):
                piece = p[off:off + step.chunk]
                info = torch.tensor([r, s + off, len(piece)], dtype=torch.int64)
                logits = run(torch.tensor(piece, dtype=torch.int64), info)
            self.logits[r:r + 1].copy_(logits)
            self.next_positions[r] = s + len(p)
        return self.logits[:len(prompts)]

    def prefill_step(self, chunk: int | None = None):
        """The chunked prefill step over this decoder (created on first use; `chunk` tokens per
        step, default model.prefill.DEFAULT_CHUNK, never more than the cache holds; a different
        chunk makes a new step)."""
        from .prefill import DEFAULT_CHUNK

        want = min(DEFAULT_CHUNK, self.max_seq) if chunk is None else min(chunk, self.max_seq)
        if self._prefill is None or (chunk is not None and self._prefill.chunk != want):
            self._prefill = self._prefill_class()(self, want)
        return self._prefill

    def _prefill_class(self):
        from .prefill import PrefillStep

        return PrefillStep

    def _eager_chunk(self, tokens, info):
        return self._prefill.forward(tokens.to(self.device), info.to(self.device))

    def _check_prefill(self, prompts, start_positions):
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        n = len(prompts)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"{n} prompts; the decoder holds 1..{self.max_batch} rows")
        prompts = [self._host_list(p) if not isinstance(p, (list, tuple)) else [int(t) for t in p]
                   for p in prompts]
        if start_positions is None:
            starts = [0] * n
        else:
            starts = self._host_list(start_positions)
            if len(starts) != n:
                raise ValueError(f"{len(starts)} start positions for {n} prompts")
        V = self.cfg.vocab_size
        for r, (p, s) in enumerate(zip(prompts, starts)):
            if not p:
                raise ValueError(f"prompt {r} is empty")
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt {r}: token id {bad[0]} outside the vocabulary [0, {V})")
            if s < 0:
                raise ValueError(f"start position {s} (row {r}) is negative")
            want = self.next_positions[r]
            if s > 0 and want is not None and s != want:
                held = "nothing (reset)" if want == 0 else f"positions 0..{want - 1}"
                raise ValueError(f"row {r}: start position {s} given, but the row holds {held}: a prompt "
                                 f"continues the row at position {want} (or starts it over at 0)")
            if s + len(p) > self.max_seq:
                at = f" from position {s}" if s else ""
                raise ValueError(f"prompt {r} has {len(p)} tokens{at}: position {s + len(p) - 1} is outside "
                                 f"the cache capacity max_seq={self.max_seq}")
        return prompts, starts

    # ---- the step -------------------------------------------------------------------------------
    def _check_inputs(self, tokens, positions) -> int:
        for name, t in (("tokens", tokens), ("positions", positions)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the decoder on {self.device}")
        b = tokens.shape[0]
        if positions.shape[0] != b:
            raise ValueError(f"tokens has {b} rows, positions {positions.shape[0]}")
        if not 1 <= b <= self.max_batch:
            raise ValueError(f"batch {b} outside 1..max_batch={self.max_batch}")
        return b

    def _forward(self, tokens, positions, r0: int, r1: int) -> torch.Tensor:
        ops, w = self.ops, self.weights
        n = r1 - r0
        res = (self.residual[:n], self.residual_alt[:n])
        mixer_out, moe_out = self.mixer_out[:n], self.moe_out[:n]
        self._embed(tokens, res[0])
        cur, delta = 0, None      # the next norm's input: res[cur] (+ delta), written to res[1 - cur]
        for i, L in enumerate(w.layers):
            norm_in = _NormIn(delta, res[cur], L.input_norm, res[1 - cur] if delta is not None else None)
            cur = 1 - cur if delta is not None else cur
            if L.kind == LINEAR:
                self._gdn(i, L.mixer, norm_in, mixer_out, r0, r1)
            else:
                self._attention(i, L.mixer, norm_in, mixer_out, positions, r0, r1)
            self._moe(L.moe, _NormIn(mixer_out, res[cur], L.post_norm, res[1 - cur]), moe_out, n)
            cur, delta = 1 - cur, moe_out
        # the final norm stays a kernel of its own: the lm_head has ~60k programs at 35b-a3b
        # widths, and each recomputing the norm in its prologue costs more than the kernel
        normed, logits = self.normed[:n], self.logits[r0:r1]
        ops.add_rmsnorm(delta, res[cur], w.final_norm, self.cfg.rms_norm_eps, normed)
        self._lm_head(normed, logits)
        return logits

    # The steps that model/parallel's ParallelDecoder replaces (a sharded vocabulary, local experts)
    def _embed(self, tokens, out) -> None:
        torch.index_select(self.weights.embed, 0, tokens, out=out)

    def _lm_head(self, normed, logits) -> None:
        self.ops.gemv(normed, self.weights.lm_head, logits)

    def _local_experts(self) -> tuple | None:
        """(start, count) of the experts this decoder holds (expert parallel), None for all."""
        return None

    def _norm_gemv(self, norm_in: "_NormIn", w, out, **kw) -> None:
        # normed rows always go to the static buffer: the experts read them after the router
        # projection, and the tensor-core path (batch >= 2) needs it for its norm kernel
        self.ops.norm_gemv(norm_in.x, norm_in.residual, norm_in.weight, self.cfg.rms_norm_eps, w, out,
                           residual_out=norm_in.residual_out, normed_out=self.normed[:out.shape[0]], **kw)

    def _gdn(self, i, m, norm_in, out, r0, r1):
        cfg, ops, n = self.cfg, self.ops, r1 - r0
        C, VD, NV = cfg.conv_dim, cfg.linear_value_dim, cfg.linear_num_value_heads
        proj = self.gdn_proj[:n]
        self._norm_gemv(norm_in, m.in_proj, proj)
        qkv, z = proj[:, :C], proj[:, C:C + VD]
        b, a = proj[:, C + VD:C + VD + NV], proj[:, C + VD + NV:]
        # the conv1d first (inside the gated-delta kernel where gated_delta/step.py allows)
        conv = ConvIn(self.state.conv_state(i)[r0:r1], m.conv, self.conv_counters, self.conv_out[:n])
        gdn_out = self.gdn_out[:n]
        ops.gated_delta_step(qkv, a, b, m.A_log, m.dt_bias, self.state.recurrent_state(i)[r0:r1], gdn_out,
                             cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                             z=z, norm_weight=m.norm, eps=cfg.rms_norm_eps, workspace=self.gdn_counters, conv=conv)
        ops.gemv(gdn_out, m.out_proj, out)

    def _attention(self, i, m, norm_in, out, positions, r0, r1):
        cfg, ops, n = self.cfg, self.ops, r1 - r0
        NH, NKV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        proj = self.attn_proj[:n]
        self._norm_gemv(norm_in, m.qkv, proj)
        k_cache, v_cache = self.state.k(i)[r0:r1], self.state.v(i)[r0:r1]
        q = self.q[:n]
        ops.qk_norm_rope_store(proj, m.q_norm, m.k_norm, positions, self.inv_freq, k_cache, v_cache, q,
                               self.kv_error_flag, cfg.rms_norm_eps, NH, NKV, D)
        attn_out = self.attn_out[:n]
        ops.decode_attention(q, k_cache, v_cache, positions, proj, D ** -0.5, attn_out, self.attn_ws)
        ops.gemv(attn_out, m.o_proj, out)

    def _moe(self, m, norm_in: "_NormIn", out, n):
        cfg, ops = self.cfg, self.ops
        E, Is = cfg.num_experts, cfg.shared_expert_intermediate_size
        rs, normed = self.router_shared[:n], self.normed[:n]
        tw, ti = self.topk_weights[:n], self.topk_ids[:n]
        # the router's top-k of rs[:, :E] too (in the GEMV's epilogue where moe/route.py allows);
        # normed is stored as well, which the experts read
        route = Route(E, cfg.num_experts_per_tok, tw, ti, self._local_experts(), self.route_counter)
        self._norm_gemv(norm_in, m.router_shared, rs, route=route)
        ops.moe_experts(normed, m.gate_up_proj, m.down_proj, ti, tw, rs[:, E:E + 2 * Is], m.shared_down,
                        rs[:, E + 2 * Is], self.moe_ws, out)


class _NormIn(NamedTuple):
    """A norm fused into the next projection: rms(residual (+ x)) * (1 + weight); with x, the sum
    is also the new residual, stored into residual_out."""
    x: torch.Tensor | None
    residual: torch.Tensor
    weight: torch.Tensor
    residual_out: torch.Tensor | None
