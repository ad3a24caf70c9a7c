"""Full-attention decode: q/k RMSNorm + partial RoPE + KV-cache store, and split-K decode attention.

qkv rows are the fused projection output [q_proj | k_proj | v_proj] = [NH*2D | NKV*D | NKV*D];
within q_proj each head holds 2D values: the query (first D) then the output gate (next D).

Rounding points as transformers (eager): q/k norm in fp32 then rounded; cos/sin rounded to the
model dtype; q*cos and rotate_half(q)*sin rounded, then their sum; scores q.k rounded, times the
scale rounded; softmax in fp32; output times sigmoid(gate) in the model dtype.

Capacity: a row whose position is outside [0, S) (S = cache capacity) is not written to the cache;
the kernel sets err[0] = 1 instead (device side, no sync) and the caller checks err when it likes.
Attention then reads min(position + 1, S) entries, so it never reads outside the cache either.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._util import INTERPRET as _INTERPRET, check_rows, next_pow2, pdl, pdl_wait



def _check_cache(name, t, b, nkv, d):
    if t.dim() != 4 or t.shape[0] < b or t.shape[1] != nkv or t.shape[3] != d or t.stride(3) != 1:
        raise ValueError(f"{name} must be [>={b}, {nkv}, S, {d}] with unit last stride, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")


def _check_qkv_store(qkv, q_norm_w, k_norm_w, positions, inv_freq, k_cache, v_cache, q_out, err, NH, NKV, D):
    b = qkv.shape[0]
    check_rows("qkv", qkv, b, NH * 2 * D + 2 * NKV * D)
    _check_cache("k_cache", k_cache, b, NKV, D)
    _check_cache("v_cache", v_cache, b, NKV, D)
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must match: {tuple(k_cache.shape)}/{k_cache.stride()} vs "
                         f"{tuple(v_cache.shape)}/{v_cache.stride()}")
    if positions.shape != (b,):
        raise ValueError(f"positions must be [{b}], got {tuple(positions.shape)}")
    if tuple(q_out.shape) != (b, NH, D) or not q_out.is_contiguous():
        raise ValueError(f"q_out must be a contiguous [{b}, {NH}, {D}], got {tuple(q_out.shape)}")
    if 2 * inv_freq.numel() > D:
        raise ValueError(f"rotary dims 2*{inv_freq.numel()} exceed head_dim {D}")
    if err.dtype != torch.int32 or err.numel() < 1:
        raise ValueError(f"err must be an int32 tensor with >= 1 element, got {err.dtype} {tuple(err.shape)}")
    return b


# ----------------------------------------------------------------------------- references
def _norm_rope_ref(x, w, eps, cos, sin, r):
    """x [B, heads, D] model dtype; cos/sin [B, R] model dtype."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)
    rot, rest = y[..., :r], y[..., r:]
    c, s = cos[:, None, :], sin[:, None, :]
    half = r // 2
    rh = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat(((rot * c) + (rh * s), rest), dim=-1)


def qk_norm_rope_store_reference(qkv, q_norm_w, k_norm_w, positions, inv_freq, k_cache, v_cache, q_out,
                                 err, eps, NH, NKV, D) -> None:
    b = _check_qkv_store(qkv, q_norm_w, k_norm_w, positions, inv_freq, k_cache, v_cache, q_out, err, NH, NKV, D)
    dtype = qkv.dtype
    r = 2 * inv_freq.numel()
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q = qkv[:, : NH * 2 * D].reshape(b, NH, 2 * D)[..., :D]
    k = qkv[:, NH * 2 * D: NH * 2 * D + NKV * D].reshape(b, NKV, D)
    v = qkv[:, NH * 2 * D + NKV * D: NH * 2 * D + 2 * NKV * D].reshape(b, NKV, D)
    q_out.copy_(_norm_rope_ref(q, q_norm_w, eps, cos, sin, r))
    k = _norm_rope_ref(k, k_norm_w, eps, cos, sin, r)
    cap = k_cache.shape[2]
    valid = (positions >= 0) & (positions < cap)
    rows = torch.arange(b, device=qkv.device)[valid]
    pos = positions[valid]
    k_cache[rows, :, pos] = k[valid].to(k_cache.dtype)
    v_cache[rows, :, pos] = v[valid].to(v_cache.dtype)
    err[:1] = torch.maximum(err[:1], (~valid).any().to(torch.int32).reshape(1))


def decode_attention_reference(q, k_cache, v_cache, positions, qkv, scale, out, workspace=None) -> None:
    b, nh, d = q.shape
    nkv = k_cache.shape[1]
    check_rows("out", out, b, nh * d)
    dtype = q.dtype
    cap = k_cache.shape[2]
    gate = qkv[:, : nh * 2 * d].reshape(b, nh, 2 * d)[..., d:]
    for i in range(b):
        ctx = max(1, min(int(positions[i]) + 1, cap))
        kk = k_cache[i, :, :ctx].repeat_interleave(nh // nkv, dim=0)   # [NH, ctx, D]
        vv = v_cache[i, :, :ctx].repeat_interleave(nh // nkv, dim=0)
        s = torch.matmul(q[i].unsqueeze(1), kk.transpose(1, 2)) * scale    # [NH, 1, ctx]
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype)
        o = torch.matmul(p, vv).reshape(nh, d)
        out[i].copy_((o * torch.sigmoid(gate[i])).reshape(-1))


# ----------------------------------------------------------------------------- Triton: norm + rope + store
@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, qw_ptr, kw_ptr, pos_ptr, invf_ptr, kc_ptr, vc_ptr, qo_ptr, err_ptr,
                               NH, NKV, D, HALF, CAP, eps, stride_qkv, stride_cb, stride_ch, stride_cs,
                               BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    head = tl.program_id(1)          # 0..NH-1: query heads; NH..NH+NKV-1: key/value heads
    is_q = head < NH
    kvh = head - NH
    base = qkv_ptr + row * stride_qkv
    src = tl.where(is_q, head * 2 * D, NH * 2 * D + kvh * D)
    offs = tl.arange(0, BLOCK_D)
    md = offs < D
    dt = qo_ptr.dtype.element_ty
    x = tl.load(base + src + offs, mask=md, other=0.0).to(tl.float32)
    if is_q:
        w = tl.load(qw_ptr + offs, mask=md, other=0.0).to(tl.float32)
    else:
        w = tl.load(kw_ptr + offs, mask=md, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    y = (x * rstd * (1.0 + w)).to(dt).to(tl.float32)
    # rotate-half on the first R = 2*HALF dims: partner of i is i +- HALF
    R = 2 * HALF
    in_rot = offs < R
    partner = tl.where(offs < HALF, offs + HALF, offs - HALF)
    xp = tl.load(base + src + partner, mask=in_rot, other=0.0).to(tl.float32)
    if is_q:
        wp = tl.load(qw_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
    else:
        wp = tl.load(kw_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
    yp = (xp * rstd * (1.0 + wp)).to(dt).to(tl.float32)
    yp = tl.where(offs < HALF, -yp, yp)
    pos = tl.load(pos_ptr + row)
    fi = tl.where(offs < HALF, offs, offs - HALF)
    invf = tl.load(invf_ptr + fi, mask=in_rot, other=0.0).to(tl.float32)
    ang = pos.to(tl.float32) * invf
    c = tl.cos(ang).to(dt).to(tl.float32)
    s = tl.sin(ang).to(dt).to(tl.float32)
    roped = ((y * c).to(dt).to(tl.float32) + (yp * s).to(dt).to(tl.float32)).to(dt)
    res = tl.where(in_rot, roped, y.to(dt))
    if is_q:
        tl.store(qo_ptr + (row * NH + head) * D + offs, res, mask=md)
    else:
        ok = (pos >= 0) & (pos < CAP)
        if ok:
            cofs = row.to(tl.int64) * stride_cb + kvh * stride_ch + pos.to(tl.int64) * stride_cs + offs
            tl.store(kc_ptr + cofs, res.to(kc_ptr.dtype.element_ty), mask=md)
            v = tl.load(base + NH * 2 * D + NKV * D + kvh * D + offs, mask=md, other=0.0)
            tl.store(vc_ptr + cofs, v.to(vc_ptr.dtype.element_ty), mask=md)
        else:
            tl.store(err_ptr, 1)


def qk_norm_rope_store_triton(qkv, q_norm_w, k_norm_w, positions, inv_freq, k_cache, v_cache, q_out,
                              err, eps, NH, NKV, D) -> None:
    b = _check_qkv_store(qkv, q_norm_w, k_norm_w, positions, inv_freq, k_cache, v_cache, q_out, err, NH, NKV, D)
    half = inv_freq.numel()
    grid = (b, NH + NKV)
    _qk_norm_rope_store_kernel[grid](qkv, q_norm_w, k_norm_w, positions, inv_freq, k_cache, v_cache, q_out, err,
                                     NH, NKV, D, half, k_cache.shape[2], float(eps), qkv.stride(0),
                                     k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                     BLOCK_D=next_pow2(D), BLOCK_HALF=next_pow2(max(half, 1)), num_warps=2, **pdl(qkv))


# ----------------------------------------------------------------------------- Triton: split-K attention
def attention_num_splits(max_seq: int) -> int:
    """Programs per (row, kv head) of the flash-decoding pass (fixed per cache capacity). Each call
    splits the row's actual context evenly over them (on the device, from positions), in multiples
    of 16 tokens, so short and long contexts both spread over the GPU."""
    return max(1, min(128, triton.cdiv(max_seq, 16)))


def attention_workspace_numel(batch: int, num_heads: int, head_dim: int, max_seq: int) -> int:
    """fp32 elements decode_attention's workspace needs: per (row, head, split) D partial sums + max + sum."""
    return batch * num_heads * attention_num_splits(max_seq) * (head_dim + 2)


def attention_workspace(batch, num_heads, head_dim, max_seq, device) -> torch.Tensor:
    """Allocate decode_attention's workspace (once, before capture)."""
    return torch.empty(attention_workspace_numel(batch, num_heads, head_dim, max_seq),
                       dtype=torch.float32, device=device)


@triton.jit
def _attn_split_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, ws_ptr, NH, NKV, G, D, CAP, NSPLIT, scale,
                       stride_cb, stride_ch, stride_cs,
                       BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_FP32: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    row = pid // NKV
    kvh = pid % NKV
    pos = tl.load(pos_ptr + row)
    ctx = tl.maximum(tl.minimum(pos + 1, CAP), 1).to(tl.int32)
    split = ((ctx + NSPLIT - 1) // NSPLIT + 15) // 16 * 16
    start = sp * split
    if start < ctx:
        end = tl.minimum(start + split, ctx)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mg = offs_g < G
        md = offs_d < D
        heads = kvh * G + offs_g
        q = tl.load(q_ptr + (row * NH + heads)[:, None] * D + offs_d[None, :],
                    mask=mg[:, None] & md[None, :], other=0.0)
        dt = q.dtype
        cbase = row.to(tl.int64) * stride_cb + kvh * stride_ch
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            nn = n0 + offs_n
            mn = nn < end
            kv_ofs = cbase + nn.to(tl.int64)[:, None] * stride_cs + offs_d[None, :]
            kvm = mn[:, None] & md[None, :]
            k = tl.load(kc_ptr + kv_ofs, mask=kvm, other=0.0)
            v = tl.load(vc_ptr + kv_ofs, mask=kvm, other=0.0)
            if DOT_FP32:  # Triton's CPU interpreter multiplies bf16 operands as raw integers
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(dt)), input_precision="ieee")
            s = (s.to(dt).to(tl.float32) * scale).to(dt).to(tl.float32)
            s = tl.where(mn[None, :], s, float("-inf"))
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
        # workspace layout [B, NH, NSPLIT, D + 2]: partial o (unnormalised), then m, then l
        wrow = ((row * NH + heads).to(tl.int64) * NSPLIT + sp) * (D + 2)
        tl.store(ws_ptr + wrow[:, None] + offs_d[None, :], acc, mask=mg[:, None] & md[None, :])
        tl.store(ws_ptr + wrow + D, m_i, mask=mg)
        tl.store(ws_ptr + wrow + D + 1, l_i, mask=mg)


@triton.jit
def _attn_reduce_kernel(ws_ptr, pos_ptr, qkv_ptr, out_ptr, NH, D, CAP, NSPLIT, stride_qkv, stride_out,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr):
    """Program per (row, head, D block): combine every split's partial (one tile load), / sum,
    x sigmoid(gate)."""
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)
    db = tl.program_id(1)
    row = pid // NH
    head = pid % NH
    pos = tl.load(pos_ptr + row)
    ctx = tl.maximum(tl.minimum(pos + 1, CAP), 1).to(tl.int32)
    split = ((ctx + NSPLIT - 1) // NSPLIT + 15) // 16 * 16
    nact = (ctx + split - 1) // split
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < D
    base = (row * NH + head).to(tl.int64) * NSPLIT * (D + 2)
    ms = offs_s < nact
    m = tl.load(ws_ptr + base + offs_s * (D + 2) + D, mask=ms, other=float("-inf"))
    l = tl.load(ws_ptr + base + offs_s * (D + 2) + D + 1, mask=ms, other=0.0)
    m_max = tl.max(m, axis=0)
    wgt = tl.where(ms, tl.exp(m - m_max), 0.0)
    l_tot = tl.sum(l * wgt, axis=0)
    o = tl.load(ws_ptr + base + offs_s[:, None] * (D + 2) + offs_d[None, :], mask=ms[:, None] & md[None, :],
                other=0.0)
    acc = tl.sum(o * wgt[:, None], axis=0)
    dt = out_ptr.dtype.element_ty
    o = (acc / l_tot).to(dt).to(tl.float32)
    gate = tl.load(qkv_ptr + row * stride_qkv + head * 2 * D + D + offs_d, mask=md, other=0.0).to(tl.float32)
    sg = tl.sigmoid(gate).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + head * D + offs_d, (o * sg).to(dt), mask=md)


def decode_attention_triton(q, k_cache, v_cache, positions, qkv, scale, out, workspace) -> None:
    b, nh, d = q.shape
    nkv = k_cache.shape[1]
    if not q.is_contiguous():
        raise ValueError(f"q must be contiguous [B, NH, D], got strides {q.stride()}")
    _check_cache("k_cache", k_cache, b, nkv, d)
    _check_cache("v_cache", v_cache, b, nkv, d)
    check_rows("out", out, b, nh * d)
    if nh % nkv:
        raise ValueError(f"query heads ({nh}) must be a multiple of kv heads ({nkv})")
    cap = k_cache.shape[2]
    nsplit = attention_num_splits(cap)
    need = b * nh * nsplit * (d + 2)
    if workspace.dtype != torch.float32 or workspace.numel() < need:
        raise ValueError(f"workspace must be float32 with >= {need} elements "
                         f"(attention_workspace_numel), got {workspace.dtype} {workspace.numel()}")
    g = nh // nkv
    block_d = next_pow2(d)
    block_n = 32 if block_d <= 256 else 16
    warps = 8 if block_d >= 256 else 4
    _attn_split_kernel[(b * nkv, nsplit)](q, k_cache, v_cache, positions, workspace, nh, nkv, g, d, cap, nsplit,
                                          float(scale), k_cache.stride(0), k_cache.stride(1),
                                          k_cache.stride(2), BLOCK_G=max(16, next_pow2(g)), BLOCK_N=block_n,
                                          BLOCK_D=block_d, DOT_FP32=_INTERPRET or q.dtype == torch.float32,
                                          num_warps=warps, **pdl(q))
    block_s = next_pow2(nsplit)
    block_dr = max(16, min(block_d, 8192 // block_s))
    _attn_reduce_kernel[(b * nh, triton.cdiv(d, block_dr))](workspace, positions, qkv, out, nh, d, cap, nsplit,
                                                           qkv.stride(0), out.stride(0), BLOCK_S=block_s,
                                                           BLOCK_D=block_dr, num_warps=4, **pdl(out))
