"""The grouped-GEMM prefill MoE at 35b-a3b shapes on the GPU against its plain-torch reference,
padding tokens through `info`, and capture in a CUDA graph (no allocation, replays follow new
routing and a new n_valid read on the device).

Tolerances: bf16 2e-2 abs/rel (the kernels round where the reference does; a different fp32
summation order flips an occasional rounding by one bf16 ulp), and at least 80% of the outputs
bit-equal (a misplaced rounding point changes far more); fp32 1e-4 (accumulation order only)."""
import pytest
import torch

from model.ops import moe
from tests.gpu._capture import capture_without_allocation

pytestmark = pytest.mark.gpu

DEV = "cuda"
H, E, TOPK, I, IS = 2048, 256, 8, 512, 512


@pytest.fixture(autouse=True)
def _exact_reference_matmuls(monkeypatch):
    """cuBLAS may otherwise reduce bf16 GEMMs in reduced precision: keep the reference's roundings canonical."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


_WEIGHTS = {}


def _weights(dtype):
    if dtype not in _WEIGHTS:
        _WEIGHTS.clear()   # one dtype's 1.6 GB of experts at a time
        _WEIGHTS[dtype] = (_randn(E, 2 * I, H, dtype=dtype, scale=H ** -0.5, seed=1),
                           _randn(E, H, I, dtype=dtype, scale=I ** -0.5, seed=2),
                           _randn(H, IS, dtype=dtype, scale=IS ** -0.5, seed=3))
    return _WEIGHTS[dtype]


def _activations(t, dtype, seed, hot_expert=None):
    """x, ids, weights (router_topk_reference on random logits), shared gate/up rows and gate logit
    as column slices of one fused projection output. hot_expert: every token picks it."""
    x = _randn(t, H, dtype=dtype, seed=seed)
    logits = _randn(t, E, dtype=torch.float32, seed=seed + 1)
    if hot_expert is not None:
        logits[:, hot_expert] = 100.0
    wts = torch.empty(t, TOPK, dtype=dtype, device=DEV)
    ids = torch.empty(t, TOPK, dtype=torch.int32, device=DEV)
    moe.router_topk_reference(logits.to(dtype), TOPK, wts, ids)
    fused = _randn(t, E + 2 * IS + 1, dtype=dtype, seed=seed + 2)
    return x, ids, wts, fused[:, E:E + 2 * IS], fused[:, E + 2 * IS:]


def _args(t, dtype, seed, hot_expert=None):
    gu, dn, sdn = _weights(dtype)
    x, ids, wts, sgu, sgl = _activations(t, dtype, seed, hot_expert)
    return [x, gu, dn, ids, wts, sgu, sdn, sgl]


def _check(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        return
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    same = (got == want).float().mean().item()
    assert same >= 0.8, f"only {same:.1%} of the outputs bit-equal to the reference"


def _both(args, t, dtype, info=None):
    ws = moe.moe_grouped_workspace(t, TOPK, E, H, I, IS, dtype, DEV)
    ws.act.fill_(float("nan"))
    ws.y.fill_(float("nan"))
    got = torch.full((t, H), float("nan"), dtype=dtype, device=DEV)
    want = torch.full_like(got, float("nan"))
    moe.moe_experts_grouped_triton(*args, ws, got, info)
    moe.moe_experts_grouped_reference(*args, ws, want, info)
    return got, want


@pytest.mark.parametrize("t", [1, 16, 128, 2048, 4096])
def test_grouped_moe_bf16(t):
    got, want = _both(_args(t, torch.bfloat16, seed=10 + t), t, torch.bfloat16)
    _check(got, want, torch.bfloat16)


@pytest.mark.parametrize("t", [16, 128])
def test_grouped_moe_fp32(t):
    got, want = _both(_args(t, torch.float32, seed=20 + t), t, torch.float32)
    _check(got, want, torch.float32)


def test_every_token_on_one_expert():
    """2048 tokens all pick expert 7: 2048 rows of one expert (32 blocks of 64), the rest spread."""
    t = 2048
    args = _args(t, torch.bfloat16, seed=30, hot_expert=7)
    assert bool((args[3] == 7).any(dim=1).all())
    got, want = _both(args, t, torch.bfloat16)
    _check(got, want, torch.bfloat16)


def test_decode_reference_agrees_at_real_shapes():
    """The grouped reference against the decode op's per-row reference on 16 tokens."""
    t = 16
    args = _args(t, torch.bfloat16, seed=40)
    _, want = _both(args, t, torch.bfloat16)
    per_row = torch.full_like(want, float("nan"))
    moe.moe_experts_reference(*args, moe.moe_workspace(t, TOPK, I, torch.bfloat16, DEV), per_row)
    _check(want, per_row, torch.bfloat16)


def test_padding_tokens_and_graph_replay():
    """A 128-token bucket captured once; replays with new routing and n_valid (77, then 128) match
    the reference on the valid rows; padding rows (x NaN) get the shared term only; the capture
    allocates nothing and a replay equals the eager Triton run bit for bit."""
    t, dtype = 128, torch.bfloat16
    args = _args(t, dtype, seed=50)
    x, ids, wts, sgl = args[0], args[3], args[4], args[7]
    info = torch.tensor([0, 0, 77], dtype=torch.int64, device=DEV)
    ws = moe.moe_grouped_workspace(t, TOPK, E, H, I, IS, dtype, DEV)
    out = torch.full((t, H), float("nan"), dtype=dtype, device=DEV)

    def step():
        moe.moe_experts_grouped_triton(*args, ws, out, info)

    x[77:] = float("nan")
    step()                                  # eager (also compiles every kernel before capture)
    torch.cuda.synchronize()
    eager = out.clone()
    want = torch.empty_like(out)
    moe.moe_experts_grouped_reference(*args, ws, want, info)
    _check(eager[:77], want[:77], dtype)
    assert torch.isfinite(eager).all()
    _check(eager[77:], want[77:], dtype)    # the shared term alone

    out.fill_(float("nan"))
    graph = capture_without_allocation(step, "the grouped MoE")   # its shared expert's down GEMM is cuBLAS's
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)

    # new routing, new activations and every token valid, written into the same buffers
    x2, ids2, wts2, sgu2, sgl2 = _activations(t, dtype, seed=60)
    x.copy_(x2)
    ids.copy_(ids2)
    wts.copy_(wts2)
    args[5].copy_(sgu2)
    sgl.copy_(sgl2)
    info[2] = t
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    moe.moe_experts_grouped_reference(*args, ws, want, info)
    _check(out, want, dtype)
