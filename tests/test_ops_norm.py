"""rmsnorm, add_rmsnorm, gated_rmsnorm: Triton vs reference; reference vs transformers' modules."""
import pytest
import torch

from model.ops import norm
from tests.needs import need_module

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _rand(g, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h", [(1, 64), (3, 100), (2, 1000)])
def test_rmsnorm(device, dtype, b, h):
    g = torch.Generator().manual_seed(h)
    x, w = _rand(g, b, h, dtype=dtype, device=device), _rand(g, h, dtype=dtype, device=device, scale=0.3)
    out = torch.full((b, h), float("nan"), dtype=dtype, device=device)
    ref = torch.empty_like(out)
    norm.rmsnorm_triton(x, w, 1e-6, out)
    norm.rmsnorm_reference(x, w, 1e-6, ref)
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h", [(1, 64), (4, 300)])
def test_add_rmsnorm(device, dtype, b, h):
    g = torch.Generator().manual_seed(h + 1)
    x, res = _rand(g, b, h, dtype=dtype, device=device), _rand(g, b, h, dtype=dtype, device=device)
    w = _rand(g, h, dtype=dtype, device=device, scale=0.3)
    res_t, res_r = res.clone(), res.clone()
    out = torch.full((b, h), float("nan"), dtype=dtype, device=device)
    ref = torch.empty_like(out)
    norm.add_rmsnorm_triton(x, res_t, w, 1e-6, out)
    norm.add_rmsnorm_reference(x, res_r, w, 1e-6, ref)
    if dtype == torch.float32 or device == "cuda":
        assert torch.equal(res_t, res_r)      # the residual add is one rounding, bit-exact
    else:
        # Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest even
        torch.testing.assert_close(res_t, res_r, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nv,v", [(1, 4, 32), (3, 3, 20), (1367, 3, 20)])
def test_gated_rmsnorm(device, dtype, b, nv, v):
    """The last shape has enough (row, head) pairs for several per program (a prefill chunk), a
    count that does not divide them."""
    g = torch.Generator().manual_seed(nv * v)
    o = _rand(g, b, nv, v, dtype=dtype, device=device)
    zbig = _rand(g, b, nv * v + 7, dtype=dtype, device=device)
    z = zbig[:, 5:5 + nv * v]                 # a strided slice, like the fused projection output
    w = _rand(g, v, dtype=dtype, device=device)
    out = torch.full((b, nv * v), float("nan"), dtype=dtype, device=device)
    ref = torch.empty_like(out)
    norm.gated_rmsnorm_triton(o, z, w, 1e-6, out)
    norm.gated_rmsnorm_reference(o, z, w, 1e-6, ref)
    torch.testing.assert_close(out, ref, **_tol(dtype))


def test_references_match_transformers():
    mod = need_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        x = torch.randn(3, 48, generator=g).to(dtype)
        hf = mod.Qwen3_5MoeRMSNorm(48, eps=1e-6).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(torch.randn(48, generator=g) * 0.3)
        out = torch.empty_like(x)
        norm.rmsnorm_reference(x, hf.weight.data, 1e-6, out)
        assert torch.equal(out, hf(x))
        hg = mod.Qwen3_5MoeRMSNormGated(16, eps=1e-6).to(dtype)
        with torch.no_grad():
            hg.weight.copy_(torch.randn(16, generator=g))
        o, z = torch.randn(3, 4, 16, generator=g).to(dtype), torch.randn(3, 64, generator=g).to(dtype)
        out = torch.empty(3, 64, dtype=dtype)
        norm.gated_rmsnorm_reference(o, z, hg.weight.data, 1e-6, out)
        assert torch.equal(out, hg(o.reshape(-1, 16), z.reshape(-1, 16)).reshape(3, 64))
