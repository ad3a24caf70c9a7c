"""Decode-step operators. Each module holds a Triton kernel beside a plain-torch reference of the
same math; `reference` and `triton` below are the two backends the decoder runs on
(`ops = model.ops.backend("triton" | "reference")`, then `ops.gemv(...)` etc.).

Contract shared by both backends (every function, same signature, same semantics):
- Outputs are written into caller-provided tensors (`out=` and friends) and nothing is returned
  unless stated; the Triton versions allocate nothing, sync nothing and autotune nothing, so a
  decode step can be captured in a CUDA graph (workspaces are passed in, sized by the helpers).
- `B` is the batch (one sequence per row), `H` the hidden size; activations are in the model
  dtype (bf16 or fp32), accumulation in fp32; rounding points follow transformers' qwen3_5_moe.
- A "row" argument [B, N] may be a column slice of a wider buffer (e.g. of a fused projection
  output): its rows must have unit inner stride, the row stride is free. Weights, caches, states
  and workspaces are contiguous.

Weights: `w`, `gate_up_proj`, `down_proj` and `shared_down` may be model.quant.QuantizedLinear
(int4, docs/int4.md): gemv, norm_gemv and moe_experts then run their int4 forms (dispatch.py; the
experts all int4 or none), which dequantize exactly as QuantizedLinear.dequantize in registers.

linear.gemv(x[B,K], w[N,K], out[B,N])                         out = x @ w.T   (B <= 16)
linear.norm_gemv(x[B,K] or None, residual[B,K], norm_weight[K], eps, w[N,K], out[B,N],
                 residual_out=None, normed_out=None, route=None)
                                                              h = residual (+ x), n = rms(h) * (1 + nw),
                                                              out = n @ w.T; residual_out = h and
                                                              normed_out = n when given (neither may
                                                              overlap x or residual); route (moe.route.
                                                              Route): then moe.router_topk of out's
                                                              first route.num_experts columns
norm.rmsnorm(x[B,H], weight[H], eps, out[B,H])                out = rms(x) * (1 + w)
norm.add_rmsnorm(x[B,H], residual[B,H], weight[H], eps, out)  residual += x (rounded to dtype),
                                                              out = rmsnorm(residual)
norm.gated_rmsnorm(o[B,NV*V] or [B,NV,V], z[B,NV*V], weight[V], eps, out[B,NV*V])
                                                              out = (norm(o) * w) * silu(z), no 1+
conv.conv1d_update(x[B,C], conv_state[B,C,W], weight[C,W], out[B,C])
                                                              state <- [state[:,:,1:], x];
                                                              out = silu(sum_j w[:,j] * state[:,:,j])
gated_delta.gated_delta_step(qkv[B,2*NK*K+NV*V], a[B,NV], b[B,NV], A_log[NV], dt_bias[NV],
                             state[B,NV,K,V] fp32 (in place), out[B,NV*V] or [B,NV,V], NK, K, V,
                             z=None, norm_weight=None, eps=1e-6, workspace=None, conv=None)
                                                              qkv is the conv output (with conv, a
                                                              gated_delta.ConvIn, its input: then
                                                              conv1d_update first); out = o, or
                                                              with z/norm_weight the fused
                                                              gated_rmsnorm(o, z, norm_weight, eps)
attention.qk_norm_rope_store(qkv[B, NH*2D + 2*NKV*D], q_norm_w[D], k_norm_w[D], positions[B] int64,
                             inv_freq[R/2] fp32, k_cache[B,NKV,S,D], v_cache[B,NKV,S,D],
                             q_out[B,NH,D], err[>=1] int32, eps, NH, NKV, D)
                                                              q: per head first D of 2D (next D
                                                              is the gate); q/k norm (1+w), rope
                                                              on first R dims; k, v stored at
                                                              positions[b]; a position outside
                                                              [0, S) is not stored and sets
                                                              err[0] = 1 (device side)
attention.decode_attention(q[B,NH,D], k_cache, v_cache, positions[B], qkv[B, >=NH*2D], scale,
                           out[B,NH*D], workspace)            attend to 0..min(positions[b], S-1),
                                                              x sigmoid(gate), gate of head h =
                                                              qkv[:, h*2D+D : h*2D+2D]
moe.router_topk(logits[B,E], top_k, weights_out[B,k] (logits dtype), ids_out[B,k] int32,
                local_experts=None)                           softmax fp32, top-k descending,
                                                              renormalised; local_experts=(start,
                                                              n): ids id-start in range, else -1
moe.moe_experts(x[B,H], gate_up_proj[E,2I,H], down_proj[E,H,I], ids[B,k] int32, weights[B,k],
                shared_gate_up[B,2Is], shared_down[H,Is], shared_gate_logit[B] or [B,1], act_ws,
                out[B,H])                                     routed experts + sigmoid(logit) x
                                                              shared expert (no residual add); an
                                                              id < 0 (another rank's expert) adds
                                                              nothing, its weights are not read
sampling.sample(logits[B,V], params[B,3] fp32 (temperature, top_k, top_p), rng_state[2] int64
                (seed, counter; counter += 1 on device), out_tokens[B] int64, workspace)
                                                              greedy when temperature <= 0
sampling.Sampler(vocab_size, batch, sampling (has .temperature/.top_k/.top_p/.seed), device)
                                                              owns params/rng/workspace;
                                                              sampler(logits, out_tokens), reset()

Chunked prefill (T tokens of ONE row per call; `info` = int64 [3] (row, start, n_valid) on the
device: tokens sit at positions start..start+n_valid-1 of `row`; tokens t >= n_valid are padding
and change no state, cache slot or other token's output; the Triton ops read info only on the
device, so one CUDA graph per T serves every row, start and length):
conv.conv1d_prefill(x[T,C], conv_state[B,C,W] (row in place), weight[C,W], out[T,C], info)
                                                              = conv1d_update per valid token
gated_delta.gated_delta_chunk(qkv[T,..], a[T,NV], b[T,NV], A_log, dt_bias, state[B,NV,K,V] fp32
                              (row in place), out[T,NV*V], info, NK, K, V, workspace=None)
                                                              = gated_delta_step per valid token
                                                              (chunked form, 64-token chunks);
                                                              raw o (gated_rmsnorm separately)
attention.qk_norm_rope_store_prefill(qkv[T,..], q_norm_w, k_norm_w, info, inv_freq, k_cache, v_cache,
                                     q_out[T,NH,D], err, eps, NH, NKV, D)
                                                              = qk_norm_rope_store per valid token
attention.prefill_attention(q[T,NH,D], k_cache, v_cache, info, qkv[T,..], scale, out[T,NH*D])
                                                              query t attends to 0..start+t of row;
                                                              x sigmoid(gate); padding rows -> 0
moe.moe_experts_grouped(x[T,H], gate_up_proj, down_proj, ids[T,k], weights[T,k], shared_gate_up,
                        shared_down, shared_gate_logit, workspace, out[T,H], info=None)
                                                              = moe_experts over T rows, as
                                                              grouped GEMMs (tokens grouped by
                                                              expert on the device); ids < 0
                                                              skipped as in moe_experts
gated_delta_chunk_workspace(T, NV, device); moe_grouped_workspace(T, k, E, H, I, Is, dtype, device)

int4 weights in the chunked prefill (w, gate_up_proj, down_proj, shared_down QuantizedLinear; each
equals the op on the weight dequantized to x's dtype, up to the fp32 summation order; docs/int4.md):
linear.gemm_int4(x[T,K], w[N,K] int4, out[T,N])               out = x @ dequant(w).T (any T; the
                                                              prefill's torch.mm for int4 weights)
linear.gemv_int4(x[B,K], w[N,K] int4, out[B,N])               gemv on an int4 weight (the lm_head)
moe.moe_experts_grouped_int4(same arguments as moe_experts_grouped, the three weights int4)

Workspace sizing (same for both backends; allocate once, before capture; the reference backend
accepts and ignores them):
attention_workspace_numel(B, NH, D, S) fp32 / attention_workspace(B, NH, D, S, device)
    = B * NH * attention_num_splits(S) * (D + 2), attention_num_splits(S) = min(128, ceil(S / 16));
    the context of each row is split evenly over those programs on the device (from positions)
moe_workspace_numel(B, k, I) model dtype / moe_workspace(B, k, I, dtype, device) = B * k * I
gated_delta_workspace(B, NV, device) -> int32 zeros [B * NV]: per-head arrival counters that let the
    fused-norm step split a head's value columns over programs (left at zero after every step)
sample_workspace_numel(B, V) fp32 = B * (1 + 2 * nblk + 64 * nblk), nblk = ceil(V / 2048);
make_params(B, temperature, top_k, top_p, device) -> params[B, 3]; make_rng_state(seed, device)

Known limits: gemv B <= 16; sampling's fast filter path needs 0 < top_k <= 64 (top-p alone or a
larger top_k falls back to a correct but slow full-row bisection, ~1 ms at 248k vocabulary); MoE
rows that pick the same expert read its weights once per row.
"""
from __future__ import annotations

import importlib

BACKENDS = ("triton", "reference")


def backend(name: str):
    """The op namespace of a backend: "triton" (kernels) or "reference" (plain torch)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; expected one of {BACKENDS}")
    return importlib.import_module(f"{__name__}.{name}")
