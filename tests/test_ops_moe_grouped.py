"""moe_experts_grouped (prefill MoE, grouped GEMMs): Triton vs its reference, the reference vs the
decode op's per-row reference, the expert grouping itself, padding tokens (info) and argument checks.

Tolerances: fp32 1e-5 (summation order only). bf16: the kernels round at the reference's points
(under the interpreter through an exact round-to-nearest-even), so they differ only where a
different fp32 summation order flips a rounding: checked as 1e-2 abs/rel and >= 98% bit-equal."""
import dataclasses
import pytest
import torch

from model.ops import moe

DTYPES = [torch.float32, torch.bfloat16]
H, I, IS = 64, 32, 32


def _close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
        assert (got == want).float().mean() >= 0.98


def _inputs(g, t, e, k, dtype, device, ids=None, h=H, i=I, i_s=IS):
    x = torch.randn(t, h, generator=g).to(dtype).to(device)
    gu = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype).to(device)
    dn = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype).to(device)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids = ids.to(torch.int32).to(device)
    w = torch.softmax(torch.randn(t, k, generator=g), -1).to(dtype).to(device)
    fused = torch.randn(t, e + 2 * i_s + 1 + 3, generator=g).to(dtype).to(device)   # router | shared g/u | gate
    sgu = fused[:, e:e + 2 * i_s]
    sgl = fused[:, e + 2 * i_s:e + 2 * i_s + 1]
    sdn = (torch.randn(h, i_s, generator=g) / i_s ** 0.5).to(dtype).to(device)
    return [x, gu, dn, ids, w, sgu, sdn, sgl]


def _workspace(t, k, e, dtype, device, h=H, i=I, i_s=IS):
    """A workspace full of garbage: the op must not rely on zeroed or stale buffers."""
    ws = moe.moe_grouped_workspace(t, k, e, h, i, i_s, dtype, device)
    for buf in (ws.chunk_counts, ws.chunk_base, ws.block_info, ws.sorted_pairs):
        buf.fill_(-7)
    ws.act.fill_(float("nan"))
    ws.y.fill_(float("nan"))
    return ws


def _run(fn, args, ws, info=None, **kw):
    x = args[0]
    out = torch.full_like(x, float("nan"))
    fn(*args, ws, out, info, **kw)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (5, 8, 4), (64, 8, 3), (100, 8, 4), (7, 12, 1)])
def test_triton_matches_references(device, dtype, t, e, k):
    g = torch.Generator().manual_seed(t * 10 + k)
    args = _inputs(g, t, e, k, dtype, device)
    ws = _workspace(t, k, e, dtype, device)
    got = _run(moe.moe_experts_grouped_triton, args, ws)
    want = _run(moe.moe_experts_grouped_reference, args, ws)
    _close(got, want, dtype)
    # the decode op's per-row reference: same math, one token at a time
    per_row = torch.full_like(want, float("nan"))
    moe.moe_experts_reference(*args, moe.moe_workspace(t, k, I, dtype, device), per_row)
    _close(want, per_row, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_skewed_routing(device, dtype):
    """Expert 3 gets no token; every token picks expert 5 (several blocks of one expert; with
    block_m 16, seven); remaining slots random."""
    t, e, k = 100, 8, 3
    g = torch.Generator().manual_seed(5)
    others = [0, 1, 2, 4, 6, 7]
    ids = torch.stack([torch.tensor([5] + [others[j] for j in torch.randperm(6, generator=g)[:k - 1]])
                       for _ in range(t)])
    args = _inputs(g, t, e, k, dtype, device, ids=ids)
    ws = _workspace(t, k, e, dtype, device)
    want = _run(moe.moe_experts_grouped_reference, args, ws)
    _close(_run(moe.moe_experts_grouped_triton, args, ws), want, dtype)
    cfg = moe.moe_grouped_launch_config(t, H, I, k, e, IS)
    # columns first: the grid (column tiles, blocks), with 16-column tiles two and four of them
    cols = {kernel: dataclasses.replace(getattr(cfg, kernel), block_n=16, columns_first=True)
            for kernel in ("gate_up", "down")}
    for block_m, tiles in ((16, {}), (128, {}), (16, cols)):   # seven blocks of expert 5; one of 128, all its 100 rows
        launch = dataclasses.replace(cfg, block_m=block_m, **tiles)
        _close(_run(moe.moe_experts_grouped_triton, args, _workspace(t, k, e, dtype, device), launch=launch),
               want, dtype)


def test_grouping_is_a_padded_sort_by_expert(device):
    """The workspace after a run: blocks in ascending expert order, each block's valid rows hold
    pairs of its expert in ascending order, and every pair appears exactly once."""
    t, e, k = 37, 8, 4
    g = torch.Generator().manual_seed(11)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[:, 0] = 6
    args = _inputs(g, t, e, k, torch.float32, device, ids=ids)
    ws = _workspace(t, k, e, torch.float32, device)
    _run(moe.moe_experts_grouped_triton, args, ws)
    bm = moe.moe_grouped_launch_config(t, H, I, k, e, IS).block_m
    _check_grouping(ids, ws.block_info, ws.sorted_pairs, bm, e)


@pytest.mark.parametrize("block_m", [16, 32, 128])
def test_grouping_at_model_widths(device, block_m):
    """256 experts, top-8, 300 tokens (19 chunks of pairs, up to 406 blocks): the scan runs as
    several programs (slices of experts, tiles of blocks); the same invariants hold."""
    from model.ops.moe.grouping import group_pairs, max_blocks, pair_chunk
    t, e, k = 300, 256, 8
    g = torch.Generator().manual_seed(block_m)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[:, 0] = 200                                  # one expert with 300 rows: several blocks
    ids[ids == 17] = 18                              # an expert without pairs
    p = t * k
    chunks = -(-p // pair_chunk(p))
    i32 = dict(dtype=torch.int32, device=device)
    counts, base = torch.full((chunks * e,), -7, **i32), torch.full((chunks * e,), -7, **i32)
    nb = max_blocks(p, e, block_m)
    blocks, sorted_pairs = torch.full((nb, 2), -7, **i32), torch.full((nb * block_m,), -7, **i32)
    group_pairs(ids.to(torch.int32).to(device).contiguous(), None, p, e, block_m, counts, base, blocks, sorted_pairs)
    _check_grouping(ids, blocks, sorted_pairs, block_m, e)


def _check_grouping(ids, block_info, sorted_pairs, bm, e):
    """Blocks in ascending expert order, each block's valid rows hold pairs of its expert in
    ascending order, every pair appears exactly once, and every expert with pairs has blocks."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    info = block_info[:-(-t * k // bm) + min(e, t * k)].cpu()     # the blocks the GEMM grids cover
    sorted_pairs = sorted_pairs.cpu()
    seen, last_e = [], -1
    for b in range(info.shape[0]):
        ex, rows = info[b].tolist()
        if rows == 0:
            assert all(r == 0 for r in info[b:, 1].tolist())     # unused blocks only at the end
            break
        assert 1 <= rows <= bm and ex >= last_e
        pairs = sorted_pairs[b * bm:b * bm + rows].long()
        assert (flat[pairs] == ex).all() and (pairs.diff() > 0).all()
        if ex == last_e:
            assert pairs[0] > seen[-1]
        seen += pairs.tolist()
        last_e = ex
    assert sorted(seen) == list(range(t * k))
    counts = torch.bincount(flat.long(), minlength=e)
    assert info[:, 0][info[:, 1] > 0].unique().tolist() == torch.nonzero(counts).flatten().tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_into_grouped_experts(device, dtype):
    """Tie-free router logits -> router_topk_reference -> the grouped op, both backends."""
    t, e, k = 33, 16, 4
    g = torch.Generator().manual_seed(3)
    logits = torch.stack([(torch.randperm(e, generator=g).float() - e / 2) / 16 for _ in range(t)])
    logits = logits.to(dtype).to(device)
    wts = torch.full((t, k), float("nan"), dtype=dtype, device=device)
    ids = torch.full((t, k), -1, dtype=torch.int32, device=device)
    moe.router_topk_reference(logits, k, wts, ids)
    args = _inputs(g, t, e, k, dtype, device, ids=ids)
    args[4] = wts
    ws = _workspace(t, k, e, dtype, device)
    _close(_run(moe.moe_experts_grouped_triton, args, ws), _run(moe.moe_experts_grouped_reference, args, ws), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_tokens_change_nothing(device, dtype):
    """info n_valid = 37 of 64: valid rows as a run on those 37 tokens alone, padding rows (x NaN,
    all on expert 0) get the shared term only, in both backends; n_valid is read on the device."""
    t, n, e, k = 64, 37, 8, 3
    g = torch.Generator().manual_seed(9)
    args = _inputs(g, t, e, k, dtype, device)
    args[0][n:] = float("nan")
    args[3][n:, 0] = 0
    ws = _workspace(t, k, e, dtype, device)
    info = torch.tensor([2, 100, n], dtype=torch.int64, device=device)
    got = _run(moe.moe_experts_grouped_triton, args, ws, info)
    bm = moe.moe_grouped_launch_config(t, H, I, k, e, IS).block_m
    assert int(ws.block_info[:-(-t * k // bm) + e, 1].sum()) == n * k      # padding pairs were never grouped
    want = _run(moe.moe_experts_grouped_reference, args, ws, info)
    _close(got, want, dtype)
    sub = [args[0][:n], args[1], args[2], args[3][:n].contiguous(), args[4][:n].contiguous(), args[5][:n],
           args[6], args[7][:n]]
    _close(got[:n], _run(moe.moe_experts_grouped_reference, sub, ws), dtype)
    sgu, sdn, sgl = args[5], args[6], args[7]
    shared = torch.sigmoid(sgl[n:]) * torch.nn.functional.linear(
        torch.nn.functional.silu(sgu[n:, :IS]) * sgu[n:, IS:], sdn)
    _close(got[n:], shared, dtype)
    # the same workspace and tensors with every token valid: info's value, not its presence, decides
    info.fill_(t)
    info[0] = 2
    args[0][n:] = 0.5
    _close(_run(moe.moe_experts_grouped_triton, args, ws, info), _run(moe.moe_experts_grouped_reference, args, ws),
           dtype)


def test_argument_checks(device):
    t, e, k = 4, 8, 2
    g = torch.Generator().manual_seed(1)
    args = _inputs(g, t, e, k, torch.float32, device)
    ws = _workspace(t, k, e, torch.float32, device)
    out = torch.empty(t, H, device=device)
    for fn in (moe.moe_experts_grouped_triton, moe.moe_experts_grouped_reference):
        bad = list(args)
        bad[3] = args[3].long()
        with pytest.raises(TypeError, match="ids must be int32"):
            fn(*bad, ws, out)
        bad = list(args)
        bad[2] = args[2].to(torch.float64)
        with pytest.raises(TypeError, match="down_proj"):
            fn(*bad, ws, out)
        with pytest.raises(TypeError, match="MoeGroupedWorkspace"):
            fn(*args, ws.act, out)
        with pytest.raises(ValueError, match="does not fit"):
            fn(*args, _workspace(t, k, e, torch.bfloat16, device), out)
        with pytest.raises(ValueError, match="does not fit"):
            fn(*args, _workspace(t - 1, k, e, torch.float32, device), out)
        with pytest.raises(TypeError, match="info"):
            fn(*args, ws, out, torch.tensor([0, 0, 4], dtype=torch.int32, device=device))
        with pytest.raises(ValueError, match="info"):
            fn(*args, ws, out, torch.tensor([0, 4], dtype=torch.int64, device=device))
        with pytest.raises(ValueError, match="out"):
            fn(*args, ws, out[:, :-1])
    cfg = moe.moe_grouped_launch_config(t, H, I, k, e, IS)
    with pytest.raises(ValueError, match=r"block_m=8 .* must be one of \(16, 32, 64, 128\)"):
        moe.moe_experts_grouped_triton(*args, ws, out, launch=dataclasses.replace(cfg, block_m=8))
    for kernel, field, v, name in (("gate_up", "block_n", 48, "gate_up.block_n=48"), ("shared", "block_k", 8, "shared.block_k=8")):
        bad = dataclasses.replace(cfg, **{kernel: dataclasses.replace(getattr(cfg, kernel), **{field: v})})
        with pytest.raises(ValueError, match=rf"launch\.{name} must be a power of two >= 16"):
            moe.moe_experts_grouped_triton(*args, ws, out, launch=bad)
    with pytest.raises(ValueError, match="launch.down: num_warps=3"):
        moe.moe_experts_grouped_triton(*args, ws, out, launch=dataclasses.replace(cfg, down=dataclasses.replace(cfg.down, num_warps=3)))
    with pytest.raises(TypeError, match="launch must be a MoeGroupedLaunch"):
        moe.moe_experts_grouped_triton(*args, ws, out, launch={"block_m": 64})
    with pytest.raises(ValueError, match="tokens"):
        moe.moe_grouped_workspace(0, k, e, H, I, IS, torch.float32, device)
