"""The int4 format (model/quant/format.py): packing order, the dequantization formula, and the
checks that name the bad tensor."""
import pytest
import torch

from model.quant import QuantizedLinear, pack_int4, quantize, unpack_int4


def test_packing_order_is_low_nibble_first_along_k():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    words = pack_int4(codes)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert int(words[0, 0]) == 0x87654321 - 2 ** 32      # same bits as uint32 0x87654321
    assert int(words[0, 1]) == 0xF
    assert torch.equal(unpack_int4(words), codes)


def test_pack_unpack_round_trip_with_leading_dims():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 64), generator=g, dtype=torch.uint8)
    words = pack_int4(codes)
    assert words.shape == (3, 5, 8)
    assert torch.equal(unpack_int4(words), codes)
    assert torch.equal(pack_int4(unpack_int4(words)), words)


def test_pack_refuses_bad_codes():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(TypeError, match="integer codes"):
        pack_int4(torch.zeros(2, 8))


def test_dequantize_formula():
    G, K = 32, 64
    codes = torch.arange(K, dtype=torch.uint8).remainder(16).unsqueeze(0)   # [1, 64]
    s = torch.tensor([[0.5, 2.0]], dtype=torch.bfloat16)
    z = torch.tensor([[3.0, 7.5]], dtype=torch.bfloat16)
    ql = QuantizedLinear(pack_int4(codes), s, z, G, (1, K), "t")
    q = codes.float()
    want = torch.cat([(q[:, :G] - 3.0) * 0.5, (q[:, G:] - 7.5) * 2.0], dim=1)
    out = ql.dequantize()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.to(torch.bfloat16))
    assert torch.equal(ql.dequantize(torch.float32), want)


def _ql(**over):
    kw = dict(qweight=torch.zeros(4, 8, dtype=torch.int32), scales=torch.ones(4, 2, dtype=torch.bfloat16),
              zeros=torch.zeros(4, 2, dtype=torch.bfloat16), group_size=32, shape=(4, 64), name="layers.0.x")
    kw.update(over)
    return QuantizedLinear(**kw)


def test_checks_name_the_tensor():
    _ql()  # the valid one
    with pytest.raises(TypeError, match=r"layers\.0\.x\.qweight must be int32"):
        _ql(qweight=torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"layers\.0\.x\.qweight has shape \[4, 4\], expected \[4, 8\]"):
        _ql(qweight=torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"layers\.0\.x\.scales has shape \[4, 1\], expected \[4, 2\]"):
        _ql(scales=torch.ones(4, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"layers\.0\.x\.zeros has shape"):
        _ql(zeros=torch.ones(4, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"zeros is torch\.float16 but .*scales is torch\.bfloat16"):
        _ql(zeros=torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"scales must be one of"):
        _ql(scales=torch.ones(4, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"group_size=16 is not supported"):
        _ql(group_size=16)


def test_k_not_a_multiple_of_the_group_is_refused():
    with pytest.raises(ValueError, match=r"proj: K=48 .*not a multiple of group_size=32"):
        quantize(torch.randn(4, 48), 32, "rtn", name="proj")
    with pytest.raises(ValueError, match=r"x: K=64 .*group_size=128.*\[32, 64\]"):
        quantize(torch.randn(4, 64), 128, "hqq", name="x")
    with pytest.raises(ValueError, match=r"x: K=64 .*not a multiple of group_size=128"):
        _ql(shape=(4, 64), group_size=128, name="x")
