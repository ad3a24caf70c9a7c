"""Sparse MoE over a chunk of T tokens (prefill): grouped GEMMs on the tensor cores.

Same math and rounding points as the decode op (decode.moe_experts_reference, i.e. transformers'
eager experts loop), for many tokens at once. The T*k (token, slot) "pairs" are grouped by expert
on the device, so each expert's weights are read once per block of its pairs instead of once per
pair. Seven kernels and one cuBLAS GEMM, fixed grids, no host sync (capturable in a CUDA graph):
  1-3. grouping.group_pairs: the pairs sorted by expert (ascending pair index within an expert),
     each expert's rows padded to BLOCK_M, and a block -> (expert, valid rows) table
  4. gate/up GEMM per block of one expert: rows of x gathered by token, x gate_up_proj[e]^T,
     silu(gate) * up in the epilogue                                   -> act [T*k, I] by pair
  5. down GEMM per block: act rows x down_proj[e]^T, x routing weight  -> y [T*k, H] by pair
  6. shared expert: silu(g) * u once per token (a kernel), x shared_down^T (cuBLAS, as the
     reference's linear: a fused kernel re-formed the act for every column tile of H)
  7. combine per [tokens, H] tile: sigmoid(logit) x the shared output, plus the token's k rows of
     y added in ascending expert id (model-dtype rounding after each add, as transformers'
     index_add_) -> out
The number of blocks is bounded by ceil(T*k / BLOCK_M) + min(E, T*k), so the GEMM grids are
static; blocks past the used count exit at once.

Optional `info` (the prefill contract's int64 (row, start, n_valid) on the device): tokens
t >= n_valid are padding; their pairs are never grouped (no expert work) and their output is the
shared-expert term alone, in both backends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._util import INTERPRET, MODEL_DTYPES, check_info, check_rows, next_pow2, pdl, pdl_wait
from .decode import check_expert_args
from .grouping import group_pairs, max_blocks, pair_chunk
from ..linear.dense import mm_rows_aligned

__all__ = ["GemmTiles", "MoeGroupedLaunch", "MoeGroupedWorkspace", "moe_grouped_launch_config", "moe_grouped_workspace",
           "moe_experts_grouped_reference", "moe_experts_grouped_triton"]

BLOCK_MS = (16, 32, 64, 128)   # pair rows per expert block; tl.dot needs every dim >= 16
_MIN_BLOCK_M, _MAX_BLOCK_M = BLOCK_MS[0], BLOCK_MS[-1]


# ----------------------------------------------------------------------------- launch, workspace
@dataclass(frozen=True)
class GemmTiles:
    """One kernel's tiles and schedule: the gate/up and down GEMMs have different shapes (K = H
    against K = I), so each has its own."""
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # grid (column tiles, blocks) instead of (blocks, column tiles): the programs of one block's
    # column tiles launch side by side, so its gathered rows are read from L2 by all of them at
    # about the same time (and an expert's weights by its blocks), not again a wave later
    columns_first: bool = False


@dataclass(frozen=True)
class MoeGroupedLaunch:
    """Tile configuration; a pure function of the shapes (moe_grouped_launch_config), never
    autotuned, so it is safe inside a CUDA-graph capture."""
    block_m: int              # pair rows per expert block (one of BLOCK_MS); experts padded to it
    gate_up: GemmTiles        # block_n: columns of gate (and as many of up) per program
    down: GemmTiles
    shared_block_m: int       # tokens per program of the shared-expert + combine kernel
    shared: GemmTiles


def moe_grouped_launch_config(t: int, h: int, i: int, k: int, e: int, i_s: int, *,
                              large_tiles: bool = True) -> MoeGroupedLaunch:
    """block_m by the pairs per expert; past 64 pairs an expert on average (35b-a3b: chunks over
    2,048 tokens) the tiles a sweep chose on an H100 at 4,096 tokens (tools.bench_moe_prefill:
    1229 -> 1064 us an op; bigger tiles read each expert's weights into fewer programs).
    large_tiles=False keeps the smaller tiles there (the int4 kernels were not swept)."""
    avg = t * k / e                                      # pairs per expert, on average
    block_m = 16 if avg <= 16 else 32 if avg <= 32 else 64
    few = t * k <= 64                                    # a handful of blocks: narrower tiles, more programs
    bn = lambda n, cap: max(16, min(cap, next_pow2(n)))  # noqa: E731
    bk = bn(max(h, i, i_s), 64)
    # shared expert + combine: n64, 4 warps. n128 with 8 warps won a sweep of the op alone on an H100
    # (1080 -> 1054 us at 4,096 tokens) but took 227 against 168 us a call inside the prefill (why is
    # not known), and overflowed shared memory in the int4 op's fp32 path
    shared_m, shared = max(16, min(64, next_pow2(t))), GemmTiles(bn(h, 64), bk, 4, 3)
    if large_tiles and avg > 64:
        return MoeGroupedLaunch(128, GemmTiles(bn(i, 128), bk, 8, 4), GemmTiles(bn(h, 256), bk, 8, 4), shared_m, shared)
    return MoeGroupedLaunch(block_m, GemmTiles(bn(i, 32 if few else 64), bk, 4, 3),
                            GemmTiles(bn(h, 32 if few else 128), bk, 4, 3), shared_m, shared)


@dataclass(frozen=True)
class MoeGroupedWorkspace:
    """Preallocated buffers of moe_experts_grouped (allocate once, before capture). Sized for up to
    `tokens` x `top_k` pairs and any block_m of BLOCK_MS; the reference backend checks but never uses them."""
    tokens: int
    top_k: int
    num_experts: int
    chunk_counts: torch.Tensor    # int32 [chunks * E]: pairs of each chunk per expert
    chunk_base: torch.Tensor      # int32 [chunks * E]: sorted row of each chunk's first pair per expert
    block_info: torch.Tensor      # int32 [blocks, 2]: (expert, valid rows) of each GEMM block
    sorted_pairs: torch.Tensor    # int32 [rows]: pair index (token * k + slot) per expert-sorted row
    act: torch.Tensor             # model dtype [T * k, I]: silu(gate) * up of each pair
    y: torch.Tensor               # model dtype [T * k, H]: weighted down output of each pair
    shared_act: torch.Tensor      # model dtype [T, I_shared]: the shared expert's silu(gate) * up
    shared_y: torch.Tensor        # model dtype [T, H]: the shared expert's down output (cuBLAS)


def moe_grouped_workspace(tokens, top_k, num_experts, hidden, intermediate, shared_intermediate, dtype,
                          device) -> MoeGroupedWorkspace:
    """Buffers for chunks of up to `tokens` tokens."""
    for name, v in (("tokens", tokens), ("top_k", top_k), ("num_experts", num_experts), ("hidden", hidden),
                    ("intermediate", intermediate), ("shared_intermediate", shared_intermediate)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    p, e = tokens * top_k, num_experts
    chunks = triton.cdiv(p, pair_chunk(p))
    i32 = dict(dtype=torch.int32, device=device)
    return MoeGroupedWorkspace(
        tokens, top_k, e,
        chunk_counts=torch.empty(chunks * e, **i32), chunk_base=torch.empty(chunks * e, **i32),
        block_info=torch.empty(max_blocks(p, e, _MIN_BLOCK_M), 2, **i32),
        sorted_pairs=torch.empty(max_blocks(p, e, _MAX_BLOCK_M) * _MAX_BLOCK_M, **i32),
        act=torch.empty(p, intermediate, dtype=dtype, device=device),
        y=torch.empty(p, hidden, dtype=dtype, device=device),
        shared_act=torch.empty(tokens, shared_intermediate, dtype=dtype, device=device),
        shared_y=torch.empty(tokens, hidden, dtype=dtype, device=device))


# ----------------------------------------------------------------------------- checks
def check_launch(cfg) -> None:
    """Every tile a power of two >= 16 (tl.dot's smallest), warps a power of two, stages >= 1."""
    if not isinstance(cfg, MoeGroupedLaunch):
        raise TypeError(f"launch must be a MoeGroupedLaunch (moe_grouped_launch_config), got {type(cfg)}")
    tiles = {"shared_block_m": cfg.shared_block_m}
    for kernel in ("gate_up", "down", "shared"):
        t = getattr(cfg, kernel)
        tiles.update({f"{kernel}.block_n": t.block_n, f"{kernel}.block_k": t.block_k})
        if t.num_warps not in (1, 2, 4, 8, 16) or t.num_stages < 1:
            raise ValueError(f"launch.{kernel}: num_warps={t.num_warps} must be a power of two <= 16 and "
                             f"num_stages={t.num_stages} >= 1")
    for name, v in tiles.items():
        if v < 16 or v & (v - 1):
            raise ValueError(f"launch.{name}={v} must be a power of two >= 16 (tl.dot's smallest tile)")


def tile_args(tiles: GemmTiles) -> dict:
    """A kernel's launch arguments for its tiles."""
    return dict(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def gemm_grid(tiles: GemmTiles, n_blocks: int, n: int) -> tuple[tuple[int, int], dict]:
    """The grid of a grouped GEMM over n_blocks expert blocks and n output columns, and the
    kernel's COLUMNS_FIRST flag (tiles.columns_first) with its tile arguments."""
    cols = triton.cdiv(n, tiles.block_n)
    grid = (cols, n_blocks) if tiles.columns_first else (n_blocks, cols)
    return grid, dict(COLUMNS_FIRST=tiles.columns_first, **tile_args(tiles))


def grouping_blocks(cfg, ws, n_pairs: int, e: int) -> int:
    """The GEMM blocks (grid rows) of grouping n_pairs pairs over e experts with cfg.block_m rows a
    block, refused where block_m is not one of BLOCK_MS or the grouping does not fit the workspace."""
    n_chunks = triton.cdiv(n_pairs, pair_chunk(n_pairs))
    n_blocks = max_blocks(n_pairs, e, cfg.block_m)
    if cfg.block_m not in BLOCK_MS or n_chunks * e > ws.chunk_counts.numel() \
            or n_blocks > ws.block_info.shape[0] or n_blocks * cfg.block_m > ws.sorted_pairs.numel():
        raise ValueError(f"launch block_m={cfg.block_m} for {n_pairs} pairs does not fit the workspace "
                         f"(block_m must be one of {BLOCK_MS}; the workspace takes {ws.tokens} x {ws.top_k} pairs)")
    return n_blocks


def _check_grouped(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit,
                   workspace, out, info):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    t, h = x.shape
    check_rows("x", x, t, h)
    if x.dtype not in MODEL_DTYPES:
        raise TypeError(f"x must be one of {MODEL_DTYPES}, got {x.dtype}")
    for name, v in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj), ("shared_gate_up", shared_gate_up),
                    ("shared_down", shared_down), ("out", out)):
        if v.dtype != x.dtype:   # the tensor-core dots take one operand dtype
            raise TypeError(f"{name} must be {x.dtype} like x, got {v.dtype}")
    t, h, e, i, k, i_s = check_expert_args(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                           shared_gate_logit, out)
    if not isinstance(workspace, MoeGroupedWorkspace):
        raise TypeError(f"workspace must be a MoeGroupedWorkspace (moe_grouped_workspace), got {type(workspace)}")
    if workspace.tokens * workspace.top_k < t * k or workspace.num_experts != e or workspace.top_k != k \
            or tuple(workspace.act.shape) != (workspace.tokens * k, i) or workspace.y.shape[1] != h \
            or workspace.act.dtype != x.dtype or workspace.y.dtype != x.dtype:
        raise ValueError(f"workspace (tokens={workspace.tokens}, top_k={workspace.top_k}, "
                         f"experts={workspace.num_experts}, act {tuple(workspace.act.shape)} {workspace.act.dtype}) "
                         f"does not fit T={t}, k={k}, E={e}, I={i}, H={h}, {x.dtype}")
    if info is not None:
        check_info(info, x.device)
    return t, h, e, i, k, i_s


# ----------------------------------------------------------------------------- reference
def moe_experts_grouped_reference(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                  shared_gate_logit, workspace, out, info=None) -> None:
    """transformers' eager experts loop: per expert (ascending id) its tokens batched through
    gate/up, silu(gate) * up, down, x routing weight, index-added into a model-dtype total; then
    + sigmoid(shared_gate_logit) * shared expert. Padding tokens (t >= n_valid) get the shared term."""
    t, h, e, i, k, i_s = _check_grouped(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                        shared_gate_logit, workspace, out, info)
    n = t if info is None else max(0, min(t, int(info.reshape(3)[2])))
    silu, linear = torch.nn.functional.silu, torch.nn.functional.linear
    total = torch.zeros(t, h, dtype=x.dtype, device=x.device)
    chosen = ids[:n].long()
    for ex in range(e):
        tok, slot = torch.where(chosen == ex)
        if tok.numel() == 0:
            continue
        gate, up = linear(x[tok], gate_up_proj[ex]).chunk(2, dim=-1)
        y = linear(silu(gate) * up, down_proj[ex]) * weights[tok, slot, None]
        total.index_add_(0, tok, y.to(x.dtype))
    ys = linear(silu(shared_gate_up[:, :i_s]) * shared_gate_up[:, i_s:2 * i_s], shared_down)
    out.copy_(total + torch.sigmoid(shared_gate_logit.reshape(t, 1)) * ys)


# ----------------------------------------------------------------------------- GEMM kernels
@triton.jit
def _rnd(x, dt: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 x rounded to the model dtype `dt` (a rounding point), returned as fp32. EMULATE: bf16
    round-to-nearest-even in integer arithmetic, for the CPU interpreter, whose casts truncate."""
    if EMULATE:
        b = x.to(tl.int32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b: bf16/fp16 on the tensor cores; fp32 models (and the interpreter, whose
    low-precision dot is unreliable) in exact fp32 products."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _block_rows(block_ptr, sorted_ptr, BLOCK_M: tl.constexpr, COLUMNS_FIRST: tl.constexpr):
    """(expert, valid rows, pair index per row, row mask, column tile) of this program (gemm_grid)."""
    if COLUMNS_FIRST:
        b, col = tl.program_id(1), tl.program_id(0)
    else:
        b, col = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_ptr + b * 2).to(tl.int64)
    rows = tl.load(block_ptr + b * 2 + 1)
    offs_m = tl.arange(0, BLOCK_M)
    mm = offs_m < rows
    pair = tl.load(sorted_ptr + b * BLOCK_M + offs_m, mask=mm, other=0).to(tl.int64)
    return e, rows, pair, mm, col


@triton.jit
def _moe_gate_up_gemm_kernel(x_ptr, gu_ptr, block_ptr, sorted_ptr, act_ptr, H, I, TOPK, stride_x,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT_FP32: tl.constexpr, EMULATE: tl.constexpr, COLUMNS_FIRST: tl.constexpr,
                             USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    e, rows, pair, mm, col = _block_rows(block_ptr, sorted_ptr, BLOCK_M, COLUMNS_FIRST)
    if rows == 0:                        # a block past the used count
        return
    offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (pair // TOPK)[:, None] * stride_x + offs_k[None, :]
    g_ptrs = gu_ptr + (e * 2 * I + offs_n)[None, :] * H + offs_k[:, None]      # [BLOCK_K, BLOCK_N] of W^T
    u_ptrs = g_ptrs + I * H
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        mk = (k0 + offs_k) < H
        a = tl.load(a_ptrs + k0, mask=mm[:, None] & mk[None, :], other=0.0)
        wg = tl.load(g_ptrs + k0, mask=mk[:, None] & mn[None, :], other=0.0)
        wu = tl.load(u_ptrs + k0, mask=mk[:, None] & mn[None, :], other=0.0)
        acc_g = _mma(a, wg, acc_g, DOT_FP32)
        acc_u = _mma(a, wu, acc_u, DOT_FP32)
    dt: tl.constexpr = act_ptr.dtype.element_ty
    g = _rnd(acc_g, dt, EMULATE)
    u = _rnd(acc_u, dt, EMULATE)
    a = _rnd(_rnd(g * tl.sigmoid(g), dt, EMULATE) * u, dt, EMULATE)
    tl.store(act_ptr + pair[:, None] * I + offs_n[None, :], a.to(dt), mask=mm[:, None] & mn[None, :])


@triton.jit
def _moe_down_gemm_kernel(act_ptr, dn_ptr, w_ptr, block_ptr, sorted_ptr, y_ptr, H, I,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_FP32: tl.constexpr, EMULATE: tl.constexpr, COLUMNS_FIRST: tl.constexpr,
                          USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    e, rows, pair, mm, col = _block_rows(block_ptr, sorted_ptr, BLOCK_M, COLUMNS_FIRST)
    if rows == 0:
        return
    offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair[:, None] * I + offs_k[None, :]
    w_ptrs = dn_ptr + (e * H + offs_n)[None, :] * I + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        mk = (k0 + offs_k) < I
        a = tl.load(a_ptrs + k0, mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=mk[:, None] & mn[None, :], other=0.0)
        acc = _mma(a, w, acc, DOT_FP32)
    dt: tl.constexpr = y_ptr.dtype.element_ty
    wt = tl.load(w_ptr + pair, mask=mm, other=0.0).to(tl.float32)
    y = _rnd(_rnd(acc, dt, EMULATE) * wt[:, None], dt, EMULATE)
    tl.store(y_ptr + pair[:, None] * H + offs_n[None, :], y.to(dt), mask=mm[:, None] & mn[None, :])


@triton.jit
def _shared_act_tile(g_ptrs, k0, ma, IS, dt: tl.constexpr, EMULATE: tl.constexpr):
    """The shared expert's act silu(g) * u for the [BLOCK_M, BLOCK_K] tile at column k0, formed from
    its gate/up rows while loading (rounded as the reference)."""
    g = tl.load(g_ptrs + k0, mask=ma, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + IS + k0, mask=ma, other=0.0).to(tl.float32)
    return _rnd(_rnd(g * tl.sigmoid(g), dt, EMULATE) * u, dt, EMULATE).to(dt)


@triton.jit
def _combine_store(acc, sgl_ptr, ids_ptr, y_ptr, info_ptr, out_ptr, offs_m, offs_n, mm, mn, T, H, TOPK,
                   stride_sgl, stride_out, HAS_INFO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_TOPK: tl.constexpr, EMULATE: tl.constexpr):
    """out tile = (each token's k rows of y in ascending expert id, rounding after each add)
    + sigmoid(shared gate logit) * acc, acc the shared expert's fp32 [BLOCK_M, BLOCK_N] product."""
    dt: tl.constexpr = out_ptr.dtype.element_ty
    gl = tl.load(sgl_ptr + offs_m * stride_sgl, mask=mm, other=0.0).to(tl.float32)
    gs = _rnd(tl.sigmoid(gl), dt, EMULATE)
    ys = _rnd(gs[:, None] * _rnd(acc, dt, EMULATE), dt, EMULATE)
    n_tok = T
    if HAS_INFO:
        n_tok = tl.minimum(tl.load(info_ptr + 2).to(tl.int32), T)
    routed = offs_m < n_tok
    offs_j = tl.arange(0, BLOCK_TOPK)
    big = 2147483647
    ids = tl.load(ids_ptr + offs_m[:, None] * TOPK + offs_j[None, :],
                  mask=routed[:, None] & (offs_j < TOPK)[None, :], other=big)
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, TOPK):
        first = tl.min(ids, axis=1)
        slot = tl.min(tl.where(ids == first[:, None], offs_j[None, :], BLOCK_TOPK), axis=1)
        ids = tl.where(offs_j[None, :] == slot[:, None], big, ids)
        pr = offs_m.to(tl.int64) * TOPK + slot
        mine = routed & (first >= 0)     # id < 0 (another rank's expert) was never grouped: no y row
        yv = tl.load(y_ptr + pr[:, None] * H + offs_n[None, :], mask=mine[:, None] & mn[None, :], other=0.0)
        total = _rnd(total + yv.to(tl.float32), dt, EMULATE)
    res = _rnd(total + ys, dt, EMULATE)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :], res.to(dt),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _shared_act_kernel(sgu_ptr, act_ptr, T, IS, stride_sgu, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       EMULATE: tl.constexpr, USE_GDC: tl.constexpr):
    """act = silu(g) * u of the shared expert, once per token (the down GEMM is cuBLAS's)."""
    pdl_wait(USE_GDC)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ma = (offs_m < T)[:, None] & (offs_k < IS)[None, :]
    dt: tl.constexpr = act_ptr.dtype.element_ty
    a = _shared_act_tile(sgu_ptr + offs_m.to(tl.int64)[:, None] * stride_sgu + offs_k[None, :], 0, ma, IS, dt,
                         EMULATE)
    tl.store(act_ptr + offs_m.to(tl.int64)[:, None] * IS + offs_k[None, :], a, mask=ma)


@triton.jit
def _moe_combine_kernel(sy_ptr, sgl_ptr, ids_ptr, y_ptr, info_ptr, out_ptr, T, H, TOPK, stride_sgl, stride_out,
                        HAS_INFO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_TOPK: tl.constexpr, EMULATE: tl.constexpr, USE_GDC: tl.constexpr):
    """out tile = the routed rows of y in ascending expert id + sigmoid(gate) * the shared output."""
    pdl_wait(USE_GDC)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < T
    mn = offs_n < H
    sy = tl.load(sy_ptr + offs_m.to(tl.int64)[:, None] * H + offs_n[None, :], mask=mm[:, None] & mn[None, :],
                 other=0.0).to(tl.float32)     # already rounded: _combine_store's rounding of it is exact
    _combine_store(sy, sgl_ptr, ids_ptr, y_ptr, info_ptr, out_ptr, offs_m, offs_n, mm, mn, T, H, TOPK,
                   stride_sgl, stride_out, HAS_INFO, BLOCK_M, BLOCK_N, BLOCK_TOPK, EMULATE)


# ----------------------------------------------------------------------------- Triton op
def moe_experts_grouped_triton(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                               shared_gate_logit, workspace, out, info=None, *,
                               launch: MoeGroupedLaunch | None = None) -> None:
    """Same contract as moe_experts_grouped_reference; `launch` overrides the tiles (benchmarks)."""
    t, h, e, i, k, i_s = _check_grouped(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                        shared_gate_logit, workspace, out, info)
    cfg = launch or moe_grouped_launch_config(t, h, i, k, e, i_s)
    ws = workspace
    p = t * k
    check_launch(cfg)
    n_blocks = grouping_blocks(cfg, ws, p, e)
    dot_fp32 = INTERPRET or x.dtype == torch.float32
    emulate = INTERPRET and x.dtype == torch.bfloat16
    has_info = info is not None
    opts = pdl(x)
    # 1-3: group the pairs by expert
    group_pairs(ids, info, p, e, cfg.block_m, ws.chunk_counts, ws.chunk_base, ws.block_info, ws.sorted_pairs)
    # 4-5: the grouped GEMMs
    flags = dict(BLOCK_M=cfg.block_m, DOT_FP32=dot_fp32, EMULATE=emulate)
    grid, tiles = gemm_grid(cfg.gate_up, n_blocks, i)
    _moe_gate_up_gemm_kernel[grid](x, gate_up_proj, ws.block_info, ws.sorted_pairs, ws.act, h, i, k, x.stride(0),
                                   **flags, **tiles, **opts)
    grid, tiles = gemm_grid(cfg.down, n_blocks, h)
    _moe_down_gemm_kernel[grid](ws.act, down_proj, weights, ws.block_info, ws.sorted_pairs, ws.y, h, i, **flags,
                                **tiles, **opts)
    # 6: shared expert (act here, the down GEMM on cuBLAS, as the reference's linear), then the ordered sum
    sgl = shared_gate_logit  # [T] or [T, 1], any row stride: one element per token
    act_s, y_s = ws.shared_act[:t], ws.shared_y[:t]
    _shared_act_kernel[(triton.cdiv(t, cfg.shared_block_m), triton.cdiv(i_s, cfg.shared.block_k))](
        shared_gate_up, act_s, t, i_s, shared_gate_up.stride(0), BLOCK_M=cfg.shared_block_m,
        BLOCK_K=cfg.shared.block_k, EMULATE=emulate, num_warps=4, **opts)
    mm_rows_aligned(act_s, shared_down, y_s)
    _moe_combine_kernel[(triton.cdiv(t, cfg.shared_block_m), triton.cdiv(h, cfg.shared.block_n))](
        y_s, sgl, ids, ws.y, info, out, t, h, k, sgl.stride(0), out.stride(0), HAS_INFO=has_info,
        BLOCK_M=cfg.shared_block_m, BLOCK_N=cfg.shared.block_n, BLOCK_TOPK=next_pow2(k), EMULATE=emulate,
        num_warps=cfg.shared.num_warps, **opts)
