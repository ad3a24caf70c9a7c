"""Gated DeltaNet prefill: the gated delta rule over a chunk of T tokens of one sequence.

The math and rounding points are the decode step's (step.py) applied to tokens 0 .. n_valid - 1 in
order, on state row `row` (info = (row, start, n_valid), see the prefill contract): per token
S *= exp(g); S += k (x) beta (v - S^T k); o = S^T q, with l2-normalised fp32 q, k, q / sqrt(K),
beta = sigmoid(b) rounded to the model dtype, g = -exp(A_log) * softplus(a + dt_bias) in fp32.
`out` gets the raw o (model dtype); the caller applies the gated RMSNorm.

Chunked form (64-token chunks). Inside a chunk, with G_t the cumulative log-decay (G_t = sum of
g_s for s <= t), S the state at the chunk's start and u_t the update of token t
(S_t = e^{g_t} S_{t-1} + k_t u_t^T), unrolling the recurrence gives

    (I + A) U = diag(beta) (V - diag(e^G) K S)     A_ts = beta_t (k_t . k_s) e^{G_t - G_s}, s < t
    O = diag(e^G) Q S + P U                        P_ts = (q_t . k_s) e^{G_t - G_s},       s <= t
    S <- e^{G_last} S + (diag(e^{G_last - G}) K)^T U

T = (I + A)^-1 (the "UT transform" of the WY representation) and P depend on the chunk's q, k,
beta, g only, not on the state, so they are built for all chunks in parallel; only the small
products with the state are sequential. Padding tokens (t >= n_valid) get beta = g = 0 and
k = q = v = 0 inside the kernels, so they change nothing.

Kernels and grids (the performance note; timings: H100, 35b-a3b widths, 4,096 tokens, session 10):
- `_gdn_chunk_prep_kernel`, grid (chunks, value heads): every (chunk, head) at once (32 heads x 64
  chunks = 2048 programs at 4,096 tokens), nothing sequential. Builds A and P with tl.dot, inverts
  the unit lower triangular (I + A): its four 16x16 diagonal blocks by forward substitution, all
  four at once on a [4, 16, 16] tile (15 short steps, each reading its row of A from memory: taking
  it out of the register tile instead cost a layout conversion a step, 387 against 140 us), then
  the six off-diagonal blocks by block substitution with 16x16 dots. Writes T and P (fp32, 64 x 64
  per chunk and head) and the per-token factors the scan needs (below) to the workspace:
  NV * chunks * (2 * 64 * 64 + 5 * 64) * 4 bytes, 69 MiB at 35b-a3b and T = 4096.
- `_gdn_chunk_scan_kernel`, grid (value heads, V blocks): the sequential part. The delta rule
  updates the state's value columns independently, so each program owns a [K, BLOCK_V] slice of
  one head's fp32 state, keeps it in registers across the chunks and per chunk does five small
  tensor-core products with it (K S and Q S: [64, K] x [K, BLOCK_V]; T R and P U: [64, 64] x
  [64, BLOCK_V]; K^T U: [K, 64] x [64, BLOCK_V]). Everything of a chunk that does not depend on
  the state (the l2 norms, beta, the gates and their cumulative sum) comes from the prep as five
  vectors of 64 per (chunk, head): fq = e^G / (|q| sqrt(K)), fkb = beta e^G / |k|, beta,
  fkd = e^(G_last - G) / |k| and e^(G_last), which scale the rows of the raw q and k loaded from
  qkv. Computing them in the loop made each chunk wait on its own reductions (a loop with the
  loads and that work but no products took 253 us of the 524). BLOCK_V halves (down to 32) while
  the grid is under two programs per SM: 32 heads x 4 blocks = 128 programs at 35b-a3b (`block_v`
  overrides). The next chunk's tiles are loaded before this chunk's products (registers, by hand:
  the pipeliner's shared-memory stages overflow with these fp32 tiles).
Products run in fp32 ("ieee") for an fp32 model and in tf32 (fp32 accumulate) otherwise: the
output is rounded to bf16 anyway, and tf32 keeps the carried state ~8x closer to the exact
recurrence than the bf16 products of common chunked kernels (emulated at 2048 tokens: 7e-5
relative state error). `dot_precision` overrides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._util import FILL_PROGRAMS, as_rows, check_contiguous, check_info, check_rows, next_pow2, pdl, pdl_wait

__all__ = ["CHUNK", "gated_delta_chunk_workspace", "gated_delta_chunk_workspace_numel",
           "gated_delta_chunk_reference", "gated_delta_chunk_triton"]

CHUNK = 64          # tokens per chunk (the inversion below is written for 4 blocks of 16)
_PRECISIONS = ("ieee", "tf32")   # "tf32x3" faulted (illegal address) under Triton 3.6 on an H200


def _check(qkv, a, b, A_log, dt_bias, state, out, info, NK, K, V):
    if state.dim() != 4:
        raise ValueError(f"state must be [B, NV, K, V], got shape {tuple(state.shape)}")
    bsz, nv = state.shape[0], state.shape[1]
    check_contiguous("state", state, (bsz, nv, K, V))
    if state.dtype != torch.float32:
        raise TypeError(f"state must be float32, got {state.dtype}")
    if NK < 1 or nv % NK != 0:
        raise ValueError(f"value heads ({nv}) must be a multiple of key heads ({NK})")
    if qkv.dim() != 2 or qkv.shape[0] < 1:
        raise ValueError(f"qkv must be [T >= 1, {2 * NK * K + nv * V}], got shape {tuple(qkv.shape)}")
    t = qkv.shape[0]
    check_rows("qkv", qkv, t, 2 * NK * K + nv * V)
    check_rows("a", a, t, nv)
    check_rows("b", b, t, nv)
    out2 = as_rows("out", out, t, nv * V)
    for name, p in (("A_log", A_log), ("dt_bias", dt_bias)):
        if p.numel() != nv or not p.is_contiguous():
            raise ValueError(f"{name} must be contiguous with {nv} elements, got shape {tuple(p.shape)}")
    check_info(info, qkv.device)
    if state.device != qkv.device:
        raise ValueError(f"state must be on {qkv.device}, got {state.device}")
    return t, nv, out2


_FACTORS = 5       # per-token vectors the prep hands the scan: fq, fkb, beta, fkd, e^(G_last)


def gated_delta_chunk_workspace_numel(max_tokens: int, num_value_heads: int, key_dim: int | None = None,
                                      value_dim: int | None = None) -> int:
    """fp32 elements of the Triton path's workspace: T and P, 64 x 64 per (chunk, value head), and
    the scan's five per-token factors, 5 x 64 per (chunk, value head). With key_dim and value_dim,
    also room for precompute_w's W = T diag(beta e^G) K (64 x K) and U0 = T diag(beta) V (64 x V)."""
    extra = 0 if key_dim is None or value_dim is None else key_dim + value_dim
    return num_value_heads * triton.cdiv(max_tokens, CHUNK) * CHUNK * (2 * CHUNK + _FACTORS + extra)


def gated_delta_chunk_workspace(max_tokens: int, num_value_heads: int, device, key_dim: int | None = None,
                                value_dim: int | None = None) -> torch.Tensor:
    """The workspace for chunks of up to `max_tokens` tokens; allocate once, before capture."""
    return torch.empty(gated_delta_chunk_workspace_numel(max_tokens, num_value_heads, key_dim, value_dim),
                       dtype=torch.float32, device=device)


def gated_delta_chunk_reference(qkv, a, b, A_log, dt_bias, state, out, info, NK, K, V, workspace=None) -> None:
    """Token by token, exactly the decode step's math; `workspace` is accepted and unused."""
    t, nv, out2 = _check(qkv, a, b, A_log, dt_bias, state, out, info, NK, K, V)
    row, _, n = info.tolist()
    if not (0 <= row < state.shape[0] and 1 <= n <= t):
        raise ValueError(f"info = (row {row}, start, n_valid {n}) out of range for B={state.shape[0]}, T={t}")
    rep = nv // NK
    q = qkv[:n, : NK * K].reshape(n, NK, K).float().repeat_interleave(rep, dim=1)
    k = qkv[:n, NK * K: 2 * NK * K].reshape(n, NK, K).float().repeat_interleave(rep, dim=1)
    v = qkv[:n, 2 * NK * K:].reshape(n, nv, V).float()
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q / (K ** 0.5)
    beta = b[:n].sigmoid().float()
    g = -A_log.float().exp() * torch.nn.functional.softplus(a[:n].float() + dt_bias)
    s = state[row].clone()                         # [NV, K, V]
    o = torch.empty(n, nv, V, dtype=torch.float32, device=qkv.device)
    for i in range(n):
        s = s * g[i].exp()[:, None, None]
        kv = (s * k[i].unsqueeze(-1)).sum(dim=-2)  # S^T k, [NV, V]
        delta = (v[i] - kv) * beta[i].unsqueeze(-1)
        s = s + k[i].unsqueeze(-1) * delta.unsqueeze(-2)
        o[i] = (s * q[i].unsqueeze(-1)).sum(dim=-2)
    state[row].copy_(s)
    out2[:n].copy_(o.reshape(n, nv * V).to(out2.dtype))


# ---- Triton ------------------------------------------------------------------------------------

@triton.jit
def _chunk_gates(a_ptr, b_ptr, alog_ptr, dtb_ptr, vh, offs_t, valid, stride_a, stride_b):
    """beta (rounded to b's dtype) and g (fp32) of value head vh at tokens offs_t; 0 on padding."""
    bb = tl.load(b_ptr + offs_t * stride_b + vh, mask=valid, other=0.0).to(tl.float32)
    beta = tl.sigmoid(bb).to(b_ptr.dtype.element_ty).to(tl.float32)
    x = tl.load(a_ptr + offs_t * stride_a + vh, mask=valid, other=0.0).to(tl.float32) \
        + tl.load(dtb_ptr + vh).to(tl.float32)
    ex = tl.exp(x)
    sp_small = ex * (1.0 - ex * (0.5 - ex * (1.0 / 3.0 - ex * 0.25)))  # log1p(e) for small e (as step.py)
    sp = tl.where(x > 20.0, x, tl.where(ex < 1e-2, sp_small, tl.log(1.0 + ex)))
    g = -tl.exp(tl.load(alog_ptr + vh).to(tl.float32)) * sp
    return tl.where(valid, beta, 0.0), tl.where(valid, g, 0.0)


@triton.jit
def _l2normed(ptrs, mask):
    """Rows of a [BT, BLOCK_K] tile, l2-normalised in fp32 like the step (masked entries 0), and
    the factors 1 / |row| that did it."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    r = tl.math.rsqrt(tl.sum(x * x, axis=1) + 1e-6)
    return x * r[:, None], r


@triton.jit
def _decayed(x, G, BT: tl.constexpr, DIAG: tl.constexpr):
    """x_ts * e^{G_t - G_s} on s < t (s <= t with DIAG), 0 elsewhere (no overflow above it)."""
    t = tl.arange(0, BT)[:, None]
    s = tl.arange(0, BT)[None, :]
    keep = (t >= s) if DIAG else (t > s)
    return tl.where(keep, x * tl.exp(tl.where(keep, G[:, None] - G[None, :], 0.0)), 0.0)


@triton.jit
def _blk(ptr, i: tl.constexpr, j: tl.constexpr):
    """Block (i, j) of a row-major 64 x 64 tile in 16 x 16 blocks."""
    r = tl.arange(0, 16)[:, None]
    c = tl.arange(0, 16)[None, :]
    return tl.load(ptr + (i * 16 + r) * 64 + j * 16 + c, cache_modifier=".cg")  # written by this program


@triton.jit
def _store_blk(ptr, i: tl.constexpr, j: tl.constexpr, x):
    r = tl.arange(0, 16)[:, None]
    c = tl.arange(0, 16)[None, :]
    tl.store(ptr + (i * 16 + r) * 64 + j * 16 + c, x)


@triton.jit
def _diag_blk(d, i: tl.constexpr):
    """Block i of a [4, 16, 16] stack, as a [16, 16] tile."""
    return tl.sum(tl.where(tl.arange(0, 4)[:, None, None] == i, d, 0.0), axis=0)


@triton.jit
def _invert_unit_lower(ptr, PREC: tl.constexpr):
    """In place: the strictly lower 64 x 64 A at ptr (row-major, zero elsewhere) becomes (I + A)^-1.

    Diagonal blocks D_i = (I + A_ii)^-1 by forward substitution, all four at once (row i of D - I
    is -a_i (D - I + I) over the rows < i, final already, with a_i row i of A_ii, read from memory
    laid out along the summed axis); then block substitution T_ij = -D_i sum_{j <= m < i} A_im T_mj
    (i > j), nearest the diagonal first."""
    blk = tl.arange(0, 4)[:, None, None]
    r = tl.arange(0, 16)[None, :, None]
    c = tl.arange(0, 16)[None, None, :]
    d_ptrs = ptr + (blk * 16 + r) * 64 + blk * 16 + c
    eye = tl.where(r == c, 1.0, 0.0)
    d = tl.zeros([4, 16, 16], dtype=tl.float32)                 # D_i - I, built row by row
    for i in tl.static_range(1, 16):
        na_i = -tl.load(ptr + (blk * 16 + i) * 64 + blk * 16 + r, cache_modifier=".cg")  # [4, 16, 1]
        row = tl.sum(na_i * (d + eye), axis=1)                  # row i of D - I (rows < i are final)
        d = tl.where(r == i, row[:, None, :], d)
    d = d + eye
    d0 = _diag_blk(d, 0)
    d1 = _diag_blk(d, 1)
    d2 = _diag_blk(d, 2)
    d3 = _diag_blk(d, 3)
    a10 = _blk(ptr, 1, 0)
    a20 = _blk(ptr, 2, 0)
    a21 = _blk(ptr, 2, 1)
    a30 = _blk(ptr, 3, 0)
    a31 = _blk(ptr, 3, 1)
    a32 = _blk(ptr, 3, 2)
    t10 = -tl.dot(d1, tl.dot(a10, d0, input_precision=PREC), input_precision=PREC)
    t21 = -tl.dot(d2, tl.dot(a21, d1, input_precision=PREC), input_precision=PREC)
    t32 = -tl.dot(d3, tl.dot(a32, d2, input_precision=PREC), input_precision=PREC)
    t20 = -tl.dot(d2, tl.dot(a20, d0, input_precision=PREC) + tl.dot(a21, t10, input_precision=PREC),
                  input_precision=PREC)
    t31 = -tl.dot(d3, tl.dot(a31, d1, input_precision=PREC) + tl.dot(a32, t21, input_precision=PREC),
                  input_precision=PREC)
    t30 = -tl.dot(d3, tl.dot(a30, d0, input_precision=PREC) + tl.dot(a31, t10, input_precision=PREC)
                  + tl.dot(a32, t20, input_precision=PREC), input_precision=PREC)
    tl.debug_barrier()  # every lane has read A before any lane overwrites it
    tl.store(d_ptrs, d)  # (the blocks above the diagonal keep A's zeros)
    _store_blk(ptr, 1, 0, t10)
    _store_blk(ptr, 2, 1, t21)
    _store_blk(ptr, 3, 2, t32)
    _store_blk(ptr, 2, 0, t20)
    _store_blk(ptr, 3, 1, t31)
    _store_blk(ptr, 3, 0, t30)


@triton.jit
def _gdn_chunk_prep_kernel(qkv_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, info_ptr, ws_ptr,
                           NK, NV, K, V, q_div, stride_qkv, stride_a, stride_b, ws_head, ws_slot, f_head,
                           w_base, u_base, BT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_VF: tl.constexpr,
                           NF: tl.constexpr, PREC: tl.constexpr, PRE_W: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    c = tl.program_id(0)
    vh = tl.program_id(1)
    n_valid = tl.load(info_ptr + 2).to(tl.int32)
    if c * BT >= n_valid:
        return
    kh = vh // (NV // NK)
    offs_t = c * BT + tl.arange(0, BT)
    valid = offs_t < n_valid
    offs_k = tl.arange(0, BLOCK_K)
    m = valid[:, None] & (offs_k[None, :] < K)
    q_ptrs = qkv_ptr + offs_t[:, None] * stride_qkv + kh * K + offs_k[None, :]
    q, rq = _l2normed(q_ptrs, m)
    q = q / q_div
    k, rk = _l2normed(q_ptrs + NK * K, m)
    beta, g = _chunk_gates(a_ptr, b_ptr, alog_ptr, dtb_ptr, vh, offs_t, valid, stride_a, stride_b)
    G = tl.cumsum(g, axis=0)
    g_last = tl.sum(tl.where(tl.arange(0, BT) == BT - 1, G, 0.0), axis=0)
    eg = tl.exp(G)
    # the scan's factors (see the module docstring), for the raw rows of qkv
    f_ptr = ws_ptr + 2 * ws_slot + vh * f_head + c * (NF * BT) + tl.arange(0, BT)
    tl.store(f_ptr, eg * rq / q_div)
    tl.store(f_ptr + BT, beta * eg * rk)
    tl.store(f_ptr + 2 * BT, beta)
    tl.store(f_ptr + 3 * BT, tl.exp(g_last - G) * rk)
    tl.store(f_ptr + 4 * BT, tl.zeros([BT], tl.float32) + tl.exp(g_last))
    kt = tl.trans(k)
    a_mat = _decayed(tl.dot(k, kt, input_precision=PREC), G, BT, False) * beta[:, None]
    p_mat = _decayed(tl.dot(q, kt, input_precision=PREC), G, BT, True)
    t_ptr = ws_ptr + vh * ws_head + c * (BT * BT)
    tile = tl.arange(0, BT)[:, None] * BT + tl.arange(0, BT)[None, :]
    tl.store(t_ptr + tile, a_mat)
    tl.store(t_ptr + ws_slot + tile, p_mat)
    tl.debug_barrier()  # A is in memory for every lane before the inversion reads its blocks (via L2)
    _invert_unit_lower(t_ptr, PREC)
    if PRE_W:
        # W = T diag(beta e^G) K and U0 = T diag(beta) V, so the scan's update is U = U0 - W S
        tl.debug_barrier()  # T is in memory for every lane
        tt = tl.load(t_ptr + tile, cache_modifier=".cg")
        rows = c * BT + tl.arange(0, BT)      # this chunk's rows of the head's W and U0
        w = tl.dot(tt, k * (beta * eg)[:, None], input_precision=PREC)
        w_ptr = ws_ptr + w_base + vh * (ws_head // BT) * K + rows[:, None] * K + offs_k[None, :]
        tl.store(w_ptr, w, mask=(offs_k < K)[None, :])
        offs_vf = tl.arange(0, BLOCK_VF)
        mvf = offs_vf < V
        v = tl.load(qkv_ptr + offs_t[:, None] * stride_qkv + 2 * NK * K + vh * V + offs_vf[None, :],
                    mask=valid[:, None] & mvf[None, :], other=0.0).to(tl.float32)
        u0 = tl.dot(tt, v * beta[:, None], input_precision=PREC)
        u_ptr = ws_ptr + u_base + vh * (ws_head // BT) * V + rows[:, None] * V + offs_vf[None, :]
        tl.store(u_ptr, u0, mask=mvf[None, :])


@triton.jit
def _scan_tiles(qkv_ptr, ws_ptr, c, n_chunks, n_valid, kh, vh, NK, K, V, stride_qkv, ws_head, ws_slot, f_head,
                w_base, u_base, offs_k, mk, offs_v, mv, BT: tl.constexpr, NF: tl.constexpr, PRE_W: tl.constexpr):
    """What chunk c of head vh brings to the scan: the raw q, k and v rows (fp32, zeros past the
    last chunk), T, P and the five factors (past the last chunk: the last chunk's, unused).
    PRE_W: U0 in v's place and W in T's (both [64, .] fp32 from the prep)."""
    offs_t = c * BT + tl.arange(0, BT)
    valid = offs_t < n_valid
    m = valid[:, None] & mk[None, :]
    q_ptrs = qkv_ptr + offs_t[:, None] * stride_qkv + kh * K + offs_k[None, :]
    xq = tl.load(q_ptrs, mask=m, other=0.0).to(tl.float32)
    xk = tl.load(q_ptrs + NK * K, mask=m, other=0.0).to(tl.float32)
    cw = tl.minimum(c, n_chunks - 1)     # the workspace holds n_chunks chunks
    tile = tl.arange(0, BT)[:, None] * BT + tl.arange(0, BT)[None, :]
    t_ptr = ws_ptr + vh * ws_head + cw * (BT * BT)
    if PRE_W:
        rows = cw * BT + tl.arange(0, BT)
        head_rows = ws_head // BT
        v = tl.load(ws_ptr + u_base + vh * head_rows * V + rows[:, None] * V + (offs_v - vh * V)[None, :],
                    mask=mv[None, :], other=0.0)
        tt = tl.load(ws_ptr + w_base + vh * head_rows * K + rows[:, None] * K + offs_k[None, :],
                     mask=mk[None, :], other=0.0)
    else:
        v = tl.load(qkv_ptr + offs_t[:, None] * stride_qkv + 2 * NK * K + offs_v[None, :],
                    mask=valid[:, None] & mv[None, :], other=0.0).to(tl.float32)
        tt = tl.load(t_ptr + tile)
    pp = tl.load(t_ptr + ws_slot + tile)
    f0 = ws_ptr + 2 * ws_slot + vh * f_head + cw * (NF * BT)
    f_ptr = f0 + tl.arange(0, BT)
    fq = tl.load(f_ptr)
    fkb = tl.load(f_ptr + BT)
    beta = tl.load(f_ptr + 2 * BT)
    fkd = tl.load(f_ptr + 3 * BT)
    egl = tl.load(f0 + 4 * BT)
    return xq, xk, v, tt, pp, fq, fkb, beta, fkd, egl


@triton.jit
def _gdn_chunk_scan_kernel(qkv_ptr, state_ptr, out_ptr, info_ptr, ws_ptr,
                           NK, NV, K, V, stride_qkv, stride_out, ws_head, ws_slot, f_head, w_base, u_base,
                           BT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, NF: tl.constexpr,
                           PREC: tl.constexpr, PREFETCH: tl.constexpr, PRE_W: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    vh = tl.program_id(0)
    vb = tl.program_id(1)
    row = tl.load(info_ptr)
    n_valid = tl.load(info_ptr + 2).to(tl.int32)
    n_chunks = tl.cdiv(n_valid, BT)
    kh = vh // (NV // NK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = offs_k < K
    mv = offs_v < V
    s_ptrs = state_ptr + ((row * NV + vh) * K + offs_k[:, None]) * V + offs_v[None, :]
    s = tl.load(s_ptrs, mask=mk[:, None] & mv[None, :], other=0.0)    # [BLOCK_K, BLOCK_V] fp32
    dt = out_ptr.dtype.element_ty
    v_cols = vh * V + offs_v      # this head's value columns in qkv (after q and k) and in out
    if PREFETCH:
        xq, xk, v, tt, pp, fq, fkb, beta, fkd, egl = _scan_tiles(
            qkv_ptr, ws_ptr, 0, n_chunks, n_valid, kh, vh, NK, K, V, stride_qkv, ws_head, ws_slot, f_head,
            w_base, u_base, offs_k, mk, v_cols, mv, BT, NF, PRE_W)
    for c in range(0, n_chunks):
        if PREFETCH:   # the next chunk's loads go out before this chunk's products
            nq, nk, nv, nt, np_, nfq, nfkb, nbeta, nfkd, negl = _scan_tiles(
                qkv_ptr, ws_ptr, c + 1, n_chunks, n_valid, kh, vh, NK, K, V, stride_qkv, ws_head, ws_slot, f_head,
                w_base, u_base, offs_k, mk, v_cols, mv, BT, NF, PRE_W)
        else:
            xq, xk, v, tt, pp, fq, fkb, beta, fkd, egl = _scan_tiles(
                qkv_ptr, ws_ptr, c, n_chunks, n_valid, kh, vh, NK, K, V, stride_qkv, ws_head, ws_slot, f_head,
                w_base, u_base, offs_k, mk, v_cols, mv, BT, NF, PRE_W)
        # U = T (diag(beta) V - diag(beta e^G) K S): the chunk's state updates
        if PRE_W:
            u = v - tl.dot(tt, s, input_precision=PREC)          # U0 - W S: one product on the chain
        else:
            r = beta[:, None] * v - fkb[:, None] * tl.dot(xk, s, input_precision=PREC)
            u = tl.dot(tt, r, input_precision=PREC)
        # O = diag(e^G) Q S + P U
        o = fq[:, None] * tl.dot(xq, s, input_precision=PREC) + tl.dot(pp, u, input_precision=PREC)
        offs_t = c * BT + tl.arange(0, BT)
        tl.store(out_ptr + offs_t[:, None] * stride_out + v_cols[None, :], o.to(dt),
                 mask=(offs_t < n_valid)[:, None] & mv[None, :])
        # S <- e^{G_last} S + (diag(e^{G_last - G}) K)^T U
        s = s * egl + tl.dot(tl.trans(xk * fkd[:, None]), u, input_precision=PREC)
        if PREFETCH:
            xq, xk, v, tt, pp, fq, fkb, beta, fkd, egl = nq, nk, nv, nt, np_, nfq, nfkb, nbeta, nfkd, negl
    tl.store(s_ptrs, s, mask=mk[:, None] & mv[None, :])


def gated_delta_chunk_triton(qkv, a, b, A_log, dt_bias, state, out, info, NK, K, V, workspace=None,
                             block_v=None, dot_precision=None, prefetch=True, precompute_w=False) -> None:
    """As gated_delta_chunk_reference, chunked (two kernels); info is read on the device only.

    `workspace`: gated_delta_chunk_workspace(>= T, NV) fp32, allocated once before capture (without
    one, a temporary is allocated: eager use only). `block_v` (power of two >= 16) overrides the
    split of the value columns over programs, `dot_precision` ("ieee", "tf32") the
    precision of the products (default: "ieee" for an fp32 model, "tf32" otherwise), `prefetch` whether
    the scan loads the next chunk's tiles before this chunk's products (same results either way),
    `precompute_w` whether the prep forms W = T diag(beta e^G) K and U0 = T diag(beta) V, so that
    the scan's update is U0 - W S, one product on its sequential chain instead of two (the
    workspace then needs key_dim and value_dim: gated_delta_chunk_workspace(T, NV, device, K, V))."""
    t, nv, out2 = _check(qkv, a, b, A_log, dt_bias, state, out, info, NK, K, V)
    need = gated_delta_chunk_workspace_numel(t, nv, *((K, V) if precompute_w else ()))
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=qkv.device)
    elif (workspace.dtype != torch.float32 or workspace.numel() < need or not workspace.is_contiguous()
          or workspace.device != qkv.device):
        raise ValueError(f"workspace must be contiguous fp32 on {qkv.device} with >= {need} elements "
                         f"(gated_delta_chunk_workspace({t}, {nv}{f', device, {K}, {V}' if precompute_w else ''})), got {workspace.dtype} {workspace.numel()} "
                         f"on {workspace.device}")
    prec = dot_precision or ("ieee" if out2.dtype == torch.float32 else "tf32")
    if prec not in _PRECISIONS:
        raise ValueError(f"dot_precision must be one of {_PRECISIONS}, got {dot_precision!r}")
    block_k = max(16, next_pow2(K))
    if block_v is None:
        block_v = max(16, next_pow2(V))
        while block_v > 32 and nv * triton.cdiv(V, block_v) < FILL_PROGRAMS:
            block_v //= 2
    elif block_v < 16 or block_v != next_pow2(block_v):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    n_chunks = triton.cdiv(t, CHUNK)
    ws_head = n_chunks * CHUNK * CHUNK
    ws_slot = nv * ws_head
    f_head = n_chunks * _FACTORS * CHUNK
    w_base = 2 * ws_slot + nv * f_head          # W, then U0 (precompute_w only)
    u_base = w_base + nv * n_chunks * CHUNK * K
    q_div = float(K ** 0.5)
    opts = pdl(state)
    _gdn_chunk_prep_kernel[(n_chunks, nv)](
        qkv, a, b, A_log, dt_bias, info, workspace, NK, nv, K, V, q_div, qkv.stride(0), a.stride(0), b.stride(0),
        ws_head, ws_slot, f_head, w_base, u_base, BT=CHUNK, BLOCK_K=block_k, BLOCK_VF=max(16, next_pow2(V)),
        NF=_FACTORS, PREC=prec, PRE_W=bool(precompute_w),
        num_warps=4, **opts)   # 4 warps: 140 us against 228 with 8 (H100, 4,096 tokens)
    _gdn_chunk_scan_kernel[(nv, triton.cdiv(V, block_v))](
        qkv, state, out2, info, workspace, NK, nv, K, V, qkv.stride(0), out2.stride(0), ws_head, ws_slot, f_head,
        w_base, u_base, BT=CHUNK, BLOCK_K=block_k, BLOCK_V=block_v, NF=_FACTORS, PREC=prec, PREFETCH=prefetch,
        PRE_W=bool(precompute_w),
        num_warps=8 if block_k >= 128 else 4, num_stages=1, **opts)   # fp32 tiles: pipelined stages overflow shared memory
