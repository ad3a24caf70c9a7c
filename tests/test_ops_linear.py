"""gemv: Triton kernel vs reference, fp32 and bf16, odd shapes, strided rows."""
import pytest
import torch

from model.ops import linear

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,k", [(1, 37, 100), (3, 64, 520), (8, 5, 33), (2, 130, 1100)])
def test_gemv_matches_reference(device, dtype, b, n, k):
    g = torch.Generator().manual_seed(b * 1000 + n + k)
    x = torch.randn(b, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
    out = torch.full((b, n), float("nan"), dtype=dtype, device=device)
    ref = torch.empty_like(out)
    linear.gemv_triton(x, w, out)
    linear.gemv_reference(x, w, ref)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def test_gemv_strided_rows(device):
    """x and out as column slices of wider buffers (fused projection outputs)."""
    g = torch.Generator().manual_seed(0)
    big_x = torch.randn(2, 90, generator=g).to(device)
    w = torch.randn(17, 40, generator=g).to(device)
    big_out = torch.full((2, 50), float("nan"), device=device)
    linear.gemv_triton(big_x[:, 10:50], w, big_out[:, 3:20])
    ref = big_x[:, 10:50] @ w.T
    torch.testing.assert_close(big_out[:, 3:20], ref, atol=1e-5, rtol=1e-5)
    assert torch.isnan(big_out[:, :3]).all() and torch.isnan(big_out[:, 20:]).all()


def test_gemv_rejects_bad_shapes(device):
    x = torch.zeros(2, 8, device=device)
    with pytest.raises(ValueError, match="out must have shape"):
        linear.gemv_triton(x, torch.zeros(4, 8, device=device), torch.zeros(2, 5, device=device))
    with pytest.raises(ValueError, match="x must have shape"):
        linear.gemv_triton(torch.zeros(2, 7, device=device), torch.zeros(4, 8, device=device),
                           torch.zeros(2, 4, device=device))


# ----------------------------------------------------------------------------- norm_gemv
def _norm_gemv_inputs(g, b, n, k, dtype, device):
    x = torch.randn(b, k, generator=g).to(dtype).to(device)
    residual = (torch.randn(b, k, generator=g) * 3).to(dtype).to(device)
    nw = (torch.randn(k, generator=g) * 0.2).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
    return x, residual, nw, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,k", [(1, 37, 100), (3, 64, 520), (2, 130, 1100)])
@pytest.mark.parametrize("add", [True, False])
def test_norm_gemv_matches_add_rmsnorm_then_gemv(device, dtype, b, n, k, add):
    """The fused norm equals the reference norm_gemv, which equals add_rmsnorm (or rmsnorm) then
    gemv; the new residual and the normed rows come out too, and the inputs are untouched."""
    from model.ops import norm

    g = torch.Generator().manual_seed(b * 7 + n + k)
    x, residual, nw, w = _norm_gemv_inputs(g, b, n, k, dtype, device)
    x = x if add else None
    res_before = residual.clone()
    outs = {}
    for name, fn in (("triton", linear.norm_gemv_triton), ("reference", linear.norm_gemv_reference)):
        o = torch.full((b, n), float("nan"), dtype=dtype, device=device)
        r_out = torch.full((b, k), float("nan"), dtype=dtype, device=device) if add else None
        n_out = torch.full((b, k), float("nan"), dtype=dtype, device=device)
        fn(x, residual, nw, 1e-6, w, o, residual_out=r_out, normed_out=n_out)
        outs[name] = (o, r_out, n_out)
        assert torch.equal(residual, res_before), f"{name} changed residual"
    # unfused: add_rmsnorm (or rmsnorm) then gemv, on the references
    r2, normed = residual.clone(), torch.empty_like(residual)
    if add:
        norm.add_rmsnorm_reference(x, r2, nw, 1e-6, normed)
    else:
        norm.rmsnorm_reference(r2, nw, 1e-6, normed)
    o2 = torch.empty(b, n, dtype=dtype, device=device)
    linear.gemv_reference(normed, w, o2)
    o_ref, r_ref, n_ref = outs["reference"]
    assert torch.equal(o_ref, o2) and torch.equal(n_ref, normed)
    if add:
        assert torch.equal(r_ref, r2)
    o_t, r_t, n_t = outs["triton"]
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(o_t.float(), o_ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(n_t.float(), n_ref.float(), atol=atol, rtol=rtol)
    if add and (dtype == torch.float32 or device == "cuda"):
        assert torch.equal(r_t, r_ref)   # one rounded add: exact
    elif add:   # Triton's CPU interpreter truncates to bf16 where the GPU rounds
        torch.testing.assert_close(r_t.float(), r_ref.float(), atol=atol, rtol=rtol)


def test_norm_gemv_bad_arguments_are_named(device):
    g = torch.Generator().manual_seed(1)
    x, residual, nw, w = _norm_gemv_inputs(g, 2, 8, 16, torch.float32, device)
    out = torch.empty(2, 8, device=device)
    for fn in (linear.norm_gemv_triton, linear.norm_gemv_reference):
        with pytest.raises(ValueError, match="residual_out overlaps residual"):
            fn(x, residual, nw, 1e-6, w, out, residual_out=residual)
        with pytest.raises(ValueError, match="normed_out overlaps x"):
            fn(x, residual, nw, 1e-6, w, out, normed_out=x[:, :])
        with pytest.raises(ValueError, match="residual_out needs x"):
            fn(None, residual, nw, 1e-6, w, out, residual_out=torch.empty_like(residual))
        with pytest.raises(ValueError, match=r"norm_weight must have shape \(16,\), got \(8,\)"):
            fn(x, residual, nw[:8], 1e-6, w, out)
        with pytest.raises(TypeError, match="x must be torch.float32 like residual, got torch.bfloat16"):
            fn(x.bfloat16(), residual, nw, 1e-6, w, out)
