"""norm_gemv(..., route=Route(...)): the router top-k of the GEMV's first columns, fused into the
epilogue of the batch-1 GEMV kernels (bf16 _gemv_kernel, int4 _gemv_int4_rows_kernel) with
MODEL_FUSED_ROUTER=1, else router_topk after it; against the reference, with several router
programs, fewer programs than router blocks, local experts, the fallbacks and the refusals (CPU,
Triton's interpreter)."""
import dataclasses

import pytest
import torch

from model.ops import moe
from model.ops.linear import gemv, int4
from model.ops.moe import decode, route as route_mod
from model.ops.moe.route import Route, route_counter
from model.quant import quantize
from model.settings import SETTINGS

from tests.launch_spy import CountLaunches

E, TOPK, K, N = 40, 4, 64, 72     # 40 router rows among 72 (the shared expert's rows after them)


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setattr(route_mod, "SETTINGS", dataclasses.replace(SETTINGS, fused_router=True))


@pytest.fixture
def topk_launches(monkeypatch):
    c = CountLaunches(decode._router_topk_kernel)
    monkeypatch.setattr(decode, "_router_topk_kernel", c)
    return c


def _inputs(b, dtype=torch.float32, seed=0, quant=False):
    g = torch.Generator().manual_seed(seed)
    x, res, nw = (torch.randn(b, K, generator=g).to(dtype) for _ in range(2)), None, None
    x, res = x
    nw = (torch.randn(K, generator=g) * 0.1).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    return x, res, nw, (quantize(w, 32, "rtn") if quant else w)


def _route(b, local=None):
    return Route(E, TOPK, torch.full((b, TOPK), float("nan")), torch.full((b, TOPK), -7, dtype=torch.int32),
                 local, route_counter("cpu"))


def _expected(out, b, local=None):
    w, ids = torch.empty(b, TOPK), torch.empty(b, TOPK, dtype=torch.int32)
    moe.router_topk_reference(out[:, :E], TOPK, w, ids, local_experts=local)
    return w, ids


CASES = [  # (op, launch, quant): several router programs (block_n 4 -> 10), and striding ones
    (gemv.norm_gemv_triton, gemv.GemvLaunch(1, 4, 64, 4, 3), False),
    (int4.norm_gemv_int4_triton, int4.GemvInt4Launch(1, 4, 64, 4, 1, programs=3), True),
    (int4.norm_gemv_int4_triton, int4.GemvInt4Launch(1, 2, 64, 4, 1, programs=64), True),
]


@pytest.mark.parametrize("op,launch,quant", CASES)
@pytest.mark.parametrize("local", [None, (8, 16)])
def test_fused_route_matches_the_reference(fused, topk_launches, op, launch, quant, local):
    """The fused epilogue writes the reference's top-k of the GEMV's own logits (no router_topk
    launch), leaves the counter at zero, and a second call (a graph replay's situation) works."""
    x, res, nw, w = _inputs(1, quant=quant)
    for _ in range(2):
        r = _route(1, local)
        out = torch.full((1, N), float("nan"))
        op(x, res, nw, 1e-6, w, out, launch=launch, route=r)
        assert not torch.isnan(out).any()
        ew, eids = _expected(out, 1, local)
        assert torch.equal(r.ids_out, eids)
        torch.testing.assert_close(r.weights_out, ew, atol=1e-6, rtol=1e-6)
        assert int(r.counter.item()) == 0
    assert topk_launches.launches == 0
    if local is not None:
        assert (r.ids_out == -1).any() or ((r.ids_out >= 0) & (r.ids_out < 16)).all()


@pytest.mark.parametrize("op,launch,quant", CASES)
def test_unfused_route_is_router_topk_after_the_gemv(topk_launches, op, launch, quant):
    """MODEL_FUSED_ROUTER off (the default): the same weights and ids from a router_topk launch,
    and the GEMV's output equals the GEMV without a route bit for bit."""
    assert route_mod.SETTINGS.fused_router is False
    x, res, nw, w = _inputs(1, quant=quant, seed=1)
    r = _route(1)
    out, plain = torch.full((1, N), float("nan")), torch.full((1, N), float("nan"))
    op(x, res, nw, 1e-6, w, out, launch=launch, route=r)
    op(x, res, nw, 1e-6, w, plain, launch=launch)
    assert torch.equal(out, plain) and topk_launches.launches == 1
    ew, eids = _expected(out, 1)
    assert torch.equal(r.ids_out, eids)
    torch.testing.assert_close(r.weights_out, ew, atol=1e-6, rtol=1e-6)


def test_fused_route_skipped_where_the_kernel_cannot_take_it(fused, topk_launches):
    """bf16 rows at batch 2 (the tensor-core GEMV), and the per-block int4 kernel: router_topk runs
    after the GEMV, and the result is the reference's."""
    x, res, nw, w = _inputs(2, torch.bfloat16, seed=2)
    r = Route(E, TOPK, torch.full((2, TOPK), float("nan"), dtype=torch.bfloat16),
              torch.full((2, TOPK), -7, dtype=torch.int32), None, route_counter("cpu"))
    out = torch.full((2, N), float("nan"), dtype=torch.bfloat16)
    gemv.norm_gemv_triton(x, res, nw, 1e-6, w, out, route=r)
    ids = torch.empty(2, TOPK, dtype=torch.int32)
    moe.router_topk_reference(out[:, :E], TOPK, torch.empty(2, TOPK, dtype=torch.bfloat16), ids)
    assert torch.equal(r.ids_out, ids) and topk_launches.launches == 1
    x, res, nw, w = _inputs(1, quant=True, seed=3)
    r = _route(1)
    out = torch.full((1, N), float("nan"))
    int4.norm_gemv_int4_triton(x, res, nw, 1e-6, w, out, route=r,
                               launch=int4.gemv_int4_config(1, N, K, 32, norm=True, rows=False))
    assert torch.equal(r.ids_out, _expected(out, 1)[1]) and topk_launches.launches == 2


def test_reference_route(topk_launches):
    """The reference op: its GEMV, then router_topk_reference on its logits."""
    x, res, nw, w = _inputs(1, seed=4)
    r = _route(1)
    out = torch.full((1, N), float("nan"))
    gemv.norm_gemv_reference(x, res, nw, 1e-6, w, out, route=r)
    ew, eids = _expected(out, 1)
    assert torch.equal(r.ids_out, eids) and torch.equal(r.weights_out, ew) and topk_launches.launches == 0


@pytest.mark.parametrize("change,error,message", [
    (dict(num_experts=N + 1), ValueError, r"route.num_experts must be in \[1, 72\].*got 73"),
    (dict(top_k=E + 1), ValueError, r"top_k must be in \[1, 40\], got 41"),
    (dict(ids_out=torch.zeros(1, TOPK)), TypeError, "ids_out must be int32, got torch.float32"),
    (dict(counter=torch.zeros(1)), ValueError, r"route.counter must be a zeroed int32 tensor"),
    (dict(local_experts=(30, 20)), ValueError, r"local_experts must be \(start, count\) of experts inside \[0, 40\)"),
])
@pytest.mark.parametrize("op", [gemv.norm_gemv_triton, gemv.norm_gemv_reference])
def test_bad_route_is_refused_before_anything_is_written(fused, op, change, error, message):
    x, res, nw, w = _inputs(1, seed=5)
    r = _route(1)._replace(**change)
    out = torch.full((1, N), float("nan"))
    with pytest.raises(error, match=message):
        op(x, res, nw, 1e-6, w, out, route=r)
    assert torch.isnan(out).all()
    with pytest.raises(TypeError, match="route must be a Route, got tuple"):
        op(x, res, nw, 1e-6, w, out, route=tuple(_route(1)))
