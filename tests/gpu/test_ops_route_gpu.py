"""The router top-k fused into the router GEMV's epilogue (model/ops/moe/route.py,
MODEL_FUSED_ROUTER) on the GPU at 35b-a3b shapes (the router + shared gate/up + shared gate
norm+GEMV, 1,281 rows of which 256 are the router's): bf16 and int4, against router_topk on the
GEMV's own logits, over many calls (on the GPU the router programs run concurrently: a counter
that let an early arrival route would read logits not yet stored), and a graph replay."""
import dataclasses

import pytest
import torch

from tests.gpu._capture import capture_without_allocation
from tests.gpu._int4 import nan_full, quantized, randn
from tests.launch_spy import RefuseLaunches

from model.ops import moe
from model.ops.linear import gemv, int4
from model.ops.moe import decode, route as route_mod
from model.ops.moe.route import Route, route_counter
from model.settings import SETTINGS

pytestmark = pytest.mark.gpu

H, E, TOPK, ROWS = 2048, 256, 8, 1281
DT = torch.bfloat16


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    monkeypatch.setattr(route_mod, "SETTINGS", dataclasses.replace(SETTINGS, fused_router=True))
    monkeypatch.setattr(decode, "_router_topk_kernel",
                        RefuseLaunches("router_topk ran as a kernel of its own: the route was not fused"))


def _check(op, w, calls):
    x, res, nw = randn(1, H, dtype=DT, seed=40), randn(1, H, dtype=DT, seed=41), randn(H, dtype=DT, scale=0.1, seed=42)
    r = Route(E, TOPK, nan_full(1, TOPK, dtype=DT), torch.full((1, TOPK), -7, dtype=torch.int32, device="cuda"),
              None, route_counter("cuda"))
    out = nan_full(1, ROWS, dtype=DT)
    ew, eids = torch.empty(1, TOPK, dtype=DT, device="cuda"), torch.empty(1, TOPK, dtype=torch.int32, device="cuda")
    for c in range(calls):
        r.weights_out.fill_(float("nan"))
        r.ids_out.fill_(-7)
        res.copy_(randn(1, H, dtype=DT, seed=100 + c))   # new logits each call
        op(x, res, nw, 1e-6, w, out, route=r)
        moe.router_topk_reference(out[:, :E], TOPK, ew, eids)
        assert torch.equal(r.ids_out, eids), c
        torch.testing.assert_close(r.weights_out, ew, atol=1e-2, rtol=1e-2)
        assert int(r.counter.item()) == 0
    return x, res, nw, r, out


@pytest.mark.parametrize("quant", [False, True])
def test_fused_route_at_35b_shapes_over_many_calls_and_a_graph(quant):
    w = quantized(ROWS, H, dtype=DT, seed=43) if quant else randn(ROWS, H, dtype=DT, scale=H ** -0.5, seed=43)
    op = int4.norm_gemv_int4_triton if quant else gemv.norm_gemv_triton
    x, res, nw, r, out = _check(op, w, 50)
    eager = (r.weights_out.clone(), r.ids_out.clone(), out.clone())
    graph = capture_without_allocation(lambda: op(x, res, nw, 1e-6, w, out, route=r), "the fused router")
    for _ in range(3):
        r.weights_out.fill_(float("nan"))
        r.ids_out.fill_(-7)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(r.weights_out, eager[0]) and torch.equal(r.ids_out, eager[1]) and torch.equal(out, eager[2])
        assert int(r.counter.item()) == 0
