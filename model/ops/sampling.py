"""Token sampling on the device, graph-safe: greedy, or temperature with top-k / top-p.

Per-row parameters live in a device tensor params[B, 3] = (temperature, top_k, top_p) and the
random state in rng_state[2] int64 = (seed, counter): both can be changed between graph replays
without recapturing, and the kernels advance the counter on the device after every call (no host
sync, no allocation). temperature <= 0 is greedy (argmax, lowest index on ties); top_k <= 0 and
top_p >= 1 disable those filters. Filters follow transformers' warpers: logits / T, keep the
values >= the k-th largest (ties kept), then the smallest top set whose probability mass reaches
top_p; then one draw, by the Gumbel-max trick (argmax of x/T + Gumbel noise over the kept set,
which samples exactly from the renormalised softmax).

Kernels: (1) for 0 < top_k <= TOPK_FAST_MAX, each vocabulary block's top-k candidates (parallel),
(2) per row, the filter threshold: from the candidates (k rounds of max, then top-p on the sorted k
values), or, for top_k > TOPK_FAST_MAX or top-p without top-k, by bisection over the whole row,
snapped to the nearest value (one program per row, ~60 passes over the vocabulary: correct but
slow, ~1 ms at a 248k vocabulary: a known gap); rows that do not filter do no work, (3) Gumbel /
greedy block maxima over (row, vocabulary block), (4) one program: per-row reduction, token out,
counter += 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_contiguous, next_pow2, pdl, pdl_wait

SAMPLE_BLOCK_V = 2048
TOPK_FAST_MAX = 64   # top_k up to this uses the fast candidate path; larger (or top-p alone) the slow one
_MIX = 6364136223846793005  # odd 64-bit multiplier mixing (counter, row) into the seed


def sample_workspace_numel(batch: int, vocab: int) -> int:
    """fp32 elements of sample()'s workspace: per row a threshold, (max, index) per vocabulary block,
    and TOPK_FAST_MAX top-k candidates per vocabulary block."""
    nblk = triton.cdiv(vocab, SAMPLE_BLOCK_V)
    return batch * (1 + 2 * nblk + nblk * TOPK_FAST_MAX)


def make_params(batch, temperature=0.0, top_k=0, top_p=1.0, device="cpu") -> torch.Tensor:
    p = torch.empty(batch, 3, dtype=torch.float32, device=device)
    p[:, 0], p[:, 1], p[:, 2] = float(temperature), float(top_k), float(top_p)
    return p


def make_rng_state(seed: int, device="cpu") -> torch.Tensor:
    return torch.tensor([int(seed), 0], dtype=torch.int64, device=device)


def _check(logits, params, rng_state, out_tokens):
    b, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along the vocabulary, got {logits.stride()}")
    check_contiguous("params", params, (b, 3))
    if params.dtype != torch.float32:
        raise TypeError(f"params must be float32 [B, 3], got {params.dtype}")
    if rng_state.dtype != torch.int64 or rng_state.numel() != 2:
        raise ValueError(f"rng_state must be int64 [2] (seed, counter), got {rng_state.dtype} {tuple(rng_state.shape)}")
    if out_tokens.shape != (b,) or out_tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"out_tokens must be int64/int32 [{b}], got {out_tokens.dtype} {tuple(out_tokens.shape)}")
    return b, v


# ----------------------------------------------------------------------------- reference
def filtered_logprobs_reference(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """x / T with transformers' top-k then top-p filtering (-inf outside the kept set), fp32."""
    x = logits_row.float() / temperature
    if top_k > 0:
        kth = torch.topk(x, min(top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, si = torch.sort(x, descending=False)
        cum = sx.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[-1] = False
        x = x.masked_fill(remove.scatter(0, si, remove), float("-inf"))
    return x


def sample_reference(logits, params, rng_state, out_tokens, workspace=None) -> None:
    b, v = _check(logits, params, rng_state, out_tokens)
    seed, counter = (int(t) for t in rng_state.tolist())
    for r in range(b):
        t, k, p = (float(u) for u in params[r].tolist())
        if t <= 0:
            out_tokens[r] = int(torch.argmax(logits[r].float()))
            continue
        x = filtered_logprobs_reference(logits[r], t, int(k), p)
        gen = torch.Generator(device="cpu").manual_seed((seed * 1000003 + counter * 1009 + r) % (2 ** 63))
        probs = torch.softmax(x, -1).cpu()
        out_tokens[r] = int(torch.multinomial(probs, 1, generator=gen))
    rng_state[1] += 1


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _count_mass(x_ptr, row_stride, row, V, t, m, inv_t, lo_cut, BLOCK: tl.constexpr):
    """(count of x >= t, sum of exp(x - m) over x >= t and x >= lo_cut) for row of logits / T."""
    offs = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], tl.float32)
    mass = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        vv = v0 + offs
        x = tl.load(x_ptr + row * row_stride + vv, mask=vv < V, other=float("-inf")).to(tl.float32) * inv_t
        keep = (x >= t) & (x >= lo_cut)
        cnt += tl.where(x >= t, 1.0, 0.0)
        mass += tl.where(keep, tl.exp(x - m), 0.0)
    return tl.sum(cnt, axis=0), tl.sum(mass, axis=0)


@triton.jit
def _snap_up(x_ptr, row_stride, row, V, t, inv_t, BLOCK: tl.constexpr):
    """The smallest value of the row (logits / T) that is >= t: a bisected threshold made exact."""
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("inf"), tl.float32)
    for v0 in range(0, V, BLOCK):
        vv = v0 + offs
        x = tl.load(x_ptr + row * row_stride + vv, mask=vv < V, other=float("-inf")).to(tl.float32) * inv_t
        best = tl.minimum(best, tl.where(x >= t, x, float("inf")))
    return tl.min(best, axis=0)


@triton.jit
def _sample_cand_kernel(logits_ptr, params_ptr, ws_ptr, B, V, NBLK, stride_l,
                        KMAX: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """Fast path (0 < top_k <= KMAX): each vocabulary block's top_k values of logits / T, in
    descending order, into ws[cand]; the global top-k is among them."""
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    blk = tl.program_id(1)
    temp = tl.load(params_ptr + row * 3)
    top_k = tl.load(params_ptr + row * 3 + 1).to(tl.int32)
    if (temp > 0) & (top_k > 0) & (top_k <= KMAX):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride_l + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x = x * (1.0 / temp)
        cbase = B * (1 + 2 * NBLK) + (row * NBLK + blk) * KMAX
        for j in range(0, top_k):
            best = tl.max(x, axis=0)
            bi = tl.min(tl.where(x == best, offs, 2147483647), axis=0)
            tl.store(ws_ptr + cbase + j, best)
            x = tl.where(offs == bi, float("-inf"), x)


@triton.jit
def _fast_threshold(ws_ptr, B, NBLK, row, top_k, top_p, KMAX: tl.constexpr, BLOCK_C: tl.constexpr):
    """Exact top-k then top-p threshold from the candidates: k rounds of max over them give the top
    k values in descending order; top-p keeps token j iff the mass strictly above it < p * mass."""
    offs = tl.arange(0, BLOCK_C)
    blk = offs // KMAX
    j = offs % KMAX
    valid = (blk < NBLK) & (j < top_k)
    c = tl.load(ws_ptr + B * (1 + 2 * NBLK) + row * NBLK * KMAX + offs, mask=valid, other=float("-inf"))
    offs_k = tl.arange(0, KMAX)
    vals = tl.full([KMAX], float("-inf"), tl.float32)
    for i in range(0, top_k):
        best = tl.max(c, axis=0)
        bi = tl.min(tl.where(c == best, offs, 2147483647), axis=0)
        vals = tl.where(offs_k == i, best, vals)
        c = tl.where(offs == bi, float("-inf"), c)
    in_k = offs_k < top_k
    tk = tl.min(tl.where(in_k, vals, float("inf")), axis=0)
    thresh = tk
    if top_p < 1.0:
        vmax = tl.max(vals, axis=0)
        e = tl.where(in_k, tl.exp(vals - vmax), 0.0)
        # top-k keeps every value equal to the k-th (ties): they count in the mass too
        n_tied = tl.sum(tl.where(c == tk, 1.0, 0.0), axis=0)
        z = tl.sum(e, axis=0) + n_tied * tl.exp(tk - vmax)
        # mass strictly above position i (descending order) = sum of e over positions < i
        above = tl.sum(tl.where(offs_k[None, :] < offs_k[:, None], e[None, :], 0.0), axis=1)
        keep = in_k & (above < top_p * z)
        thresh = tl.min(tl.where(keep, vals, float("inf")), axis=0)
    return thresh


@triton.jit
def _sample_threshold_kernel(logits_ptr, params_ptr, ws_ptr, B, V, NBLK, stride_l, BLOCK: tl.constexpr,
                             BISECT_STEPS: tl.constexpr, KMAX: tl.constexpr, BLOCK_C: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    temp = tl.load(params_ptr + row * 3)
    top_k = tl.load(params_ptr + row * 3 + 1)
    top_p = tl.load(params_ptr + row * 3 + 2)
    thresh = float("-inf")
    fast = (temp > 0) & (top_k > 0) & (top_k <= KMAX)
    if fast:
        thresh = _fast_threshold(ws_ptr, B, NBLK, row, top_k.to(tl.int32), top_p, KMAX, BLOCK_C)
    elif (temp > 0) & ((top_k > 0) | (top_p < 1.0)):
        inv_t = 1.0 / temp
        offs = tl.arange(0, BLOCK)
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        mn = tl.full([BLOCK], float("inf"), tl.float32)
        for v0 in range(0, V, BLOCK):
            vv = v0 + offs
            x = tl.load(logits_ptr + row * stride_l + vv, mask=vv < V, other=float("-inf")).to(tl.float32) * inv_t
            mx = tl.maximum(mx, x)
            mn = tl.minimum(mn, tl.where(vv < V, x, float("inf")))
        m = tl.max(mx, axis=0)
        lo0 = tl.min(mn, axis=0)
        tk = lo0
        if (top_k > 0) & (top_k < V):
            # largest t with count(x >= t) >= k  (= the k-th largest value)
            lo = lo0
            hi = m
            for _ in range(0, BISECT_STEPS):
                mid = lo + (hi - lo) * 0.5
                c, _s = _count_mass(logits_ptr, stride_l, row, V, mid, m, inv_t, lo0, BLOCK)
                ok = c >= top_k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            tk = _snap_up(logits_ptr, stride_l, row, V, lo, inv_t, BLOCK)
        tp = tk
        if top_p < 1.0:
            _c, z = _count_mass(logits_ptr, stride_l, row, V, tk, m, inv_t, tk, BLOCK)
            lo = tk
            hi = m
            for _ in range(0, BISECT_STEPS):
                mid = lo + (hi - lo) * 0.5
                _c2, s = _count_mass(logits_ptr, stride_l, row, V, mid, m, inv_t, tk, BLOCK)
                ok = s >= top_p * z
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            tp = _snap_up(logits_ptr, stride_l, row, V, lo, inv_t, BLOCK)
        thresh = tp
    tl.store(ws_ptr + row, thresh)


@triton.jit
def _sample_block_kernel(logits_ptr, params_ptr, rng_ptr, ws_ptr, B, V, NBLK, stride_l,
                         MIX: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mv = offs < V
    temp = tl.load(params_ptr + row * 3)
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mv, other=float("-inf")).to(tl.float32)
    if temp > 0:
        thresh = tl.load(ws_ptr + row)
        xs = x * (1.0 / temp)
        seed = tl.load(rng_ptr)
        counter = tl.load(rng_ptr + 1)
        key = seed + (counter * B + row + 1) * MIX
        u = tl.rand(key, offs)
        u = tl.maximum(u, 1e-20)
        gum = -tl.log(-tl.log(u))
        score = tl.where(mv & (xs >= thresh), xs + gum, float("-inf"))
    else:
        score = x
    best = tl.max(score, axis=0)
    bi = tl.min(tl.where(score == best, offs, 2147483647), axis=0)
    bi = tl.where(best == float("-inf"), blk * BLOCK, bi)
    base = B + row * 2 * NBLK
    tl.store(ws_ptr + base + blk, best)
    tl.store(ws_ptr + base + NBLK + blk, bi.to(tl.float32))


@triton.jit
def _sample_reduce_kernel(ws_ptr, rng_ptr, out_ptr, B, NBLK, BLOCK_N: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    offs = tl.arange(0, BLOCK_N)
    mn = offs < NBLK
    for row in range(0, B):
        base = B + row * 2 * NBLK
        val = tl.load(ws_ptr + base + offs, mask=mn, other=float("-inf"))
        best = tl.max(val, axis=0)
        bb = tl.min(tl.where(mn & (val == best), offs, 2147483647), axis=0)
        bb = tl.where(bb == 2147483647, 0, bb)
        tok = tl.load(ws_ptr + base + NBLK + bb)
        tl.store(out_ptr + row, tok.to(out_ptr.dtype.element_ty))
    c = tl.load(rng_ptr + 1)
    tl.store(rng_ptr + 1, c + 1)


def sample_triton(logits, params, rng_state, out_tokens, workspace) -> None:
    b, v = _check(logits, params, rng_state, out_tokens)
    nblk = triton.cdiv(v, SAMPLE_BLOCK_V)
    need = sample_workspace_numel(b, v)
    if workspace.dtype != torch.float32 or workspace.numel() < need:
        raise ValueError(f"workspace must be float32 with >= {need} elements (sample_workspace_numel), "
                         f"got {workspace.dtype} {workspace.numel()}")
    tb = min(4096, next_pow2(v))
    _sample_cand_kernel[(b, nblk)](logits, params, workspace, b, v, nblk, logits.stride(0),
                                   KMAX=TOPK_FAST_MAX, BLOCK=SAMPLE_BLOCK_V, num_warps=4, **pdl(logits))
    _sample_threshold_kernel[(b,)](logits, params, workspace, b, v, nblk, logits.stride(0), BLOCK=tb, BISECT_STEPS=26,
                                   KMAX=TOPK_FAST_MAX, BLOCK_C=next_pow2(nblk * TOPK_FAST_MAX),
                                   num_warps=16 if tb >= 4096 else 4, **pdl(logits))
    _sample_block_kernel[(b, nblk)](logits, params, rng_state, workspace, b, v, nblk, logits.stride(0),
                                    MIX=_MIX, BLOCK=SAMPLE_BLOCK_V, num_warps=4, **pdl(logits))
    _sample_reduce_kernel[(1,)](workspace, rng_state, out_tokens, b, nblk, BLOCK_N=next_pow2(nblk), num_warps=4, **pdl(out_tokens))


class Sampler:
    """Static sampling state for one decode batch: params, rng state and workspace, allocated once.

    `sampler(logits, out_tokens)` samples into out_tokens (int64 [B]) and advances the counter on the
    device; `set(...)` changes the parameters in place (graph-safe), `reset()` rewinds the counter.
    """

    def __init__(self, vocab_size: int, batch: int, sampling=None, device="cpu", *, backend: str = "triton"):
        temperature = getattr(sampling, "temperature", 0.0)
        top_k = getattr(sampling, "top_k", 0)
        top_p = getattr(sampling, "top_p", 1.0)
        seed = getattr(sampling, "seed", 0)
        self.vocab_size, self.batch, self.seed = int(vocab_size), int(batch), int(seed)
        self.params = make_params(batch, temperature, top_k, top_p, device)
        self.rng_state = make_rng_state(seed, device)
        self.workspace = torch.zeros(sample_workspace_numel(batch, vocab_size), dtype=torch.float32, device=device)
        self._fn = sample_triton if backend == "triton" else sample_reference

    def set(self, temperature=0.0, top_k=0, top_p=1.0) -> None:
        self.params.copy_(make_params(self.batch, temperature, top_k, top_p, self.params.device))

    def reset(self) -> None:
        self.rng_state[0] = self.seed
        self.rng_state[1] = 0

    def __call__(self, logits: torch.Tensor, out_tokens: torch.Tensor) -> torch.Tensor:
        self._fn(logits, self.params, self.rng_state, out_tokens, self.workspace)
        return out_tokens
