"""RTN and HQQ quantizers (model/quant/quantizers.py): HQQ's reconstruction error never above
RTN's, constant groups and all-zero rows exact, deterministic output, expert-stacked weights."""
import pytest
import torch

from model.quant import quantize, relative_error


def _group_sq_err(w, ql):
    G = ql.group_size
    d = (w.float() - ql.dequantize(torch.float32)).unflatten(-1, (-1, G))
    return (d ** 2).sum(-1)


def _random(shape, seed, std=0.02, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_hqq_not_worse_than_rtn_on_init_weights(group_size, scale_dtype):
    w = _random((64, 256), seed=group_size)          # transformers' init: N(0, 0.02^2)
    r = quantize(w, group_size, "rtn", scale_dtype=scale_dtype)
    h = quantize(w, group_size, "hqq", scale_dtype=scale_dtype)
    assert r.scales.dtype == h.scales.dtype == scale_dtype
    assert bool((_group_sq_err(w, h) <= _group_sq_err(w, r)).all())
    er, eh = relative_error(w, r), relative_error(w, h)
    assert 0.05 < er < 0.15                           # a sane int4 error at std 0.02
    assert eh < 0.98 * er                             # and HQQ really improves on it


def _structured(kind):
    g = torch.Generator().manual_seed(7)
    if kind == "outliers":                            # a few large weights per row
        w = torch.randn(32, 128, generator=g) * 0.02
        w[:, ::37] *= 25
    elif kind == "uniform":
        w = torch.rand(32, 128, generator=g) * 0.1 - 0.03
    elif kind == "heavy_tail":                        # Student-t like: normal / sqrt(chi2/2)
        w = torch.randn(32, 128, generator=g) / (torch.randn(32, 128, generator=g) ** 2 + 0.05).sqrt() * 0.01
    elif kind == "ramp":
        w = torch.linspace(-1, 2, 32 * 128).reshape(32, 128)
    else:                                             # one sign only: min > 0, zero far from the codes
        w = 1.0 + torch.rand(32, 128, generator=g) * 0.01
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["outliers", "uniform", "heavy_tail", "ramp", "positive_offset"])
def test_hqq_not_worse_than_rtn_on_structured_weights(kind):
    w = _structured(kind)
    r, h = quantize(w, 32, "rtn"), quantize(w, 32, "hqq")
    assert bool((_group_sq_err(w, h) <= _group_sq_err(w, r)).all())
    assert relative_error(w, h) <= relative_error(w, r) < 0.15


@pytest.mark.parametrize("method", ["rtn", "hqq"])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_constant_groups_and_zero_rows_are_exact(method, scale_dtype):
    w = _random((6, 128), seed=1)
    w[0] = 0                                          # an all-zero row
    w[1, :32] = 0.0123                                # constant groups of each sign and zero
    w[2, 32:64] = -3.5
    w[3] = -0.25
    w[4, 96:] = 1e-30                                 # a constant below bf16's normal range
    ql = quantize(w, 32, method, scale_dtype=scale_dtype)
    out = ql.dequantize(torch.bfloat16)
    for r, cols in ((0, slice(None)), (1, slice(0, 32)), (2, slice(32, 64)), (3, slice(None)), (4, slice(96, 128))):
        assert torch.equal(out[r, cols], w[r, cols]), (r, out[r, cols], w[r, cols])
    assert torch.equal(out[0], torch.zeros(128, dtype=torch.bfloat16))


def test_deterministic_and_expert_stacked():
    w = _random((3, 16, 64), seed=4)                  # [E, N, K], like gate_up_proj
    a, b = quantize(w, 32, "hqq", name="experts"), quantize(w, 32, "hqq", name="experts")
    for x, y in ((a.qweight, b.qweight), (a.scales, b.scales), (a.zeros, b.zeros)):
        assert torch.equal(x, y)
    assert a.qweight.shape == (3, 16, 8) and a.scales.shape == (3, 16, 2) and a.shape == (3, 16, 64)
    for e in range(3):                                # each expert quantized as its own weight
        one = quantize(w[e], 32, "hqq")
        assert torch.equal(one.qweight, a.qweight[e]) and torch.equal(one.zeros, a.zeros[e])


def test_quantize_argument_errors():
    w = _random((4, 64), seed=0)
    with pytest.raises(ValueError, match=r"w1: unknown quantization method 'gptq'"):
        quantize(w, 32, "gptq", name="w1")
    with pytest.raises(TypeError, match="floating weight"):
        quantize(torch.zeros(4, 64, dtype=torch.int32), 32)
    bad = w.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"w2: the weight has non-finite values"):
        quantize(bad, 32, name="w2")
    with pytest.raises(TypeError, match="scale_dtype"):
        quantize(w, 32, scale_dtype=torch.int8)
    with pytest.raises(ValueError, match="p=1.5"):
        quantize(w, 32, "hqq", p=1.5)
