"""Full-attention prefill: one chunk of T query tokens of one row (sequence) at a time.

`info` = int64 [3] on the device = (row, start, n_valid): chunk token t sits at position start + t
of cache row `row`; tokens t >= n_valid are padding: they store nothing and raise no error, their
q_out rows are computed anyway (harmless) and their attention output rows are written as zeros
(finite, so the row-wise ops after it stay finite). The Triton ops read info inside the kernels
only (a CUDA graph is replayed with new values); the references read it on the host and check it.

Per token the math is the decode ops' (decode.py): q/k RMSNorm (1+w), partial rotate-half RoPE,
k/v stored at the token's position (outside [0, S): not stored, err[0] = 1), then token t attends
causally to cache positions 0 .. min(start + t, S - 1) (the chunk's own keys are stored by the
first op before the second runs), GQA, x sigmoid(gate).

Rounding, as transformers' eager attention in qwen3_5_moe (the reference rounds at its points;
q/k norm and RoPE as decode.py): scores q.k^T rounded to the model dtype, times the scale rounded;
causal mask added (masked scores drop out of the softmax exactly); softmax in fp32, probabilities
rounded to the model dtype; p.v accumulated in fp32 and rounded; sigmoid(gate) rounded, the
product rounded. The flash kernel keeps the score rounding points exactly; it cannot round the
*normalised* probabilities (the row sum is known only at the end), so, like the decode kernel, it
rounds the unnormalised exp(s - running max) to the model dtype before the p.v dot and divides
by the fp32 row sum once at the end (same relative rounding size, other points: bf16 ulps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._util import INTERPRET as _INTERPRET, check_info, check_rows, next_pow2, pdl, pdl_wait
from .decode import _check_cache, _norm_rope_ref

__all__ = ["qk_norm_rope_store_prefill_reference", "qk_norm_rope_store_prefill_triton",
           "prefill_attention_reference", "prefill_attention_triton", "prefill_attention_tiles"]


# ----------------------------------------------------------------------------- argument checks
def _read_info(info, t, b):
    """Host copy of info for the references (the Triton ops never do this)."""
    row, start, n = (int(v) for v in info.tolist())
    if not 0 <= row < b:
        raise ValueError(f"info row {row} outside the cache's {b} rows")
    if not 1 <= n <= t:
        raise ValueError(f"info n_valid {n} outside [1, T={t}]")
    return row, start, n


def _check_store(qkv, q_norm_w, k_norm_w, info, inv_freq, k_cache, v_cache, q_out, err, NH, NKV, D):
    t = qkv.shape[0]
    check_rows("qkv", qkv, t, NH * 2 * D + 2 * NKV * D)
    check_info(info, qkv.device)
    _check_cache("k_cache", k_cache, 1, NKV, D)
    _check_cache("v_cache", v_cache, 1, NKV, D)
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must match: {tuple(k_cache.shape)}/{k_cache.stride()} vs "
                         f"{tuple(v_cache.shape)}/{v_cache.stride()}")
    if q_norm_w.numel() != D or k_norm_w.numel() != D:
        raise ValueError(f"q_norm_w and k_norm_w must have {D} elements, got {q_norm_w.numel()} and "
                         f"{k_norm_w.numel()}")
    if tuple(q_out.shape) != (t, NH, D) or not q_out.is_contiguous():
        raise ValueError(f"q_out must be a contiguous [{t}, {NH}, {D}], got {tuple(q_out.shape)} "
                         f"strides {q_out.stride()}")
    if 2 * inv_freq.numel() > D:
        raise ValueError(f"rotary dims 2*{inv_freq.numel()} exceed head_dim {D}")
    if err.dtype != torch.int32 or err.numel() < 1:
        raise ValueError(f"err must be an int32 tensor with >= 1 element, got {err.dtype} {tuple(err.shape)}")
    return t


def _check_attention(q, k_cache, v_cache, info, qkv, out):
    if q.dim() != 3 or not q.is_contiguous():
        raise ValueError(f"q must be a contiguous [T, NH, D], got shape {tuple(q.shape)} strides {q.stride()}")
    t, nh, d = q.shape
    nkv = k_cache.shape[1] if k_cache.dim() == 4 else -1
    _check_cache("k_cache", k_cache, 1, nkv, d)
    _check_cache("v_cache", v_cache, 1, nkv, d)
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must match: {tuple(k_cache.shape)}/{k_cache.stride()} vs "
                         f"{tuple(v_cache.shape)}/{v_cache.stride()}")
    if nh % nkv:
        raise ValueError(f"query heads ({nh}) must be a multiple of kv heads ({nkv})")
    check_rows("qkv", qkv, t, nh * 2 * d + 2 * nkv * d)
    check_rows("out", out, t, nh * d)
    check_info(info, q.device)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("qkv", qkv), ("out", out)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    return t, nh, nkv, d


# ----------------------------------------------------------------------------- references
def qk_norm_rope_store_prefill_reference(qkv, q_norm_w, k_norm_w, info, inv_freq, k_cache, v_cache, q_out,
                                         err, eps, NH, NKV, D) -> None:
    t = _check_store(qkv, q_norm_w, k_norm_w, info, inv_freq, k_cache, v_cache, q_out, err, NH, NKV, D)
    row, start, n = _read_info(info, t, k_cache.shape[0])
    dtype = qkv.dtype
    r = 2 * inv_freq.numel()
    positions = start + torch.arange(t, device=qkv.device)
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q = qkv[:, : NH * 2 * D].reshape(t, NH, 2 * D)[..., :D]
    k = qkv[:, NH * 2 * D: NH * 2 * D + NKV * D].reshape(t, NKV, D)
    v = qkv[:, NH * 2 * D + NKV * D: NH * 2 * D + 2 * NKV * D].reshape(t, NKV, D)
    q_out.copy_(_norm_rope_ref(q, q_norm_w, eps, cos, sin, r))
    k = _norm_rope_ref(k, k_norm_w, eps, cos, sin, r)
    cap = k_cache.shape[2]
    valid = torch.arange(t, device=qkv.device) < n
    store = valid & (positions >= 0) & (positions < cap)
    pos = positions[store]
    k_cache[row][:, pos] = k[store].transpose(0, 1).to(k_cache.dtype)
    v_cache[row][:, pos] = v[store].transpose(0, 1).to(v_cache.dtype)
    err[:1] = torch.maximum(err[:1], (valid & ~store).any().to(torch.int32).reshape(1))


def prefill_attention_reference(q, k_cache, v_cache, info, qkv, scale, out) -> None:
    t, nh, nkv, d = _check_attention(q, k_cache, v_cache, info, qkv, out)
    row, start, n = _read_info(info, t, k_cache.shape[0])
    dtype = q.dtype
    cap = k_cache.shape[2]
    # keys query i sees: positions 0 .. start + i, clipped to the cache as decode does
    ctx = (start + torch.arange(n, device=q.device) + 1).clamp(1, cap)
    keys = int(ctx.max())
    kk = k_cache[row, :, :keys].repeat_interleave(nh // nkv, dim=0)        # [NH, L, D]
    vv = v_cache[row, :, :keys].repeat_interleave(nh // nkv, dim=0)
    s = torch.matmul(q[:n].transpose(0, 1), kk.transpose(1, 2)) * scale     # [NH, n, L], model dtype
    allowed = torch.arange(keys, device=q.device)[None, :] < ctx[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype)
    o = torch.matmul(p, vv).transpose(0, 1).reshape(n, nh * d)
    gate = qkv[:n, : nh * 2 * d].reshape(n, nh, 2 * d)[..., d:].reshape(n, nh * d)
    out[:n].copy_(o * torch.sigmoid(gate))
    out[n:].zero_()


# ----------------------------------------------------------------------------- Triton: norm + rope + store
@triton.jit
def _qk_norm_rope_store_prefill_kernel(qkv_ptr, qw_ptr, kw_ptr, info_ptr, invf_ptr, kc_ptr, vc_ptr, qo_ptr,
                                       err_ptr, T, NH, NKV, D, HALF, CAP, eps, stride_qkv, stride_cb,
                                       stride_ch, stride_cs, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                                       USE_GDC: tl.constexpr):
    """Program per (block of BLOCK_T tokens, head): the decode kernel's per-token math on a tile."""
    pdl_wait(USE_GDC)
    head = tl.program_id(1)          # 0..NH-1: query heads; NH..NH+NKV-1: key/value heads
    row = tl.load(info_ptr)
    start = tl.load(info_ptr + 1)
    n_valid = tl.load(info_ptr + 2)
    is_q = head < NH
    kvh = head - NH
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = tok < T
    pos = start + tok                # int64
    src = tl.where(is_q, head * 2 * D, NH * 2 * D + kvh * D)
    base = qkv_ptr + tok.to(tl.int64)[:, None] * stride_qkv + src
    offs = tl.arange(0, BLOCK_D)
    md = offs < D
    m2 = mt[:, None] & md[None, :]
    dt = qo_ptr.dtype.element_ty
    x = tl.load(base + offs[None, :], mask=m2, other=0.0).to(tl.float32)
    if is_q:
        w = tl.load(qw_ptr + offs, mask=md, other=0.0).to(tl.float32)
    else:
        w = tl.load(kw_ptr + offs, mask=md, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = (x * rstd[:, None] * (1.0 + w[None, :])).to(dt).to(tl.float32)
    # rotate-half on the first R = 2*HALF dims: the partner of dim i is i +- HALF
    in_rot = offs < 2 * HALF
    partner = tl.where(offs < HALF, offs + HALF, offs - HALF)
    xp = tl.load(base + partner[None, :], mask=mt[:, None] & in_rot[None, :], other=0.0).to(tl.float32)
    if is_q:
        wp = tl.load(qw_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
    else:
        wp = tl.load(kw_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
    yp = (xp * rstd[:, None] * (1.0 + wp[None, :])).to(dt).to(tl.float32)
    yp = tl.where((offs < HALF)[None, :], -yp, yp)
    fi = tl.where(offs < HALF, offs, offs - HALF)
    invf = tl.load(invf_ptr + fi, mask=in_rot, other=0.0).to(tl.float32)
    ang = pos.to(tl.float32)[:, None] * invf[None, :]
    c = tl.cos(ang).to(dt).to(tl.float32)
    s = tl.sin(ang).to(dt).to(tl.float32)
    roped = ((y * c).to(dt).to(tl.float32) + (yp * s).to(dt).to(tl.float32)).to(dt)
    res = tl.where(in_rot[None, :], roped, y.to(dt))
    if is_q:
        tl.store(qo_ptr + (tok.to(tl.int64) * NH + head)[:, None] * D + offs[None, :], res, mask=m2)
    else:
        # padding tokens store nothing and raise nothing; valid ones outside the cache raise err
        valid = mt & (tok < n_valid)
        inside = (pos >= 0) & (pos < CAP)
        ok = (valid & inside)[:, None] & md[None, :]
        cofs = row * stride_cb + kvh * stride_ch + pos[:, None] * stride_cs + offs[None, :]
        tl.store(kc_ptr + cofs, res.to(kc_ptr.dtype.element_ty), mask=ok)
        v = tl.load(qkv_ptr + tok.to(tl.int64)[:, None] * stride_qkv + NH * 2 * D + NKV * D + kvh * D
                    + offs[None, :], mask=ok, other=0.0)
        tl.store(vc_ptr + cofs, v.to(vc_ptr.dtype.element_ty), mask=ok)
        if tl.max((valid & ~inside).to(tl.int32), axis=0) > 0:
            tl.store(err_ptr, 1)


def qk_norm_rope_store_prefill_triton(qkv, q_norm_w, k_norm_w, info, inv_freq, k_cache, v_cache, q_out,
                                      err, eps, NH, NKV, D) -> None:
    t = _check_store(qkv, q_norm_w, k_norm_w, info, inv_freq, k_cache, v_cache, q_out, err, NH, NKV, D)
    # The decode kernel takes the cache row and position from the token index; here they come from
    # info on the device (and padding must not store), hence a kernel of its own. Tiles of 2048
    # elements (8 tokens at D=256, 4 warps: 191 registers, no spill for sm_90a with Triton 3.9's
    # ptxas; 16 tokens spilled): T=2048 gives 256 x (NH + NKV) programs.
    block_d = next_pow2(D)
    block_t = min(next_pow2(t), max(1, 2048 // block_d))
    _qk_norm_rope_store_prefill_kernel[(triton.cdiv(t, block_t), NH + NKV)](
        qkv, q_norm_w, k_norm_w, info, inv_freq, k_cache, v_cache, q_out, err, t, NH, NKV, D, inv_freq.numel(),
        k_cache.shape[2], float(eps), qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4, **pdl(qkv))


# ----------------------------------------------------------------------------- Triton: flash attention
def prefill_attention_tiles(head_dim: int, group: int, dtype: torch.dtype) -> dict:
    """Tile shape of the prefill attention kernel. A tile holds BLOCK_T tokens x the `group` query
    heads that share one KV head (BLOCK_M = BLOCK_T * next_pow2(group) rows), so each K/V tile
    loaded serves all of them.

    bf16/fp16 at D=256 (35b-a3b, 122b-a10b): BLOCK_M=128, BLOCK_N=32, 8 warps, 3 stages. Chosen on an
    H100 (35b-a3b widths, session 10 in docs/benchmarks.md) over BLOCK_M 64/128/256, BLOCK_N 16..128,
    2/3 stages, 4/8 warps: 474 us at 4,096 tokens (64x32, 2 stages: 1,187 us; the compute floor is
    172 us) and 68 us at 1,024 (81 us), with the same accumulation order, so the same output bits.
    Shared memory (227 KB a block): Q tile 64 KB + K and V tiles 16 KB each over 3 stages = 160 KB.
    Other widths keep the earlier choice: BLOCK_M 64 (fp32, a test path with FMA dots: 32),
    BLOCK_N with BLOCK_N * D * elem <= 16 KB, 2 stages, 8 warps from D=128 up (the fp32
    accumulator alone is BLOCK_M x D / threads registers)."""
    elem = 4 if dtype == torch.float32 else 2
    block_d = max(16, next_pow2(head_dim))
    block_g = next_pow2(group)
    warps = 8 if block_d >= 128 else 4
    if elem == 2 and block_d == 256 and block_g <= 128:
        return dict(BLOCK_T=128 // block_g, BLOCK_G=block_g, BLOCK_N=32, BLOCK_D=block_d,
                    num_warps=warps, num_stages=3)
    block_m = max(32 if elem == 4 else 64, block_g)
    block_n = max(16, min(64, 16384 // (block_d * elem)))
    return dict(BLOCK_T=block_m // block_g, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=warps, num_stages=2)


@triton.jit
def _prefill_attn_kernel(q_ptr, kc_ptr, vc_ptr, info_ptr, qkv_ptr, out_ptr, T, NH, G, D, CAP, scale,
                         stride_cb, stride_ch, stride_cs, stride_qkv, stride_out,
                         BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    # the latest query blocks see the most keys: schedule them first
    tb = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(info_ptr)
    start = tl.load(info_ptr + 1).to(tl.int32)
    n_valid = tl.minimum(tl.load(info_ptr + 2).to(tl.int32), T)
    # tile row m = (token t0 + m // BLOCK_G, query head kvh * G + m % BLOCK_G)
    offs_m = tl.arange(0, BLOCK_T * BLOCK_G)
    t0 = tb * BLOCK_T
    tok = t0 + offs_m // BLOCK_G
    g = offs_m % BLOCK_G
    head = kvh * G + g
    valid = (tok < n_valid) & (g < G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < D
    q = tl.load(q_ptr + (tok.to(tl.int64) * NH + head)[:, None] * D + offs_d[None, :],
                mask=valid[:, None] & md[None, :], other=0.0)
    dt = q.dtype
    # keys this block needs: 0 .. start + (its last valid token), clipped to the cache as decode
    # does; a block of padding only needs none. Row m sees keys 0 .. lim[m] (causal).
    t_last = tl.minimum(t0 + BLOCK_T, n_valid) - 1
    kv_end = tl.where(t_last >= t0, tl.maximum(tl.minimum(start + t_last + 1, CAP), 1), 0)
    lim = tl.minimum(tl.maximum(start + tok, 0), kv_end - 1)
    cbase = row * stride_cb + kvh * stride_ch
    m_i = tl.full([BLOCK_T * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_T * BLOCK_G, BLOCK_D], tl.float32)
    # key 0 is in every row's range, so after the first tile every m_i is finite (no inf - inf)
    for n0 in range(0, kv_end, BLOCK_N):
        nn = n0 + offs_n
        kv_ofs = cbase + nn.to(tl.int64)[:, None] * stride_cs + offs_d[None, :]
        kvm = (nn < kv_end)[:, None] & md[None, :]
        k = tl.load(kc_ptr + kv_ofs, mask=kvm, other=0.0)
        v = tl.load(vc_ptr + kv_ofs, mask=kvm, other=0.0)
        if DOT_FP32:  # fp32 model, or Triton's CPU interpreter (it multiplies bf16 as raw integers)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(dt)), input_precision="ieee")
        s = (s.to(dt).to(tl.float32) * scale).to(dt).to(tl.float32)
        s = tl.where(nn[None, :] <= lim[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            pv = tl.dot(p.to(dt).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(dt), v.to(dt), input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)
    o = (acc / l_i[:, None]).to(dt).to(tl.float32)
    gate = tl.load(qkv_ptr + tok.to(tl.int64)[:, None] * stride_qkv + (head * 2 * D + D)[:, None] + offs_d[None, :],
                   mask=valid[:, None] & md[None, :], other=0.0).to(tl.float32)
    sg = tl.sigmoid(gate).to(dt).to(tl.float32)
    res = tl.where(valid[:, None], o * sg, 0.0)      # padding rows: zeros (finite for what follows)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_out + (head * D)[:, None] + offs_d[None, :],
             res.to(out_ptr.dtype.element_ty), mask=((tok < T) & (g < G))[:, None] & md[None, :])


def prefill_attention_triton(q, k_cache, v_cache, info, qkv, scale, out, workspace=None) -> None:
    """`workspace` is accepted for symmetry with decode_attention and unused (one pass, no splits)."""
    t, nh, nkv, d = _check_attention(q, k_cache, v_cache, info, qkv, out)
    tiles = prefill_attention_tiles(d, nh // nkv, q.dtype)
    grid = (triton.cdiv(t, tiles["BLOCK_T"]), nkv)
    _prefill_attn_kernel[grid](q, k_cache, v_cache, info, qkv, out, t, nh, nh // nkv, d, k_cache.shape[2],
                               float(scale), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                               qkv.stride(0), out.stride(0), DOT_FP32=_INTERPRET or q.dtype == torch.float32,
                               **tiles, **pdl(q))
