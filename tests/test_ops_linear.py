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
