"""Decode-step operators. Each module holds a Triton kernel beside a plain-torch reference of the
same math; `reference` and `triton` below are the two backends the decoder runs on.

Contract shared by both backends (every function, same signature, same semantics):
- Outputs are written into caller-provided tensors (`out=` and friends) and nothing is returned
  unless stated; the Triton versions allocate nothing, so a decode step can be captured.
- `B` is the batch (one sequence per row), `H` the hidden size; activations are in the model
  dtype (bf16 or fp32), accumulation in fp32; rounding points follow transformers' qwen3_5_moe.

linear.gemv(x[B,K], w[N,K], out[B,N])                         out = x @ w.T
norm.rmsnorm(x[B,H], weight[H], eps, out[B,H])                out = rms(x) * (1 + w)
norm.add_rmsnorm(x[B,H], residual[B,H], weight[H], eps, out)  residual += x (rounded to dtype),
                                                              out = rmsnorm(residual)
norm.gated_rmsnorm(o[B,NV,V], z[B,NV,V], weight[V], eps, out[B,NV*V])
                                                              out = (norm(o) * w) * silu(z), no 1+
conv.conv1d_update(x[B,C], conv_state[B,C,W], weight[C,W], out[B,C])
                                                              state <- [state[:,:,1:], x];
                                                              out = silu(sum_j w[:,j] * state[:,:,j])
gated_delta.gated_delta_step(qkv[B,2*NK*K+NV*V], a[B,NV], b[B,NV], A_log[NV], dt_bias[NV],
                             state[B,NV,K,V] fp32 (in place), out[B,NV,V], NK, K, V)
attention.qk_norm_rope_store(qkv[B, NH*2D + 2*NKV*D], q_norm_w[D], k_norm_w[D], positions[B],
                             inv_freq[R/2], k_cache[B,NKV,S,D], v_cache[B,NKV,S,D], q_out[B,NH,D],
                             eps, NH, NKV, D)                 q: per head first D of 2D (next D
                                                              is the gate); rope on first R dims
attention.decode_attention(q[B,NH,D], k_cache, v_cache, positions[B], gate (qkv view), scale,
                           out[B,NH*D], workspace)           attend to 0..positions[b], x sigmoid(gate)
moe.router_topk(logits[B,E], top_k, weights_out[B,k], ids_out[B,k] int32)
moe.moe_experts(x[B,H], gate_up_proj[E,2I,H], down_proj[E,H,I], ids[B,k], weights[B,k],
                shared_gate_up[B,2Is], shared_down[H,Is], shared_gate_logit[B], act_ws, out[B,H])
sampling.sample(logits[B,V], params, rng_state, out_tokens[B])   greedy or temperature/top-k/top-p
"""
