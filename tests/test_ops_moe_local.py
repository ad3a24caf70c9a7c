"""The MoE ops under expert parallelism (model/parallel): router_topk(local_experts=...) renumbers
this rank's experts from 0 and marks every other one -1; the experts ops (decode, grouped prefill,
their int4 forms) skip id -1 without reading any weight for it; and summed over the ranks, each
rank's output (its experts' share + the gated shared expert over its columns) is the whole MoE."""
import pytest
import torch

from model.ops import moe
from model.ops.moe import int4 as moe4
from model.quant import QuantizedLinear, quantize

H, I, IS = 64, 32, 24


def _distinct_logits(g, b, e):
    return torch.stack([(torch.randperm(e, generator=g).float() - e / 2) / 8 for _ in range(b)])


@pytest.mark.parametrize("fn", [moe.router_topk_reference, moe.router_topk_triton])
def test_router_local_experts_renumbers_and_marks_the_others(fn):
    g = torch.Generator().manual_seed(1)
    b, e, k = 5, 16, 4
    logits = _distinct_logits(g, b, e)
    w_all, i_all = torch.empty(b, k), torch.empty(b, k, dtype=torch.int32)
    fn(logits, k, w_all, i_all)
    for start, count in ((0, 4), (4, 4), (12, 4), (8, 8)):
        w = torch.full((b, k), float("nan"))
        ids = torch.full((b, k), 99, dtype=torch.int32)
        fn(logits, k, w, ids, local_experts=(start, count))
        held = (i_all >= start) & (i_all < start + count)
        assert torch.equal(ids, torch.where(held, i_all - start, -1).to(torch.int32)), (start, count)
        assert torch.equal(w, w_all)            # the routing weights are the whole router's


@pytest.mark.parametrize("bad", [(0, 0), (-1, 4), (12, 5), (1.0, 2), [0, 4], (True, 2)])
def test_router_local_experts_checked(bad):
    with pytest.raises(ValueError, match="local_experts"):
        moe.router_topk_reference(torch.zeros(1, 16), 2, torch.empty(1, 2), torch.empty(1, 2, dtype=torch.int32),
                                  local_experts=bad)


def _inputs(g, b, e, k):
    x = torch.randn(b, H, generator=g)
    gu = torch.randn(e, 2 * I, H, generator=g) / H ** 0.5
    dn = torch.randn(e, H, I, generator=g) / I ** 0.5
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b)]).to(torch.int32)
    w = torch.softmax(torch.randn(b, k, generator=g), -1)
    sgu = torch.randn(b, 2 * IS, generator=g)
    sgl = torch.randn(b, 1, generator=g)
    sdn = torch.randn(H, IS, generator=g) / IS ** 0.5
    return x, gu, dn, ids, w, sgu, sdn, sgl


def _rank_args(args, r, n):
    """Rank r of n's arguments: its experts (ids renumbered, others -1), its shared-expert columns."""
    x, gu, dn, ids, w, sgu, sdn, sgl = args
    el, sl = gu.shape[0] // n, IS // n
    held = (ids >= r * el) & (ids < (r + 1) * el)
    lids = torch.where(held, ids - r * el, -1).to(torch.int32)
    cols = slice(r * sl, (r + 1) * sl)
    lsgu = torch.cat([sgu[:, :IS][:, cols], sgu[:, IS:][:, cols]], 1)
    return (x, gu[r * el:(r + 1) * el].contiguous(), dn[r * el:(r + 1) * el].contiguous(), lids, w, lsgu,
            sdn[:, cols].contiguous(), sgl)


def _decode(fn, args, act=None):
    x, gu, dn, ids, *_ = args
    b, k = ids.shape
    ws = moe.moe_workspace(b, k, I, x.dtype, x.device).fill_(float("nan"))
    out = torch.full_like(x, float("nan"))
    fn(*args, ws, out)
    if act is not None:
        act.append(ws[:b * k * I].view(b, k, I))
    return out


def _grouped(fn, args):
    x, gu, dn, ids, *_ = args
    t, k = ids.shape
    ws = moe.moe_grouped_workspace(t, k, gu.shape[0], H, I, args[6].shape[1], x.dtype, x.device)
    ws.act.fill_(float("nan"))
    ws.y.fill_(float("nan"))      # a slot of another rank's expert has no y row: reading one is NaN
    out = torch.full_like(x, float("nan"))
    fn(*args, ws, out, None)
    return out


OPS = [(_decode, moe.moe_experts_reference), (_decode, moe.moe_experts_triton),
       (_grouped, moe.moe_experts_grouped_reference), (_grouped, moe.moe_experts_grouped_triton)]


@pytest.mark.parametrize("run,fn", OPS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("n", [2, 4])
def test_ranks_sum_to_the_whole_moe(run, fn, n):
    g = torch.Generator().manual_seed(n)
    b, e, k = (3, 8, 3) if run is _decode else (9, 8, 3)
    args = _inputs(g, b, e, k)
    whole = run(fn, args)
    parts = [run(fn, _rank_args(args, r, n)) for r in range(n)]
    assert any(bool((_rank_args(args, r, n)[3] < 0).any()) for r in range(n))
    torch.testing.assert_close(sum(parts), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("run,fn", OPS, ids=lambda v: getattr(v, "__name__", ""))
def test_other_ranks_experts_are_not_read(run, fn):
    """id -1 would address the expert before the tensor's start: there it is NaN, and the output
    stays finite and equal to the output with the -1 slots' weights zeroed on a second copy."""
    g = torch.Generator().manual_seed(5)
    b, e, k = 4, 4, 2
    x, gu, dn, ids, w, sgu, sdn, sgl = _inputs(g, b, e, k)
    gu_pad = torch.cat([torch.full((1, 2 * I, H), float("nan")), gu])[1:]     # a view: expert -1 is NaN
    dn_pad = torch.cat([torch.full((1, H, I), float("nan")), dn])[1:]
    ids = torch.tensor([[0, -1], [-1, 3], [-1, -1], [2, 1]], dtype=torch.int32)
    act = []
    out = run(fn, (x, gu_pad, dn_pad, ids, w, sgu, sdn, sgl), **({"act": act} if run is _decode else {}))
    assert torch.isfinite(out).all()
    if act and fn is moe.moe_experts_triton:     # the gate/up kernel read no weight for those slots either
        assert torch.equal(act[0][ids < 0], torch.zeros_like(act[0][ids < 0]))
    # the same as routing those slots to an expert whose weights are zero
    gu0, dn0 = torch.cat([gu, torch.zeros(1, 2 * I, H)]), torch.cat([dn, torch.zeros(1, H, I)])
    want = run(fn, (x, gu0, dn0, torch.where(ids < 0, e, ids).to(torch.int32), w, sgu, sdn, sgl))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def _nan_before(q: QuantizedLinear) -> QuantizedLinear:
    """The same int4 experts as a view whose expert -1 (before the start) has NaN scales."""
    def pad(t, fill):
        return torch.cat([torch.full((1, *t.shape[1:]), fill, dtype=t.dtype), t])[1:]

    return QuantizedLinear(pad(q.qweight, 0), pad(q.scales, float("nan")), pad(q.zeros, 0.0), q.group_size,
                           q.shape, q.name)


def _int4_inputs(seed: int, rows: int, gs: int = 32):
    """_inputs for 4 experts and top-2 with the experts and the shared down projection in int4 (RTN,
    group gs, shared width 32): (x, gate_up, down, weights, shared_gate_up, shared_down, gate logit)."""
    g = torch.Generator().manual_seed(seed)
    x, gu, dn, _, w, _, _, sgl = _inputs(g, rows, 4, 2)
    sdn4 = quantize(torch.randn(H, 32, generator=g) / 32 ** 0.5, gs, "rtn")
    return x, quantize(gu, gs, "rtn"), quantize(dn, gs, "rtn"), w, torch.randn(rows, 64, generator=g), sdn4, sgl


@pytest.mark.parametrize("fn", [moe4.moe_experts_int4_reference, moe4.moe_experts_int4_triton])
def test_int4_experts_skip_other_ranks_experts(fn):
    x, gu4, dn4, w, sgu, sdn4, sgl = _int4_inputs(7, 3)
    ids = torch.tensor([[1, -1], [-1, -1], [3, 0]], dtype=torch.int32)
    act = []
    out = _decode(fn, (x, _nan_before(gu4), _nan_before(dn4), ids, w, sgu, sdn4, sgl), act)
    assert torch.isfinite(out).all()
    if fn is moe4.moe_experts_int4_triton:      # the gate/up kernel read no weight for those slots either
        assert torch.equal(act[0][ids < 0], torch.zeros_like(act[0][ids < 0]))
    keep = (ids >= 0).to(w.dtype)
    want = _decode(moe4.moe_experts_int4_reference, (x, gu4, dn4, ids.clamp(min=0), w * keep, sgu, sdn4, sgl))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_grouped_int4_experts_skip_other_ranks_experts():
    from model.ops.moe import grouped_int4

    x, gu4, dn4, w, sgu, sdn4, sgl = _int4_inputs(8, 6)
    ids = torch.tensor([[1, -1], [-1, -1], [3, 0], [-1, 2], [0, 1], [2, -1]], dtype=torch.int32)
    outs = [_grouped(fn, (x, _nan_before(gu4), _nan_before(dn4), ids, w, sgu, sdn4, sgl))
            for fn in (grouped_int4.moe_experts_grouped_int4_reference, grouped_int4.moe_experts_grouped_int4_triton)]
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
