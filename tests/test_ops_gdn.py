"""conv1d_update and gated_delta_step (+ fused gated norm): Triton vs reference; references vs
transformers' causal_conv1d_update / torch_recurrent_gated_delta_rule."""
import pytest
import torch

from model.ops import conv, gated_delta, norm
from tests.needs import need_module

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c,w", [(1, 40, 4), (3, 700, 4), (2, 33, 3)])
def test_conv1d_update(device, dtype, b, c, w):
    g = torch.Generator().manual_seed(c)
    xbig = torch.randn(b, c + 9, generator=g).to(dtype).to(device)
    x = xbig[:, 4:4 + c]
    state = torch.randn(b, c, w, generator=g).to(dtype).to(device)
    weight = (torch.randn(c, w, generator=g) * 0.5).to(dtype).to(device)
    st_t, st_r = state.clone(), state.clone()
    out = torch.full((b, c), float("nan"), dtype=dtype, device=device)
    ref = torch.empty_like(out)
    for _ in range(2):  # two steps: the second reads the state the first wrote
        conv.conv1d_update_triton(x, st_t, weight, out)
        conv.conv1d_update_reference(x, st_r, weight, ref)
    assert torch.equal(st_t, st_r)
    torch.testing.assert_close(out, ref, **_tol(dtype))


def test_conv1d_reference_matches_transformers():
    mod = need_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        x = torch.randn(2, 24, generator=g).to(dtype)
        state = torch.randn(2, 24, 4, generator=g).to(dtype)
        weight = torch.randn(24, 4, generator=g).to(dtype)
        st_hf = state.clone()
        hf = mod.causal_conv1d_update.__wrapped__ if hasattr(mod.causal_conv1d_update, "__wrapped__") \
            else mod.causal_conv1d_update
        y_hf = hf(x.unsqueeze(-1), st_hf, weight, None, "silu")[:, :, 0]
        out = torch.empty_like(x)
        conv.conv1d_update_reference(x, state, weight, out)
        assert torch.equal(state, st_hf)
        assert torch.equal(out, y_hf)


def _gdn_inputs(g, b, nk, nv, k, v, dtype, device):
    width = 2 * nk * k + nv * v
    qkv = (torch.randn(b, width + 5, generator=g)).to(dtype).to(device)[:, 2:2 + width]
    ab = torch.randn(b, 2 * nv + 3, generator=g).to(dtype).to(device)
    a, bb = ab[:, :nv], ab[:, nv + 3:]
    A_log = torch.log(torch.empty(nv).uniform_(0.5, 16, generator=g)).to(dtype).to(device)
    dt_bias = torch.randn(nv, generator=g).to(dtype).to(device)
    state = (torch.randn(b, nv, k, v, generator=g) * 0.1).to(device)
    return qkv, a, bb, A_log, dt_bias, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nk,nv,k,v", [(1, 2, 4, 16, 16), (2, 1, 3, 24, 20), (3, 2, 2, 32, 8)])
@pytest.mark.parametrize("fused", [False, True])
def test_gated_delta_step(device, dtype, b, nk, nv, k, v, fused):
    g = torch.Generator().manual_seed(b * 100 + nv * 10 + k)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, b, nk, nv, k, v, dtype, device)
    extra = {}
    if fused:
        z = torch.randn(b, nv * v, generator=g).to(dtype).to(device)
        extra = dict(z=z, norm_weight=torch.randn(v, generator=g).to(dtype).to(device), eps=1e-6)
    st_t, st_r = state.clone(), state.clone()
    out = torch.full((b, nv, v), float("nan"), dtype=dtype, device=device)
    ref = torch.empty_like(out)
    for _ in range(2):
        gated_delta.gated_delta_step_triton(qkv, a, bb, A_log, dt_bias, st_t, out, nk, k, v, **extra)
        gated_delta.gated_delta_step_reference(qkv, a, bb, A_log, dt_bias, st_r, ref, nk, k, v, **extra)
    # bf16 on CPU: the interpreter truncates beta = sigmoid(b) to bf16 instead of rounding it
    st_tol = 1e-5 if dtype == torch.float32 or device == "cuda" else 1e-2
    torch.testing.assert_close(st_t, st_r, atol=st_tol, rtol=st_tol)
    torch.testing.assert_close(out, ref, **_tol(dtype))


def test_gated_delta_reference_matches_transformers():
    mod = need_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    g = torch.Generator().manual_seed(3)
    b, nk, nv, k, v = 2, 2, 4, 16, 8
    for dtype in DTYPES:
        qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, b, nk, nv, k, v, dtype, "cpu")
        q = qkv[:, : nk * k].reshape(b, 1, nk, k)
        kk = qkv[:, nk * k: 2 * nk * k].reshape(b, 1, nk, k)
        vv = qkv[:, 2 * nk * k:].reshape(b, 1, nv, v)
        beta = bb.sigmoid().unsqueeze(1)
        gg = (-A_log.float().exp() * torch.nn.functional.softplus(a.float() + dt_bias)).unsqueeze(1)
        o_hf, s_hf = mod.torch_recurrent_gated_delta_rule(q, kk, vv, g=gg, beta=beta, initial_state=state.clone(),
                                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
        out = torch.empty(b, nv, v, dtype=dtype)
        st = state.clone()
        gated_delta.gated_delta_step_reference(qkv, a, bb, A_log, dt_bias, st, out, nk, k, v)
        torch.testing.assert_close(st, s_hf, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out, o_hf[:, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("block_v", [8, 16])
def test_gated_delta_split_fused_norm_matches_the_unsplit_kernel(device, block_v):
    """The fused norm with the value columns split over programs (the head's last program
    normalises the whole head): same output and state as one program per head, counters back at
    zero after every step, and a missing or wrong workspace is refused up front."""
    b, nk, nv, k, v = 2, 2, 4, 16, 32
    dtype = torch.float32
    g = torch.Generator().manual_seed(7)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, b, nk, nv, k, v, dtype, device)
    extra = dict(z=torch.randn(b, nv * v, generator=g).to(device),
                 norm_weight=torch.randn(v, generator=g).to(device), eps=1e-6)
    ws = gated_delta.gated_delta_workspace(b, nv, device)
    st_s, st_u = state.clone(), state.clone()
    out_s = torch.full((b, nv * v), float("nan"), device=device)
    out_u = torch.empty_like(out_s)
    for _ in range(3):
        gated_delta.gated_delta_step_triton(qkv, a, bb, A_log, dt_bias, st_s, out_s, nk, k, v, **extra,
                                            workspace=ws, block_v=block_v)
        gated_delta.gated_delta_step_triton(qkv, a, bb, A_log, dt_bias, st_u, out_u, nk, k, v, **extra)
        assert int(ws.abs().sum()) == 0, "a head's counter was not reset"
    torch.testing.assert_close(st_s, st_u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_s, out_u, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="needs the counter workspace"):
        gated_delta.gated_delta_step_triton(qkv, a, bb, A_log, dt_bias, st_s, out_s, nk, k, v, **extra, block_v=8)
    with pytest.raises(ValueError, match=r"workspace must be int32 with >= 8 elements"):
        gated_delta.gated_delta_step_triton(qkv, a, bb, A_log, dt_bias, st_s, out_s, nk, k, v, **extra,
                                            workspace=ws[:3], block_v=8)
    with pytest.raises(ValueError, match="block_v must be a power of two, got 12"):
        gated_delta.gated_delta_step_triton(qkv, a, bb, A_log, dt_bias, st_s, out_s, nk, k, v, **extra,
                                            workspace=ws, block_v=12)


def _conv_in(g, b, nk, nv, k, v, dtype, device, w=4):
    c = 2 * nk * k + nv * v
    state = torch.randn(b, c, w, generator=g).to(dtype).to(device)
    weight = (torch.randn(c, w, generator=g) * 0.5).to(dtype).to(device)
    return gated_delta.ConvIn(state, weight, gated_delta.gated_delta_conv_counters(b, nk, device),
                              torch.full((b, c), float("nan"), dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_v,fused_norm", [(None, False), (None, True), (8, True), (16, False)])
def test_gated_delta_fused_conv_equals_conv_then_step(monkeypatch, device, dtype, block_v, fused_norm):
    """MODEL_FUSED_CONV=1 (patched): the kernel's own conv gives the same output, recurrent state and
    conv state, bit for bit, as conv1d_update then the step (three steps: each reads the conv state
    the one before wrote), with several programs per key head (2 value heads each, value columns
    split); the counters are back at zero after every step. The reference with conv= is the
    reference conv then the reference step."""
    import dataclasses

    from model.ops.gated_delta import step
    from model.settings import SETTINGS

    b, nk, nv, k, v = 2, 2, 4, 16, 32
    g = torch.Generator().manual_seed(11)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, b, nk, nv, k, v, dtype, device)
    extra = {}
    if fused_norm:
        extra = dict(z=torch.randn(b, nv * v, generator=g).to(dtype).to(device),
                     norm_weight=torch.randn(v, generator=g).to(dtype).to(device), eps=1e-6)
    ws = gated_delta.gated_delta_workspace(b, nv, device)
    cf = _conv_in(g, b, nk, nv, k, v, dtype, device)
    cu = gated_delta.ConvIn(cf.state.clone(), cf.weight, cf.counters.clone(), cf.out.clone())
    cr = gated_delta.ConvIn(cf.state.clone(), cf.weight, cf.counters.clone(), cf.out.clone())
    st_f, st_u, st_r = state.clone(), state.clone(), state.clone()
    out_f, out_u, out_r = (torch.full((b, nv * v), float("nan"), dtype=dtype, device=device) for _ in range(3))
    fused = dataclasses.replace(SETTINGS, fused_conv=True)
    for p in range(3):
        x = qkv * (1 + p)
        monkeypatch.setattr(step, "SETTINGS", fused)
        gated_delta.gated_delta_step_triton(x, a, bb, A_log, dt_bias, st_f, out_f, nk, k, v, **extra,
                                            workspace=ws, block_v=block_v, conv=cf)
        assert torch.isnan(cf.out).all(), "the fused kernel wrote the unfused path's conv buffer"
        assert int(cf.counters.abs().sum()) == 0 and int(ws.abs().sum()) == 0
        monkeypatch.setattr(step, "SETTINGS", SETTINGS)
        gated_delta.gated_delta_step_triton(x, a, bb, A_log, dt_bias, st_u, out_u, nk, k, v, **extra,
                                            workspace=ws, block_v=block_v, conv=cu)
        gated_delta.gated_delta_step_reference(x, a, bb, A_log, dt_bias, st_r, out_r, nk, k, v, **extra, conv=cr)
        assert torch.equal(cf.state, cu.state) and torch.equal(cu.state, cr.state), p
        assert torch.equal(out_f, out_u) and torch.equal(st_f, st_u), p
    if dtype == torch.float32 or device == "cuda":   # bf16 on CPU: the interpreter truncates where the GPU rounds
        torch.testing.assert_close(st_u, st_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_u, out_r, **_tol(dtype))


def test_gated_delta_conv_refusals(device):
    b, nk, nv, k, v = 1, 1, 2, 16, 16
    g = torch.Generator().manual_seed(12)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, b, nk, nv, k, v, torch.float32, device)
    good = _conv_in(g, b, nk, nv, k, v, torch.float32, device)
    out = torch.full((b, nv * v), float("nan"), device=device)
    st = state.clone()
    for fn in (gated_delta.gated_delta_step_triton, gated_delta.gated_delta_step_reference):
        with pytest.raises(ValueError, match=r"conv.counters must be int32 with >= 1 elements"):
            fn(qkv, a, bb, A_log, dt_bias, st, out, nk, k, v, conv=good._replace(counters=good.counters.float()))
        with pytest.raises(ValueError, match=r"conv.state must be \[1, 64, W\].*got \(1, 63, 4\)"):
            fn(qkv, a, bb, A_log, dt_bias, st, out, nk, k, v, conv=good._replace(state=good.state[:, :-1]))
        with pytest.raises(TypeError, match="conv must be a ConvIn, got tuple"):
            fn(qkv, a, bb, A_log, dt_bias, st, out, nk, k, v, conv=tuple(good))
    assert torch.isnan(out).all() and torch.equal(st, state)
