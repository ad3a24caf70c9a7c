"""Chunked prefill: T tokens of one row per step, on tensor cores, into the decoder's state.

`PrefillStep(decoder, chunk).forward(tokens[T], info[3])` runs one chunk of one row's prompt and
returns the [1, V] logits of its last valid token. `info` = (row, start, n_valid) lives on the
device (int64): the chunk's tokens sit at positions start .. start + n_valid - 1 of `row`, and
tokens t >= n_valid are padding that changes no state, cache slot or logit (so one CUDA graph per
chunk size serves every row, start and length: `PrefillGraphs`). Every intermediate lives in a
workspace sized once for `chunk` tokens, so a step allocates nothing of its own.

Per layer, with the same rounding points as transformers' qwen3_5_moe prefill:
  add_rmsnorm (residual += previous block's output) -> GEMM (cuBLAS, torch.mm out=; linear())
  GDN:        conv1d_prefill -> gated_delta_chunk -> gated_rmsnorm -> GEMM(out_proj)
  attention:  qk_norm_rope_store_prefill (K/V into the cache) -> prefill_attention -> GEMM(o_proj)
  MoE:        add_rmsnorm -> GEMM(router + shared gate/up + shared gate) -> router_topk
              -> moe_experts_grouped (grouped GEMMs over the experts, shared expert, combine)
and at the end the last valid token's row: add_rmsnorm -> lm_head GEMV.

int4 weights (a ModelWeights from model.quant.layout, its linears QuantizedLinear): each GEMM, the
grouped experts and the lm_head take the backend's int4 op instead (ops.gemm_int4,
ops.moe_experts_grouped_int4, ops.gemv_int4: the weight tiles dequantized in registers), chosen per
weight; the workspaces are the same.
"""
from __future__ import annotations

import torch

from .config import LINEAR
from .ops._util import pdl_allowed
from .ops.linear.dense import aligned_width, mm_rows_aligned
from .quant.format import QuantizedLinear
from .settings import SETTINGS

# Token buckets of the prefill graphs; a prompt is cut into chunks of at most the largest.
DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# 4096: the fastest of 512 ... 4096 at 1k-16k prompts on an H200 (docs/benchmarks.md, chunk sweep)
DEFAULT_CHUNK = DEFAULT_BUCKETS[-1]


def check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill chunk must be an int >= 1 (tokens per prefill step), got {chunk!r}")
    return chunk


def buckets_for(chunk: int) -> tuple[int, ...]:
    """The graph buckets for a chunk size: the default ladder up to it, and the chunk itself."""
    chunk = check_chunk(chunk)
    return tuple(sorted({b for b in DEFAULT_BUCKETS if b < chunk} | {chunk}))


def linear(ops, x: torch.Tensor, w, out: torch.Tensor) -> None:
    """out = x @ w.T for a projection of the prefill: cuBLAS (mm_rows_aligned) for a plain weight,
    the backend's int4 GEMM (ops.gemm_int4) for a QuantizedLinear."""
    if isinstance(w, QuantizedLinear):
        ops.gemm_int4(x, w, out)
    else:
        mm_rows_aligned(x, w, out)


class PrefillStep:
    """Workspaces for chunks of up to `chunk` tokens and the raw chunk step over `decoder`'s
    weights and state (the decoder's backend: Triton kernels or the torch references)."""

    def __init__(self, decoder, chunk: int = DEFAULT_CHUNK):
        self.decoder = decoder
        self.chunk = check_chunk(chunk)
        self.cfg, self.ops = decoder.cfg, decoder.ops
        self._alloc(decoder.device, decoder.dtype)

    @classmethod
    def workspace_bytes(cls, cfg, chunk: int, dtype, backend: str = "triton") -> int:
        """nbytes() of a step of `chunk` tokens, from shapes alone (meta tensors: nothing allocated)."""
        from . import ops

        plan = cls.__new__(cls)
        plan.cfg, plan.chunk, plan.ops = cfg, check_chunk(chunk), ops.backend(backend)
        plan._alloc("meta", dtype)
        return plan.nbytes()

    def _alloc(self, dev, dt):
        cfg, C = self.cfg, self.chunk

        def buf(*shape, dtype=dt):
            return torch.zeros(shape, device=dev, dtype=dtype)

        H = cfg.hidden_size
        self.residual, self.normed = buf(C, H), buf(C, H)
        self.mixer_out, self.moe_out = buf(C, H), buf(C, H)
        self.gdn_proj = buf(C, cfg.gdn_in_proj_rows)
        self.conv_out = buf(C, cfg.conv_dim)
        self.gdn_raw, self.gdn_out = buf(C, cfg.linear_value_dim), buf(C, cfg.linear_value_dim)
        self.gdn_ws = self.ops.gated_delta_chunk_workspace(C, cfg.linear_num_value_heads, dev)
        NH, D = cfg.num_attention_heads, cfg.head_dim
        self.attn_proj = buf(C, cfg.attn_qkv_rows)
        self.q = buf(C, NH, D)
        self.attn_out = buf(C, NH * D)
        k = cfg.num_experts_per_tok
        # rows padded (aligned_width), so that linear()'s aligned part writes 16-byte aligned rows
        self.router_shared = buf(C, aligned_width(cfg.router_shared_rows))
        self.topk_weights = buf(C, k)
        self.topk_ids = buf(C, k, dtype=torch.int32)
        self.moe_ws = self.ops.moe_grouped_workspace(C, k, self._experts_held(), H, cfg.moe_intermediate_size,
                                                     cfg.shared_expert_intermediate_size, dt, dev)
        # the last valid token's row: its index (n_valid - 1), hidden rows, logits
        self.last_index = torch.zeros(1, device=dev, dtype=torch.int64)
        self.last_x, self.last_res, self.last_normed = buf(1, H), buf(1, H), buf(1, H)
        self.logits = buf(1, cfg.vocab_size)

    def nbytes(self) -> int:
        """Workspace bytes: the memory a prefill adds to the decoder's (cuBLAS's own aside)."""
        found = []
        for name, v in vars(self).items():
            if name in ("decoder", "cfg", "ops"):
                continue
            found += [v] if isinstance(v, torch.Tensor) else \
                [t for t in getattr(v, "__dict__", {}).values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in found)

    # ---- the step -------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        """One chunk: tokens int64 [T] (T <= chunk, padding past n_valid), info int64 [3] =
        (row, start, n_valid), both on the decoder's device. No value checks (Decoder.prefill
        does them on the host); returns the [1, V] logits of token n_valid - 1. Its kernels are
        launched without PDL unless MODEL_PREFILL_PDL=1 (model/settings.py says why)."""
        with pdl_allowed(SETTINGS.prefill_pdl):
            return self._forward(tokens, info)

    def _forward(self, tokens: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        ops, w, cfg = self.ops, self.decoder.weights, self.cfg
        T = tokens.shape[0]
        if not 1 <= T <= self.chunk:
            raise ValueError(f"a prefill step takes 1..{self.chunk} tokens, got {T}")
        eps = cfg.rms_norm_eps
        res, normed = self.residual[:T], self.normed[:T]
        mixer_out, moe_out = self.mixer_out[:T], self.moe_out[:T]
        self._embed(tokens, res)
        for i, L in enumerate(w.layers):
            if i == 0:
                ops.rmsnorm(res, L.input_norm, eps, normed)
            else:
                ops.add_rmsnorm(moe_out, res, L.input_norm, eps, normed)
            if L.kind == LINEAR:
                self._gdn(i, L.mixer, normed, mixer_out, info)
            else:
                self._attention(i, L.mixer, normed, mixer_out, info)
            ops.add_rmsnorm(mixer_out, res, L.post_norm, eps, normed)
            self._moe(L.moe, normed, moe_out, info)
        # only the last valid token needs the final norm and the lm_head
        torch.sub(info[2:3], 1, out=self.last_index)
        self.last_index.clamp_(min=0)   # n_valid = 0 (an all-padding chunk) must index in range
        torch.index_select(moe_out, 0, self.last_index, out=self.last_x)
        torch.index_select(res, 0, self.last_index, out=self.last_res)
        ops.add_rmsnorm(self.last_x, self.last_res, w.final_norm, eps, self.last_normed)
        self._lm_head(self.last_normed, self.logits)
        return self.logits

    # The steps that model/parallel's ParallelPrefillStep replaces (a sharded vocabulary, local experts)
    def _experts_held(self) -> int:
        return self.cfg.num_experts

    def _embed(self, tokens, out) -> None:
        torch.index_select(self.decoder.weights.embed, 0, tokens, out=out)

    def _lm_head(self, normed, logits) -> None:
        self.ops.gemv(normed, self.decoder.weights.lm_head, logits)   # int4 or not: ops/dispatch.py chooses

    def _route(self, router_logits, topk_weights, topk_ids) -> None:
        self.ops.router_topk(router_logits, self.cfg.num_experts_per_tok, topk_weights, topk_ids)

    def _gdn(self, i, m, x, out, info):
        cfg, ops, st = self.cfg, self.ops, self.decoder.state
        T = x.shape[0]
        C, VD, NV = cfg.conv_dim, cfg.linear_value_dim, cfg.linear_num_value_heads
        proj = self.gdn_proj[:T]
        linear(ops, x, m.in_proj, proj)
        qkv, z = proj[:, :C], proj[:, C:C + VD]
        b, a = proj[:, C + VD:C + VD + NV], proj[:, C + VD + NV:]
        conv_out, raw, normed = self.conv_out[:T], self.gdn_raw[:T], self.gdn_out[:T]
        ops.conv1d_prefill(qkv, st.conv[st.slot[i]], m.conv, conv_out, info)
        ops.gated_delta_chunk(conv_out, a, b, m.A_log, m.dt_bias, st.recurrent[st.slot[i]], raw, info,
                              cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                              workspace=self.gdn_ws)
        ops.gated_rmsnorm(raw, z, m.norm, cfg.rms_norm_eps, normed)
        linear(ops, normed, m.out_proj, out)

    def _attention(self, i, m, x, out, info):
        cfg, ops, st, dec = self.cfg, self.ops, self.decoder.state, self.decoder
        T = x.shape[0]
        NH, NKV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        proj, q, attn_out = self.attn_proj[:T], self.q[:T], self.attn_out[:T]
        linear(ops, x, m.qkv, proj)
        ops.qk_norm_rope_store_prefill(proj, m.q_norm, m.k_norm, info, dec.inv_freq, st.k(i), st.v(i), q,
                                       dec.kv_error_flag, cfg.rms_norm_eps, NH, NKV, D)
        ops.prefill_attention(q, st.k(i), st.v(i), info, proj, D ** -0.5, attn_out)
        linear(ops, attn_out, m.o_proj, out)

    def _moe(self, m, x, out, info):
        cfg, ops = self.cfg, self.ops
        T = x.shape[0]
        E, Is = cfg.num_experts, cfg.shared_expert_intermediate_size
        rs = self.router_shared[:T, :cfg.router_shared_rows]
        linear(ops, x, m.router_shared, rs)
        tw, ti = self.topk_weights[:T], self.topk_ids[:T]
        self._route(rs[:, :E], tw, ti)
        experts = ops.moe_experts_grouped_int4 if isinstance(m.gate_up_proj, QuantizedLinear) \
            else ops.moe_experts_grouped
        experts(x, m.gate_up_proj, m.down_proj, ti, tw, rs[:, E:E + 2 * Is], m.shared_down, rs[:, E + 2 * Is],
                self.moe_ws, out, info)


class PrefillGraphs:
    """The prefill step replayed as CUDA graphs through one cugraph_rt.GraphHandle: a bucket per
    chunk size along the token dimension (a short chunk is padded up into its bucket, and the
    padding changes nothing), `info` passed unpadded to every bucket."""

    def __init__(self, step: PrefillStep, buckets=None):
        from cugraph_rt import GraphHandle

        self.step = step
        self.buckets = tuple(buckets) if buckets is not None else buckets_for(step.chunk)
        if max(self.buckets) > step.chunk:
            raise ValueError(f"prefill buckets {self.buckets} exceed the step's chunk of {step.chunk} tokens")
        dev = step.decoder.device
        example = {"tokens": torch.zeros(max(self.buckets), dtype=torch.int64, device=dev),
                   "info": torch.zeros(3, dtype=torch.int64, device=dev)}
        # one eager warmup per bucket (Triton JIT, cuBLAS workspaces), made explicitly by prepare()
        self.handle = GraphHandle(step.forward, example, warmup=len(self.buckets), buckets=self.buckets,
                                  bucketed={"tokens"})
        self._prepared = False

    def prepare(self, row: int = 0) -> None:
        """Warm up every bucket with a one-token chunk at position 0 of `row`, then capture them
        all. This writes that row's state: the caller resets it afterwards (Decoder.prefill
        does). One-time start-up, reported on its own by the tools."""
        if self._prepared:
            return
        info = torch.tensor([row, 0, 1], dtype=torch.int64)
        for b in self.buckets:
            self.handle(tokens=torch.zeros(b, dtype=torch.int64), info=info)
        self.handle(tokens=torch.zeros(self.buckets[0], dtype=torch.int64), info=info)   # captures
        self._prepared = True

    def __call__(self, tokens: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return self.handle(tokens=tokens, info=info)

    def close(self) -> None:
        self.handle.close()
