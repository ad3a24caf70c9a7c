"""qk_norm_rope_store and decode_attention: Triton vs reference, capacity errors, and the references
vs transformers' norm/rope/eager attention."""
import pytest
import torch

from model.ops import attention
from tests.needs import need_module

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _inputs(g, b, nh, nkv, d, r, cap, dtype, device):
    qkv = torch.randn(b, nh * 2 * d + 2 * nkv * d, generator=g).to(dtype).to(device)
    qw = (torch.randn(d, generator=g) * 0.3).to(dtype).to(device)
    kw = (torch.randn(d, generator=g) * 0.3).to(dtype).to(device)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float) / r))).to(device)
    kc = torch.randn(b, nkv, cap, d, generator=g).to(dtype).to(device)
    vc = torch.randn(b, nkv, cap, d, generator=g).to(dtype).to(device)
    return qkv, qw, kw, inv_freq, kc, vc


SHAPES = [  # b, nh, nkv, d, r, cap
    (1, 4, 2, 32, 8, 40),
    (3, 6, 2, 24, 12, 70),
    (2, 2, 1, 64, 64, 33),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nh,nkv,d,r,cap", SHAPES)
def test_qk_norm_rope_store(device, dtype, b, nh, nkv, d, r, cap):
    g = torch.Generator().manual_seed(d + cap)
    qkv, qw, kw, inv_freq, kc, vc = _inputs(g, b, nh, nkv, d, r, cap, dtype, device)
    positions = torch.randint(0, cap, (b,), generator=g).to(device)
    kc_t, vc_t, kc_r, vc_r = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    q_t = torch.full((b, nh, d), float("nan"), dtype=dtype, device=device)
    q_r = torch.empty_like(q_t)
    err_t = torch.zeros(1, dtype=torch.int32, device=device)
    err_r = torch.zeros(1, dtype=torch.int32, device=device)
    attention.qk_norm_rope_store_triton(qkv, qw, kw, positions, inv_freq, kc_t, vc_t, q_t, err_t, 1e-6, nh, nkv, d)
    attention.qk_norm_rope_store_reference(qkv, qw, kw, positions, inv_freq, kc_r, vc_r, q_r, err_r, 1e-6, nh, nkv, d)
    torch.testing.assert_close(q_t, q_r, **_tol(dtype))
    torch.testing.assert_close(kc_t, kc_r, **_tol(dtype))
    assert torch.equal(vc_t, vc_r)
    assert int(err_t) == 0 and int(err_r) == 0


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_store_outside_capacity_sets_error_and_writes_nothing(device, impl):
    fn = getattr(attention, f"qk_norm_rope_store_{impl}")
    g = torch.Generator().manual_seed(5)
    b, nh, nkv, d, r, cap = 3, 2, 1, 16, 8, 8
    qkv, qw, kw, inv_freq, kc, vc = _inputs(g, b, nh, nkv, d, r, cap, torch.float32, device)
    positions = torch.tensor([3, cap, cap + 100], device=device)
    kc0, vc0 = kc.clone(), vc.clone()
    q = torch.empty(b, nh, d, device=device)
    err = torch.zeros(1, dtype=torch.int32, device=device)
    fn(qkv, qw, kw, positions, inv_freq, kc, vc, q, err, 1e-6, nh, nkv, d)
    assert int(err) == 1
    assert torch.equal(kc[1:], kc0[1:]) and torch.equal(vc[1:], vc0[1:])     # rows past capacity untouched
    assert not torch.equal(kc[0, :, 3], kc0[0, :, 3])                        # the valid row was stored
    assert torch.equal(kc[0, :, :3], kc0[0, :, :3]) and torch.equal(kc[0, :, 4:], kc0[0, :, 4:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nh,nkv,d,r,cap", SHAPES + [(2, 8, 1, 16, 4, 300)])
def test_decode_attention(device, dtype, b, nh, nkv, d, r, cap):
    g = torch.Generator().manual_seed(b + nh + cap)
    qkv, qw, kw, inv_freq, kc, vc = _inputs(g, b, nh, nkv, d, r, cap, dtype, device)
    q = torch.randn(b, nh, d, generator=g).to(dtype).to(device)
    positions = torch.randint(0, cap, (b,), generator=g)
    positions[0] = cap - 1
    if b > 1:
        positions[1] = 0
    positions = positions.to(device)
    ws = attention.attention_workspace(b, nh, d, cap, device)
    ws.fill_(float("nan"))
    out = torch.full((b, nh * d), float("nan"), dtype=dtype, device=device)
    ref = torch.empty_like(out)
    attention.decode_attention_triton(q, kc, vc, positions, qkv, d ** -0.5, out, ws)
    attention.decode_attention_reference(q, kc, vc, positions, qkv, d ** -0.5, ref, ws)
    torch.testing.assert_close(out, ref, **_tol(dtype))


def test_workspace_sizes():
    assert attention.attention_num_splits(40) == 3
    assert attention.attention_workspace_numel(2, 16, 256, 4096) == 2 * 16 * 128 * 258
    with pytest.raises(ValueError, match="attention_workspace_numel"):
        attention.decode_attention_triton(torch.zeros(1, 2, 8), torch.zeros(1, 1, 64, 8), torch.zeros(1, 1, 64, 8),
                                          torch.zeros(1, dtype=torch.int64), torch.zeros(1, 32), 1.0,
                                          torch.zeros(1, 16), torch.zeros(3))


def test_references_match_transformers():
    mod = need_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    g = torch.Generator().manual_seed(11)
    b, nh, nkv, d, r, cap = 2, 4, 2, 16, 8, 12
    for dtype in DTYPES:
        qkv, qw, kw, inv_freq, kc, vc = _inputs(g, b, nh, nkv, d, r, cap, dtype, "cpu")
        positions = torch.tensor([5, 5])
        q = torch.empty(b, nh, d, dtype=dtype)
        err = torch.zeros(1, dtype=torch.int32)
        attention.qk_norm_rope_store_reference(qkv, qw, kw, positions, inv_freq, kc, vc, q, err, 1e-6, nh, nkv, d)
        # transformers: norm modules + rotary on [B, heads, 1, D]
        qn, kn = mod.Qwen3_5MoeRMSNorm(d).to(dtype), mod.Qwen3_5MoeRMSNorm(d).to(dtype)
        with torch.no_grad():
            qn.weight.copy_(qw)
            kn.weight.copy_(kw)
        hq = qn(qkv[:, : nh * 2 * d].reshape(b, 1, nh, 2 * d)[..., :d]).transpose(1, 2)
        hk = kn(qkv[:, nh * 2 * d: nh * 2 * d + nkv * d].reshape(b, 1, nkv, d)).transpose(1, 2)
        freqs = positions.float()[:, None, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        eq, ek = mod.apply_rotary_pos_emb(hq, hk, cos, sin)
        assert torch.equal(q, eq[:, :, 0])
        assert torch.equal(kc[:, :, 5], ek[:, :, 0])
        # eager attention over positions 0..5, then x sigmoid(gate)
        out = torch.empty(b, nh * d, dtype=dtype)
        attention.decode_attention_reference(q, kc, vc, positions, qkv, d ** -0.5, out)

        class _M:
            num_key_value_groups = nh // nkv
            training = False
        o_hf, _ = mod.eager_attention_forward(_M(), q.unsqueeze(2), kc[:, :, :6], vc[:, :, :6], None, d ** -0.5)
        gate = qkv[:, : nh * 2 * d].reshape(b, nh, 2 * d)[..., d:].reshape(b, -1)
        tol = 1e-6 if dtype == torch.float32 else 1e-2   # batched vs per-row matmul summation order
        torch.testing.assert_close(out, o_hf.reshape(b, -1) * torch.sigmoid(gate), atol=tol, rtol=tol)
