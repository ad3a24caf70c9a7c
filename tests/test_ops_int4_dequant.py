"""The int4 decode kernels' dequantization (model/ops/linear/int4.py `_dequant_words`: the code in a
float's mantissa, fma(q, s, -z*s)) against QuantizedLinear.dequantize, value for value, through a
probe kernel that stores the dequantized [rows, words, 8] tile. Model dtype fp32 here (Triton's CPU
interpreter truncates to bf16 where the GPU rounds: tests/gpu/test_ops_int4_gpu.py checks bf16)."""
import pytest
import torch
import triton
import triton.language as tl

from model.ops.linear.int4 import _dequant_words, _load_words
from model.quant import QuantizedLinear


@triton.jit
def _dequant_probe_kernel(q_ptr, s_ptr, z_ptr, out_ptr, NW, NG, GROUP: tl.constexpr, R: tl.constexpr,
                          W: tl.constexpr):
    rows = tl.arange(0, R).to(tl.int64)[:, None]
    offs_w = tl.arange(0, W)
    words, s, z = _load_words(q_ptr + rows * NW, s_ptr + rows * NG, z_ptr + rows * NG, offs_w,
                              tl.full([R, 1], True, tl.int1), NW, GROUP)
    w = _dequant_words(words, s, z, out_ptr.dtype.element_ty)
    offs = (rows * NW * 8)[:, :, None] + (offs_w * 8)[None, :, None] + tl.arange(0, 8)[None, None, :]
    tl.store(out_ptr + offs, w)


def dequant_by_kernel(w: QuantizedLinear, dtype) -> torch.Tensor:
    n, k = w.shape
    out = torch.full((n, k), float("nan"), dtype=dtype, device=w.qweight.device)
    _dequant_probe_kernel[(1,)](w.qweight, w.scales, w.zeros, out, k // 8, k // w.group_size,
                                GROUP=w.group_size, R=n, W=k // 8)
    return out


def random_int4(n, k, group_size, zeros, seed=0) -> QuantizedLinear:
    """Random codes (every nibble position), bf16 scales in [1e-4, 0.1], the given bf16 zeros."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), generator=g, dtype=torch.int64).to(torch.int32)
    s = (torch.rand(n, k // group_size, generator=g) * 0.1 + 1e-4).to(torch.bfloat16)
    return QuantizedLinear(q, s, zeros.to(torch.bfloat16).reshape(n, k // group_size), group_size, (n, k))


@pytest.mark.parametrize("group_size", [32, 128])
def test_dequant_equals_the_reference_value_for_value(group_size):
    """Zeros 0 and 2^-13 <= |z| <= 16 (both signs): q - z is exact in fp32, so the kernel's
    fma(q, s, -z*s) is the reference's (q - z) * s bit for bit."""
    n, k = 8, 2 * group_size
    g = torch.Generator().manual_seed(group_size)
    mag = torch.exp(torch.empty(n * k // group_size).uniform_(-13 * 0.6931, 4 * 0.6931, generator=g))
    zeros = mag * torch.where(torch.rand(mag.shape, generator=g) < 0.5, -1.0, 1.0)
    zeros[::5] = 0.0
    w = random_int4(n, k, group_size, zeros, seed=group_size)
    got, ref = dequant_by_kernel(w, torch.float32), w.dequantize(torch.float32)
    assert not got.isnan().any()
    assert torch.equal(got, ref), f"{(got != ref).sum().item()} of {got.numel()} weights differ"


def test_dequant_tiny_zeros_within_one_rounding():
    """|z| < 2^-13: the reference rounds q - z first, the kernel does not; at most one fp32 ulp."""
    n, k, gs = 8, 256, 128
    zeros = torch.full((n * k // gs,), 3e-6)
    w = random_int4(n, k, gs, zeros, seed=1)
    got, ref = dequant_by_kernel(w, torch.float32), w.dequantize(torch.float32)
    ulps = (got.view(torch.int32).long() - ref.view(torch.int32).long()).abs()
    assert ulps.max().item() <= 1
