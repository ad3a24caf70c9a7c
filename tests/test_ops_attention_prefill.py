"""Chunked-prefill attention ops (qk_norm_rope_store_prefill, prefill_attention): Triton vs reference
under the interpreter, padding and capacity rules, the references vs T decode steps and vs
transformers' eager attention.

Tolerances: fp32 1e-5 (summation order only); bf16 3e-2 abs/rel: the kernels round where the
references do except for the flash kernel's unnormalised probabilities (module doc), and Triton's
CPU interpreter casts fp32 -> bf16 by truncation, not round-to-nearest (about half the elements of
a bf16 kernel output are one ulp off the reference here, the decode kernels' included; on a GPU
they round as torch does). The GPU file checks bf16 at model shapes with tighter, averaged bounds.
"""
import pytest

from tests.needs import need_module
import torch

from model.ops import attention

NH, NKV, D, R, S, B = 4, 2, 32, 8, 256, 3
ROW = 1
EPS = 1e-6
SCALE = D ** -0.5


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _inputs(seed, t, dtype, device):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, NH * 2 * D + 2 * NKV * D, generator=g).to(dtype).to(device)
    qw = (torch.randn(D, generator=g) * 0.3).to(dtype).to(device)
    kw = (torch.randn(D, generator=g) * 0.3).to(dtype).to(device)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float) / R))).to(device)
    kc = torch.randn(B, NKV, S, D, generator=g).to(dtype).to(device)   # "earlier chunks" everywhere
    vc = torch.randn(B, NKV, S, D, generator=g).to(dtype).to(device)
    return qkv, qw, kw, inv_freq, kc, vc


def _info(start, n, device, row=ROW):
    return torch.tensor([row, start, n], dtype=torch.int64, device=device)


def _store(impl, qkv, qw, kw, info, inv_freq, kc, vc):
    t = qkv.shape[0]
    q = torch.full((t, NH, D), float("nan"), dtype=qkv.dtype, device=qkv.device)
    err = torch.zeros(1, dtype=torch.int32, device=qkv.device)
    getattr(attention, f"qk_norm_rope_store_prefill_{impl}")(qkv, qw, kw, info, inv_freq, kc, vc, q, err,
                                                              EPS, NH, NKV, D)
    return q, err


# (n_valid, T, start): T padded above n_valid; padding positions may run past S (no error)
CASES = [(1, 16, 0), (63, 64, 37), (64, 80, 0), (65, 80, 130), (200, 256, 50)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,t,start", CASES)
def test_store_prefill(device, dtype, n, t, start):
    qkv, qw, kw, inv_freq, kc, vc = _inputs(n + t, t, dtype, device)
    kc[ROW, :, start + n:] = float("nan")      # poison: padding must not store there
    vc[ROW, :, start + n:] = float("nan")
    k0, v0 = kc.clone(), vc.clone()
    info = _info(start, n, device)
    (kt, vt), (kr, vr) = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
    qt, et = _store("triton", qkv, qw, kw, info, inv_freq, kt, vt)
    qr, er = _store("reference", qkv, qw, kw, info, inv_freq, kr, vr)
    assert int(et) == 0 and int(er) == 0
    torch.testing.assert_close(qt[:n], qr[:n], **_tol(dtype))
    assert not qt.isnan().any()
    for c, c0 in ((kt, k0), (vt, v0), (kr, k0), (vr, v0)):
        assert torch.equal(c[torch.arange(B) != ROW], c0[torch.arange(B) != ROW])   # other rows untouched
        assert torch.equal(c[ROW, :, :start], c0[ROW, :, :start])                  # earlier positions kept
        assert c[ROW, :, start + n:].isnan().all()                                  # padding stored nothing
        assert not c[ROW, :, start:start + n].isnan().any()
    torch.testing.assert_close(kt, kr, equal_nan=True, **_tol(dtype))
    assert torch.equal(vt.nan_to_num(7.0), vr.nan_to_num(7.0))
    # v is stored as is
    v_in = qkv[:n, NH * 2 * D + NKV * D:].reshape(n, NKV, D).transpose(0, 1)
    assert torch.equal(vt[ROW, :, start:start + n], v_in)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_store_prefill_past_capacity(device, impl):
    """Valid tokens past S set err and store nothing; those inside S are stored."""
    t, n, start = 16, 10, S - 4
    qkv, qw, kw, inv_freq, kc, vc = _inputs(3, t, torch.float32, device)
    k0, v0 = kc.clone(), vc.clone()
    _, err = _store(impl, qkv, qw, kw, _info(start, n, device), inv_freq, kc, vc)
    assert int(err) == 1
    assert not torch.equal(kc[ROW, :, start:], k0[ROW, :, start:])
    assert torch.equal(kc[ROW, :, :start], k0[ROW, :, :start]) and torch.equal(vc[ROW, :, :start], v0[ROW, :, :start])
    others = torch.arange(B) != ROW
    assert torch.equal(kc[others], k0[others]) and torch.equal(vc[others], v0[others])
    # all valid tokens inside S: padding past S raises nothing
    kc, vc = k0.clone(), v0.clone()
    _, err = _store(impl, qkv, qw, kw, _info(start, 4, device), inv_freq, kc, vc)
    assert int(err) == 0


def _attend(impl, q, kc, vc, info, qkv):
    out = torch.full((q.shape[0], NH * D), float("nan"), dtype=q.dtype, device=q.device)
    getattr(attention, f"prefill_attention_{impl}")(q, kc, vc, info, qkv, SCALE, out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,t,start", CASES)
def test_prefill_attention(device, dtype, n, t, start):
    qkv, _, _, _, kc, vc = _inputs(2 * n + t, t, dtype, device)
    q = torch.randn(t, NH, D, generator=torch.Generator().manual_seed(n)).to(dtype).to(device)
    # positions past the chunk's last token hold garbage: reading one (even masked, via p*v) shows
    kc[ROW, :, start + n:] = float("nan")
    vc[ROW, :, start + n:] = float("nan")
    kc[torch.arange(B) != ROW] = float("nan")
    vc[torch.arange(B) != ROW] = float("nan")
    info = _info(start, n, device)
    got = _attend("triton", q, kc, vc, info, qkv)
    want = _attend("reference", q, kc, vc, info, qkv)
    assert not got.isnan().any()
    torch.testing.assert_close(got[:n], want[:n], **_tol(dtype))
    assert (got[n:] == 0).all() and (want[n:] == 0).all()      # padding rows: zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,d", [(8, 1, 16), (6, 2, 16)])
def test_prefill_attention_head_groups(device, dtype, nh, nkv, d):
    """8 query heads on one KV head (the 35b-a3b grouping) and a group of 3 (not a power of two:
    tile rows past the group are masked), both ops, Triton vs reference."""
    g = torch.Generator().manual_seed(nh)
    n, t, start, cap = 45, 48, 30, 96
    qkv = torch.randn(t, nh * 2 * d + 2 * nkv * d, generator=g).to(dtype).to(device)
    qw, kw = (torch.randn(2, d, generator=g) * 0.3).to(dtype).to(device)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, 4, 2, dtype=torch.float) / 4))).to(device)
    kc = torch.randn(2, nkv, cap, d, generator=g).to(dtype).to(device)
    vc = torch.randn(2, nkv, cap, d, generator=g).to(dtype).to(device)
    info = _info(start, n, device, row=0)
    outs = []
    for impl in ("triton", "reference"):
        k, v = kc.clone(), vc.clone()
        q = torch.full((t, nh, d), float("nan"), dtype=dtype, device=device)
        err = torch.zeros(1, dtype=torch.int32, device=device)
        getattr(attention, f"qk_norm_rope_store_prefill_{impl}")(qkv, qw, kw, info, inv_freq, k, v, q, err, EPS,
                                                                  nh, nkv, d)
        out = torch.full((t, nh * d), float("nan"), dtype=dtype, device=device)
        getattr(attention, f"prefill_attention_{impl}")(q, k, v, info, qkv, d ** -0.5, out)
        outs.append((q, k, out))
    (qt, kt, ot), (qr, kr, orf) = outs
    torch.testing.assert_close(qt[:n], qr[:n], **_tol(dtype))
    torch.testing.assert_close(kt, kr, **_tol(dtype))
    torch.testing.assert_close(ot[:n], orf[:n], **_tol(dtype))
    assert (ot[n:] == 0).all()


def test_prefill_attention_is_causal(device):
    """Changing the chunk's last key changes only the last query's output (Triton)."""
    n, t, start = 40, 48, 20
    qkv, _, _, _, kc, vc = _inputs(9, t, torch.float32, device)
    q = torch.randn(t, NH, D, generator=torch.Generator().manual_seed(1)).to(device)
    info = _info(start, n, device)
    a = _attend("triton", q, kc, vc, info, qkv)
    kc[ROW, :, start + n - 1] += 1.0
    vc[ROW, :, start + n - 1] += 1.0
    b = _attend("triton", q, kc, vc, info, qkv)
    assert torch.equal(a[: n - 1], b[: n - 1])
    assert not torch.equal(a[n - 1], b[n - 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_equal_decode_steps(dtype):
    """The chunk references == n_valid applications of the decode references on that row."""
    n, t, start = 37, 48, 21
    qkv, qw, kw, inv_freq, kc, vc = _inputs(17, t, dtype, "cpu")
    info = _info(start, n, "cpu")
    kp, vp = kc.clone(), vc.clone()
    q, err = _store("reference", qkv, qw, kw, info, inv_freq, kp, vp)
    out = _attend("reference", q, kp, vp, info, qkv)
    kd, vd = kc.clone(), vc.clone()
    for i in range(n):
        pos = torch.tensor([start + i])
        qi = torch.empty(1, NH, D, dtype=dtype)
        attention.qk_norm_rope_store_reference(qkv[i:i + 1], qw, kw, pos, inv_freq, kd[ROW:ROW + 1],
                                               vd[ROW:ROW + 1], qi, err, EPS, NH, NKV, D)
        assert torch.equal(qi, q[i:i + 1])
        oi = torch.empty(1, NH * D, dtype=dtype)
        attention.decode_attention_reference(qi, kd[ROW:ROW + 1], vd[ROW:ROW + 1], pos, qkv[i:i + 1], SCALE, oi)
        tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out[i:i + 1], oi, **tol)
    assert int(err) == 0
    assert torch.equal(kd, kp) and torch.equal(vd, vp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers_eager(dtype):
    """prefill_attention_reference == transformers' eager attention with its causal additive mask
    (queries at positions start.., keys 0..start+n-1), times sigmoid(gate)."""
    mod = need_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    n, t, start = 20, 24, 9
    qkv, _, _, _, kc, vc = _inputs(23, t, dtype, "cpu")
    q = torch.randn(t, NH, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = _attend("reference", q, kc, vc, _info(start, n, "cpu"), qkv)

    class _M:
        num_key_value_groups = NH // NKV
        training = False
    keys = start + n
    allowed = torch.arange(keys)[None, :] <= (start + torch.arange(n))[:, None]
    mask = torch.zeros(n, keys, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
    o_hf, _ = mod.eager_attention_forward(_M(), q[:n].transpose(0, 1)[None], kc[ROW:ROW + 1, :, :keys],
                                          vc[ROW:ROW + 1, :, :keys], mask, SCALE)
    gate = qkv[:n, : NH * 2 * D].reshape(n, NH, 2 * D)[..., D:].reshape(n, -1)
    want = o_hf.reshape(n, -1) * torch.sigmoid(gate)
    tol = 1e-6 if dtype == torch.float32 else 1e-2     # batched vs per-head matmul summation order
    torch.testing.assert_close(out[:n], want, atol=tol, rtol=tol)


def test_argument_checks():
    t = 16
    qkv, qw, kw, inv_freq, kc, vc = _inputs(1, t, torch.float32, "cpu")
    q = torch.zeros(t, NH, D)
    out = torch.zeros(t, NH * D)
    err = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(TypeError, match="info must be an int64"):
        attention.prefill_attention_triton(q, kc, vc, torch.zeros(3, dtype=torch.int32), qkv, SCALE, out)
    with pytest.raises(ValueError, match="info must be an int64"):
        attention.qk_norm_rope_store_prefill_triton(qkv, qw, kw, torch.zeros(2, dtype=torch.int64), inv_freq,
                                                    kc, vc, q, err, EPS, NH, NKV, D)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention.prefill_attention_triton(torch.zeros(t, 3, D), kc, vc, _info(0, 1, "cpu"), qkv, SCALE, out)
    with pytest.raises(ValueError, match="out must have shape"):
        attention.prefill_attention_triton(q, kc, vc, _info(0, 1, "cpu"), qkv, SCALE, out[:, :-1])
    with pytest.raises(ValueError, match="n_valid 17"):
        attention.prefill_attention_reference(q, kc, vc, _info(0, 17, "cpu"), qkv, SCALE, out)
    with pytest.raises(ValueError, match="row 3"):
        attention.qk_norm_rope_store_prefill_reference(qkv, qw, kw, _info(0, 1, "cpu", row=3), inv_freq, kc, vc,
                                                       q, err, EPS, NH, NKV, D)


def test_tiles_fit_the_gpu_at_model_shapes():
    """35b-a3b (G=8) and 122b-a10b (G=16) at D=256: tl.dot-legal power-of-two tiles whose Q tile and
    pipelined K/V tiles fit the shared-memory budget argued in prefill_attention_tiles (the GPU test
    checks the compiled kernel's own figure)."""
    for g in (8, 16):
        for dtype, elem in ((torch.bfloat16, 2), (torch.float32, 4)):
            c = attention.prefill_attention_tiles(256, g, dtype)
            m = c["BLOCK_T"] * c["BLOCK_G"]
            assert c["BLOCK_G"] == g and min(m, c["BLOCK_N"], c["BLOCK_D"]) >= 16
            smem = (m * 256 + c["num_stages"] * 2 * c["BLOCK_N"] * 256) * elem
            assert smem <= 160 * 1024, (g, dtype, c)
    # the H100 choice for the bf16 models: 128 rows of queries a tile, 32 keys, 3 stages
    c = attention.prefill_attention_tiles(256, 8, torch.bfloat16)
    assert (c["BLOCK_T"] * c["BLOCK_G"], c["BLOCK_N"], c["num_stages"]) == (128, 32, 3)
