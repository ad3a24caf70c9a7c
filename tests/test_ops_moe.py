"""router_topk and moe_experts: Triton vs reference; references vs transformers' router/experts/block."""
import pytest
import torch

from model.ops import moe
from tests.needs import need_module

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _distinct_logits(g, b, e, dtype, device):
    """Tie-free logits (ties make top-k order implementation-defined)."""
    rows = [(torch.randperm(e, generator=g).float() - e / 2) / 16 for _ in range(b)]
    return torch.stack(rows).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,e,k", [(1, 16, 4), (3, 60, 8), (2, 256, 8)])
def test_router_topk(device, dtype, b, e, k):
    g = torch.Generator().manual_seed(e + k)
    logits = _distinct_logits(g, b, e, dtype, device)
    w_t = torch.full((b, k), float("nan"), dtype=dtype, device=device)
    i_t = torch.full((b, k), -1, dtype=torch.int32, device=device)
    w_r, i_r = torch.empty_like(w_t), torch.empty_like(i_t)
    moe.router_topk_triton(logits, k, w_t, i_t)
    moe.router_topk_reference(logits, k, w_r, i_r)
    assert torch.equal(i_t, i_r)
    torch.testing.assert_close(w_t, w_r, **_tol(dtype))


def test_router_ties_go_to_the_lowest_expert_id_in_both_backends(device):
    """Tied logits (bf16 makes them common): both backends pick the lowest ids among equals."""
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 0.5],
                           [2.0, 2.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0]], dtype=torch.bfloat16, device=device)
    want = torch.tensor([[1, 2, 3, 4, 6], [0, 1, 4, 5, 6]], dtype=torch.int32)
    for fn in (moe.router_topk_reference, moe.router_topk_triton):
        ids = torch.full((2, 5), -1, dtype=torch.int32, device=device)
        fn(logits, 5, torch.empty(2, 5, dtype=torch.bfloat16, device=device), ids)
        assert torch.equal(ids.cpu(), want), fn.__name__
    ids = torch.full((2, 3), -1, dtype=torch.int32, device=device)
    moe.router_topk_reference(logits, 3, torch.empty(2, 3, dtype=torch.bfloat16, device=device), ids)
    assert torch.equal(ids.cpu(), want[:, :3])


def _moe_inputs(g, b, h, e, i, i_s, k, dtype, device):
    x = torch.randn(b, h, generator=g).to(dtype).to(device)
    gu = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype).to(device)
    dn = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype).to(device)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b)]).to(torch.int32).to(device)
    w = torch.softmax(torch.randn(b, k, generator=g), -1).to(dtype).to(device)
    fused = torch.randn(b, e + 2 * i_s + 1 + 3, generator=g).to(dtype).to(device)   # router | shared g/u | gate
    sgu = fused[:, e: e + 2 * i_s]
    sgl = fused[:, e + 2 * i_s: e + 2 * i_s + 1]
    sdn = (torch.randn(h, i_s, generator=g) / i_s ** 0.5).to(dtype).to(device)
    return x, gu, dn, ids, w, sgu, sdn, sgl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,e,i,i_s,k", [(1, 64, 8, 32, 32, 2), (3, 100, 12, 24, 40, 4), (2, 40, 6, 520, 20, 3)])
def test_moe_experts(device, dtype, b, h, e, i, i_s, k):
    g = torch.Generator().manual_seed(h + e + i)
    x, gu, dn, ids, w, sgu, sdn, sgl = _moe_inputs(g, b, h, e, i, i_s, k, dtype, device)
    ws = moe.moe_workspace(b, k, i, dtype, device)
    ws.fill_(float("nan"))
    out = torch.full((b, h), float("nan"), dtype=dtype, device=device)
    ref = torch.empty_like(out)
    moe.moe_experts_triton(x, gu, dn, ids, w, sgu, sdn, sgl, ws, out)
    moe.moe_experts_reference(x, gu, dn, ids, w, sgu, sdn, sgl, ws, ref)
    torch.testing.assert_close(out, ref, **_tol(dtype))


def test_references_match_transformers_block():
    mod = need_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_experts=8, num_experts_per_tok=3, hidden_size=32, moe_intermediate_size=16,
                          shared_expert_intermediate_size=24, hidden_act="silu")
    g = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        block = mod.Qwen3_5MoeSparseMoeBlock(cfg)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        block = block.to(dtype)
        block.experts.config = SimpleNamespace(_experts_implementation="eager")
        x = torch.randn(3, 32, generator=g).to(dtype)
        with torch.no_grad():   # a failure here is a failure (transformers' API moved): not a skip
            y_hf = block(x.unsqueeze(1))[:, 0]
        with torch.no_grad():
            logits = torch.nn.functional.linear(x, block.gate.weight)
            wts, ids = torch.empty(3, 3, dtype=dtype), torch.empty(3, 3, dtype=torch.int32)
            moe.router_topk_reference(logits, 3, wts, ids)
            se = block.shared_expert
            sgu = torch.cat([torch.nn.functional.linear(x, se.gate_proj.weight),
                             torch.nn.functional.linear(x, se.up_proj.weight)], dim=-1)
            sgl = torch.nn.functional.linear(x, block.shared_expert_gate.weight)
            out = torch.empty_like(x)
            moe.moe_experts_reference(x, block.experts.gate_up_proj.data, block.experts.down_proj.data, ids, wts,
                                      sgu, se.down_proj.weight.data, sgl, moe.moe_workspace(3, 3, 16, dtype, "cpu"),
                                      out)
        tol = 1e-6 if dtype == torch.float32 else 1e-2   # batched vs per-row matmul summation order
        torch.testing.assert_close(out, y_hf, atol=tol, rtol=tol)
