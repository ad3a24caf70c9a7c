"""int4 prefill GEMM (model/ops/linear/int4_gemm.py): the Triton kernel vs its reference (dequantize,
then torch.mm), the packing order, K tiles holding several groups or part of one, T and N not
multiples of the tiles, a chunk's padding rows, strided rows, the tile choice and the refusals.
Small shapes (CPU interpreter); tests/gpu/test_ops_prefill_int4_gpu.py runs the 35b-a3b shapes.

Tolerances: fp32 1e-5 (summation order only). bf16: the kernel rounds the dequantized weight and
the output as the reference does (under the interpreter through an exact round-to-nearest-even),
so outputs differ only where the fp32 summation order flips a rounding: 1e-2 abs/rel and >= 98 %
bit-equal."""
import pytest
import torch

from model.ops.hardware import PRESETS
from model.ops.linear import int4_gemm as g
from model.quant import QuantizedLinear, pack_int4, quantize


def _close(got, want, dtype):
    assert not torch.isnan(got).any()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
        assert (got == want).float().mean() >= 0.98


def _qw(n, k, group_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return quantize((torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype), group_size, "rtn")


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gemm_int4_matches_reference(dtype, group_size):
    """K = 3 groups (a masked K tail for tiles wider than K), T = 37 and N = 40 (partial token and
    row tiles); the default tiles, K tiles of 16 (a part of one group each) and of 128 (several
    groups of 32, one of 128)."""
    t, n, k = 37, 40, 3 * group_size
    w = _qw(n, k, group_size, dtype, seed=group_size)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = _nan(t, n, dtype=dtype)
    g.gemm_int4_reference(x, w, ref)
    assert torch.equal(ref, torch.mm(x, w.dequantize(dtype).t()))
    for launch in (None, g.GemmInt4Launch(16, 16, 16, 4, 3), g.GemmInt4Launch(32, 32, 128, 4, 3)):
        out = _nan(t, n, dtype=dtype)
        g.gemm_int4_triton(x, w, out, launch=launch)
        _close(out, ref, dtype)


def test_gemm_int4_nibble_order_and_groups():
    """Hand-packed codes: column c of row r holds (r + 3c) % 16, each group of 32 its own scale and
    zero; one-hot rows of x pick single columns, so every output is one dequantized weight, exactly,
    whether a K tile holds part of a group (16) or several (64)."""
    n, k, G = 24, 96, 32
    codes = (torch.arange(n)[:, None] + 3 * torch.arange(k)[None, :]) % 16
    scales = torch.tensor([[0.5, 2.0, 0.25]]).repeat(n, 1) * (1 + torch.arange(n)[:, None])
    zeros = torch.tensor([[3.0, -1.0, 7.5]]).repeat(n, 1)
    w = QuantizedLinear(pack_int4(codes), scales, zeros, G, (n, k))
    cols = torch.tensor([0, 1, 7, 8, 31, 32, 33, 63, 64, 95, 17, 50, 70, 9, 2, 90, 40])
    x = torch.eye(k)[cols]
    want = ((codes[:, cols].float() - zeros[:, cols // G]) * scales[:, cols // G]).T
    for bk in (16, 64):
        out = _nan(len(cols), n, dtype=torch.float32)
        g.gemm_int4_triton(x, w, out, launch=g.GemmInt4Launch(16, 16, bk, 4, 3))
        assert torch.equal(out, want)


def test_gemm_int4_reads_only_the_first_t_rows_and_padding_stays_in_its_rows():
    """A chunk buffer of 48 rows, x = its first 21 (the prefill passes x[:T] views); rows 15..20 are
    a padded chunk's junk (NaN), rows past 21 too. Valid rows equal the product of the valid rows
    alone, out's rows past T are never written; x and out are column slices of wider buffers."""
    t, n, k, G = 21, 36, 64, 32
    w = _qw(n, k, G, torch.float32, seed=3)
    chunk = _nan(48, k + 10, dtype=torch.float32)
    chunk[:15, 4:4 + k] = torch.randn(15, k, generator=torch.Generator().manual_seed(4))
    out_buf = _nan(48, n + 7, dtype=torch.float32)
    g.gemm_int4_triton(chunk[:t, 4:4 + k], w, out_buf[:t, 2:2 + n], launch=g.GemmInt4Launch(16, 16, 32, 4, 3))
    want = chunk[:15, 4:4 + k] @ w.dequantize(torch.float32).T
    torch.testing.assert_close(out_buf[:15, 2:2 + n], want, atol=1e-5, rtol=1e-5)
    assert torch.isnan(out_buf[15:t, 2:2 + n]).all()          # junk in, junk out: in its own rows only
    assert torch.isnan(out_buf[t:]).all() and torch.isnan(out_buf[:, :2]).all() and torch.isnan(out_buf[:, 2 + n:]).all()


def test_gemm_int4_config_by_tokens():
    """Short chunks stream the weight (one token tile, rows halved until two programs per SM);
    long ones take 128 x 128 tiles where the grid covers the SMs; every block a power of two >= 16."""
    h200 = PRESETS["h200"]
    small = g.gemm_int4_config(16, 2048, 4096, profile=h200)
    assert (small.block_t, small.block_n, small.block_k) == (16, 16, 256)
    assert g.gemm_int4_config(16, 12352, 2048, profile=h200).block_n == 32      # 386 programs >= 264
    big = g.gemm_int4_config(2048, 12352, 2048, profile=h200)
    assert (big.block_t, big.block_n, big.warps) == (128, 128, 8)
    mid = g.gemm_int4_config(300, 2048, 4096, profile=h200)                   # 16 x 3 programs: shrink
    assert mid.block_n == 64 and mid.block_t == 64
    for t in (1, 3, 16, 17, 64, 300, 2048):
        for n, k in ((12352, 2048), (2048, 4096), (1281, 2048), (40, 96)):
            c = g.gemm_int4_config(t, n, k, profile=h200)
            assert all(v >= 16 and v & (v - 1) == 0 for v in (c.block_t, c.block_n, c.block_k)), (t, n, k, c)


def test_gemm_int4_refusals_are_named():
    w = _qw(8, 64, 32, torch.float32, seed=5)
    x, out = torch.zeros(3, 64), torch.zeros(3, 8)
    bad = QuantizedLinear(torch.zeros(8, 12, dtype=torch.int32), torch.ones(8, 3), torch.zeros(8, 3), 32, (8, 96))
    bad.group_size = 64          # mutated after its checks: the op checks again
    for fn in (g.gemm_int4_triton, g.gemm_int4_reference):
        with pytest.raises(TypeError, match="w must be a QuantizedLinear, got Tensor"):
            fn(x, torch.zeros(8, 64), out)
        with pytest.raises(ValueError, match="K=96 is not a multiple of group_size=64"):
            fn(torch.zeros(3, 96), bad, out)
        with pytest.raises(ValueError, match=r"x must have shape \[3, 64\]"):
            fn(torch.zeros(3, 32), w, out)
        with pytest.raises(ValueError, match=r"out must have shape \[3, 8\]"):
            fn(x, w, torch.zeros(3, 9))
        with pytest.raises(TypeError, match="out must be torch.float32 like x, got torch.bfloat16"):
            fn(x, w, out.bfloat16())
        with pytest.raises(TypeError, match="x must be one of .* got torch.int32"):
            fn(x.int(), w, out.int())
    with pytest.raises(ValueError, match="launch.block_k=8 must be a power of two >= 16"):
        g.gemm_int4_triton(x, w, out, launch=g.GemmInt4Launch(16, 16, 8, 4, 3))
