"""Gated DeltaNet prefill ops over a chunk of tokens of one sequence (info = (row, start, n_valid)):
conv1d_prefill and gated_delta_chunk, Triton vs reference; the references vs the decode steps run
token by token and vs transformers' torch_chunk_gated_delta_rule; chunk boundaries, padding and
other rows.

Tolerances: fp32 1e-5 abs/rel for outputs and states of the same math in another order (the
chunked form regroups the sums), 1e-6 where the reference meets the decode steps. bf16 outputs
3e-2 (a few bf16 ulps at two rounding points). Under the CPU interpreter a cast to bf16 truncates
instead of rounding (beta = sigmoid(b), the conv result), so there the bf16 state gets 1e-2; on a
GPU 1e-5. The fp16 tests pin the rounding points instead (fp16 casts round in the interpreter too):
at least 99% of the outputs bit-equal to the reference (a missing or extra rounding moves far more).
"""
import pytest

from tests.needs import need_module
import torch

from model.ops import conv, gated_delta

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _state_tol(dtype, device):
    t = 1e-5 if dtype == torch.float32 or device == "cuda" else 1e-2
    return dict(atol=t, rtol=t)


def _info(row, start, n, device):
    return torch.tensor([row, start, n], dtype=torch.int64, device=device)


# ---- conv1d_prefill ----------------------------------------------------------------------------

def _conv_inputs(g, t, n, b, c, w, dtype, device):
    xbig = torch.randn(t, c + 7, generator=g)
    xbig[n:] = float("nan")                       # padding rows: whatever they hold must not leak
    x = xbig.to(dtype).to(device)[:, 3:3 + c]     # a column slice: free row stride
    state = torch.randn(b, c, w, generator=g).to(dtype).to(device)
    weight = (torch.randn(c, w, generator=g) * 0.5).to(dtype).to(device)
    return x, state, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,c,w", [(16, 1, 40, 4), (16, 2, 33, 3), (128, 65, 300, 4), (64, 64, 24, 4)])
def test_conv1d_prefill(device, dtype, t, n, c, w):
    g = torch.Generator().manual_seed(t * 1000 + n)
    x, state, weight = _conv_inputs(g, t, n, 3, c, w, dtype, device)
    row = 1
    st_t, st_r = state.clone(), state.clone()
    out = torch.full((t, c), float("nan"), dtype=dtype, device=device)
    ref = torch.full_like(out, float("nan"))
    for _ in range(2):   # the second call continues from the state the first wrote
        conv.conv1d_prefill_triton(x, st_t, weight, out, _info(row, 7, n, device))
        conv.conv1d_prefill_reference(x, st_r, weight, ref, _info(row, 7, n, device))
        assert torch.equal(st_t, st_r)
        torch.testing.assert_close(out[:n], ref[:n], **_tol(dtype))
    others = [0, 2]
    assert torch.equal(st_t[others], state[others]), "another row's conv state changed"
    assert not torch.equal(st_t[row], state[row])


def test_conv1d_prefill_rounds_where_the_reference_does(device):
    g = torch.Generator().manual_seed(4)
    t, n, c, w = 64, 60, 300, 4
    x, state, weight = _conv_inputs(g, t, n, 2, c, w, torch.float16, device)
    st_t, st_r = state.clone(), state.clone()
    out = torch.full((t, c), float("nan"), dtype=torch.float16, device=device)
    ref = torch.full_like(out, float("nan"))
    conv.conv1d_prefill_triton(x, st_t, weight, out, _info(1, 0, n, device))
    conv.conv1d_prefill_reference(x, st_r, weight, ref, _info(1, 0, n, device))
    assert torch.equal(st_t, st_r)
    assert (out[:n] == ref[:n]).float().mean() >= 0.99
    torch.testing.assert_close(out[:n], ref[:n], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1d_prefill_reference_is_the_decode_update_per_token(dtype):
    g = torch.Generator().manual_seed(5)
    t, n, b, c, w, row = 24, 19, 2, 40, 4, 1
    x, state, weight = _conv_inputs(g, t, n, b, c, w, dtype, "cpu")
    st_p, st_d = state.clone(), state.clone()
    out_p = torch.full((t, c), float("nan"), dtype=dtype)
    out_d = torch.full_like(out_p, float("nan"))
    conv.conv1d_prefill_reference(x, st_p, weight, out_p, _info(row, 0, n, "cpu"))
    for i in range(n):
        conv.conv1d_update_reference(x[i:i + 1], st_d[row:row + 1], weight, out_d[i:i + 1])
    assert torch.equal(st_p, st_d)
    torch.testing.assert_close(out_p[:n], out_d[:n], atol=1e-6, rtol=1e-6)


def test_conv1d_prefill_in_parts_equals_all_at_once(device):
    g = torch.Generator().manual_seed(6)
    t, n1, n2, c, w = 64, 2, 27, 50, 4
    x, state, weight = _conv_inputs(g, t, n1 + n2, 2, c, w, torch.float32, device)
    st_a, st_b = state.clone(), state.clone()
    out_a = torch.full((t, c), float("nan"), device=device)
    out_b = torch.full_like(out_a, float("nan"))
    conv.conv1d_prefill_triton(x, st_a, weight, out_a, _info(0, 0, n1 + n2, device))
    conv.conv1d_prefill_triton(x[:16], st_b, weight, out_b[:16], _info(0, 0, n1, device))
    conv.conv1d_prefill_triton(x[n1:n1 + 32], st_b, weight, out_b[n1:n1 + 32], _info(0, n1, n2, device))
    assert torch.equal(st_a, st_b)
    torch.testing.assert_close(out_a[:n1 + n2], out_b[:n1 + n2], atol=1e-6, rtol=1e-6)


def test_conv1d_prefill_argument_errors():
    x, st, w = torch.zeros(8, 16), torch.zeros(2, 16, 4), torch.zeros(16, 4)
    out = torch.zeros(8, 16)
    with pytest.raises(TypeError, match="info must be an int64 tensor"):
        conv.conv1d_prefill_triton(x, st, w, out, torch.tensor([0, 0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="out must have shape"):
        conv.conv1d_prefill_triton(x, st, w, out[:4], _info(0, 0, 1, "cpu"))
    with pytest.raises(ValueError, match="n_valid 9"):
        conv.conv1d_prefill_reference(x, st, w, out, _info(0, 0, 9, "cpu"))


# ---- gated_delta_chunk -------------------------------------------------------------------------

def _gdn_inputs(g, t, n, b, nk, nv, k, v, dtype, device, strong_decay=False):
    width = 2 * nk * k + nv * v
    qkv = torch.randn(t, width + 5, generator=g)
    ab = torch.randn(t, 2 * nv + 3, generator=g)
    qkv[n:], ab[n:] = float("nan"), float("nan")      # padding rows must not leak anywhere
    qkv = qkv.to(dtype).to(device)[:, 2:2 + width]
    ab = ab.to(dtype).to(device)
    a, bb = ab[:, :nv], ab[:, nv + 3:]
    # mostly slow decays so that the state carries across chunks; strong_decay: e^g underflows
    lo, hi = (40.0, 60.0) if strong_decay else (0.01, 1.0)
    A_log = torch.log(torch.empty(nv).uniform_(lo, hi, generator=g)).to(dtype).to(device)
    dt_bias = (torch.randn(nv, generator=g) * 0.5).to(dtype).to(device)
    state = (torch.randn(b, nv, k, v, generator=g) * 0.3).to(device)
    return qkv, a, bb, A_log, dt_bias, state


def _run_both(device, dtype, t, n, nk, nv, k, v, seed, row=1, strong_decay=False, **kw):
    g = torch.Generator().manual_seed(seed)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, t, n, 3, nk, nv, k, v, dtype, device, strong_decay)
    st_t, st_r = state.clone(), state.clone()
    out = torch.full((t, nv * v), float("nan"), dtype=dtype, device=device)
    ref = torch.full_like(out, float("nan"))
    info = _info(row, 100, n, device)
    gated_delta.gated_delta_chunk_triton(qkv, a, bb, A_log, dt_bias, st_t, out, info, nk, k, v, **kw)
    gated_delta.gated_delta_chunk_reference(qkv, a, bb, A_log, dt_bias, st_r, ref, info, nk, k, v)
    others = [r for r in range(3) if r != row]
    assert torch.equal(st_t[others], state[others]), "another row's state changed"
    return out, ref, st_t, st_r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(16, 1), (64, 63), (64, 64), (128, 65), (256, 200)])
def test_gated_delta_chunk(device, dtype, t, n):
    """n_valid around the 64-token chunk, T padded above it, a non-zero initial state of row 1."""
    out, ref, st_t, st_r = _run_both(device, dtype, t, n, 2, 4, 32, 16, seed=t + n)
    assert torch.isfinite(out[:n]).all()
    torch.testing.assert_close(out[:n], ref[:n], **_tol(dtype))
    torch.testing.assert_close(st_t, st_r, **_state_tol(dtype, device))


def test_gated_delta_chunk_rounds_where_the_reference_does(device):
    """fp16 with fp32 products: beta rounded to the model dtype, only the output rounded."""
    out, ref, st_t, st_r = _run_both(device, torch.float16, 128, 100, 2, 4, 32, 16, seed=1, dot_precision="ieee")
    torch.testing.assert_close(st_t, st_r, atol=1e-5, rtol=1e-5)
    assert (out[:100] == ref[:100]).float().mean() >= 0.99
    torch.testing.assert_close(out[:100], ref[:100], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("block_v", [16, 32])
def test_gated_delta_chunk_split_value_columns(device, block_v):
    out, ref, st_t, st_r = _run_both(device, torch.float32, 128, 100, 1, 2, 16, 64, seed=3, row=0, block_v=block_v)
    torch.testing.assert_close(out[:100], ref[:100], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_t, st_r, atol=1e-5, rtol=1e-5)


def test_gated_delta_chunk_prefetch_changes_nothing(device):
    """The scan's prefetch of the next chunk (the default) gives the same bits as loading each
    chunk when it is used, over three chunks and a partial last one."""
    a = _run_both(device, torch.float32, 192, 150, 1, 2, 16, 32, seed=6, row=2, block_v=16)
    b = _run_both(device, torch.float32, 192, 150, 1, 2, 16, 32, seed=6, row=2, block_v=16, prefetch=False)
    assert torch.equal(a[0][:150], b[0][:150]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[0][:150], a[1][:150], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(64, 63), (192, 150)])
def test_gated_delta_chunk_precompute_w(device, dtype, t, n):
    """The scan's update as U0 - W S (W and U0 from the prep) against the reference, padded rows,
    several chunks, value columns split over programs."""
    ws = gated_delta.gated_delta_chunk_workspace(t, 4, device, 32, 16)
    out, ref, st_t, st_r = _run_both(device, dtype, t, n, 2, 4, 32, 16, seed=t + n + 1, workspace=ws,
                                     precompute_w=True)
    assert torch.isfinite(out[:n]).all()
    torch.testing.assert_close(out[:n], ref[:n], **_tol(dtype))
    torch.testing.assert_close(st_t, st_r, **_state_tol(dtype, device))
    ws = gated_delta.gated_delta_chunk_workspace(t, 2, device, 16, 64)      # 4 programs a head
    out, ref, st_t, st_r = _run_both(device, dtype, t, n, 1, 2, 16, 64, seed=t + n + 2, workspace=ws,
                                     precompute_w=True, block_v=16)
    torch.testing.assert_close(out[:n], ref[:n], **_tol(dtype))
    torch.testing.assert_close(st_t, st_r, **_state_tol(dtype, device))
    with pytest.raises(ValueError, match=r"gated_delta_chunk_workspace\(64, 4, device, 32, 16\)"):
        _run_both(device, dtype, 64, 63, 2, 4, 32, 16, seed=1, precompute_w=True,
                  workspace=gated_delta.gated_delta_chunk_workspace(64, 4, device))


def test_gated_delta_chunk_head_dims_128(device):
    """The 35b-a3b head dims (K = V = 128), key heads shared by two value heads each."""
    out, ref, st_t, st_r = _run_both(device, torch.float32, 128, 70, 1, 2, 128, 128, seed=4, row=2)
    torch.testing.assert_close(out[:70], ref[:70], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_t, st_r, atol=1e-5, rtol=1e-5)


def test_gated_delta_chunk_strong_decay_stays_finite(device):
    """g ~ -100 a token: e^G underflows to 0 inside a chunk; nothing may turn into inf or NaN."""
    out, ref, st_t, st_r = _run_both(device, torch.float32, 128, 90, 1, 2, 16, 16, seed=8, strong_decay=True)
    assert torch.isfinite(out[:90]).all() and torch.isfinite(st_t).all()
    torch.testing.assert_close(out[:90], ref[:90], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_t, st_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gated_delta_chunk_in_parts_equals_all_at_once(device, backend):
    """70 tokens then 60 (chunk boundaries shifted) equal 130 at once."""
    fn = getattr(gated_delta, f"gated_delta_chunk_{backend}")
    nk, nv, k, v, n1, n2 = 1, 2, 16, 16, 70, 60
    g = torch.Generator().manual_seed(9)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, 192, n1 + n2, 2, nk, nv, k, v, torch.float32, device)
    st_a, st_b = state.clone(), state.clone()
    out_a = torch.full((192, nv * v), float("nan"), device=device)
    out_b = torch.full_like(out_a, float("nan"))
    fn(qkv, a, bb, A_log, dt_bias, st_a, out_a, _info(1, 0, n1 + n2, device), nk, k, v)
    fn(qkv[:128], a[:128], bb[:128], A_log, dt_bias, st_b, out_b[:128], _info(1, 0, n1, device), nk, k, v)
    sl = slice(n1, n1 + 64)
    fn(qkv[sl], a[sl], bb[sl], A_log, dt_bias, st_b, out_b[sl], _info(1, n1, n2, device), nk, k, v)
    torch.testing.assert_close(out_a[:n1 + n2], out_b[:n1 + n2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_a, st_b, atol=1e-5, rtol=1e-5)
    assert torch.equal(st_a[0], state[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_delta_chunk_reference_is_the_decode_step_per_token(dtype):
    nk, nv, k, v, n, row = 2, 4, 16, 8, 40, 1
    g = torch.Generator().manual_seed(11)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, 48, n, 2, nk, nv, k, v, dtype, "cpu")
    st_p, st_d = state.clone(), state.clone()
    out_p = torch.full((48, nv * v), float("nan"), dtype=dtype)
    out_d = torch.full_like(out_p, float("nan"))
    gated_delta.gated_delta_chunk_reference(qkv, a, bb, A_log, dt_bias, st_p, out_p, _info(row, 0, n, "cpu"),
                                            nk, k, v)
    for i in range(n):
        s = slice(i, i + 1)
        gated_delta.gated_delta_step_reference(qkv[s], a[s], bb[s], A_log, dt_bias, st_d[row:row + 1],
                                               out_d[s], nk, k, v)
    torch.testing.assert_close(st_p, st_d, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_p[:n], out_d[:n], atol=1e-6, rtol=1e-6)


def test_gated_delta_chunk_matches_transformers_chunked_rule(device):
    """Both forms against transformers' torch_chunk_gated_delta_rule (fp32, initial state)."""
    mod = need_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    nk, nv, k, v, n = 2, 4, 16, 16, 150
    g = torch.Generator().manual_seed(12)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, n, n, 1, nk, nv, k, v, torch.float32, "cpu")
    q = qkv[:, : nk * k].reshape(1, n, nk, k)
    kk = qkv[:, nk * k: 2 * nk * k].reshape(1, n, nk, k)
    vv = qkv[:, 2 * nk * k:].reshape(1, n, nv, v)
    beta = bb.sigmoid().unsqueeze(0)
    gg = (-A_log.exp() * torch.nn.functional.softplus(a + dt_bias)).unsqueeze(0)
    o_hf, s_hf = mod.torch_chunk_gated_delta_rule(q, kk, vv, g=gg, beta=beta, initial_state=state.clone(),
                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    for fn in (gated_delta.gated_delta_chunk_reference, gated_delta.gated_delta_chunk_triton):
        st = state.clone().to(device)
        out = torch.full((n, nv, v), float("nan"), device=device)
        args = [x.to(device) for x in (qkv, a, bb, A_log, dt_bias)]
        fn(*args, st, out, _info(0, 0, n, device), nk, k, v)
        torch.testing.assert_close(st.cpu(), s_hf, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.cpu(), o_hf[0], atol=1e-5, rtol=1e-5)


def test_gated_delta_chunk_workspace_and_argument_errors(device):
    nk, nv, k, v, t = 1, 2, 16, 16, 100
    g = torch.Generator().manual_seed(13)
    qkv, a, bb, A_log, dt_bias, state = _gdn_inputs(g, t, t, 1, nk, nv, k, v, torch.float32, device)
    info = _info(0, 0, t, device)
    out = torch.empty(t, nv * v, device=device)
    # T and P (64 x 64) and the scan's five per-token factors, for each of 2 chunks and 2 heads
    assert gated_delta.gated_delta_chunk_workspace_numel(t, nv) == nv * 128 * (2 * 64 + 5)
    ws = gated_delta.gated_delta_chunk_workspace(2048, nv, device)   # sized for the largest chunk
    st_w, st_n = state.clone(), state.clone()
    out_n = torch.empty_like(out)
    gated_delta.gated_delta_chunk_triton(qkv, a, bb, A_log, dt_bias, st_w, out, info, nk, k, v, workspace=ws)
    gated_delta.gated_delta_chunk_triton(qkv, a, bb, A_log, dt_bias, st_n, out_n, info, nk, k, v)
    assert torch.equal(st_w, st_n) and torch.equal(out, out_n)
    call = gated_delta.gated_delta_chunk_triton
    with pytest.raises(ValueError, match=r"workspace must be contiguous fp32 .* >= 34048 elements"):
        call(qkv, a, bb, A_log, dt_bias, state, out, info, nk, k, v, workspace=ws[:100])
    with pytest.raises(ValueError, match="block_v must be a power of two >= 16, got 8"):
        call(qkv, a, bb, A_log, dt_bias, state, out, info, nk, k, v, block_v=8)
    with pytest.raises(ValueError, match="dot_precision must be one of"):
        call(qkv, a, bb, A_log, dt_bias, state, out, info, nk, k, v, dot_precision="bf16")
    with pytest.raises(TypeError, match="info must be an int64 tensor"):
        call(qkv, a, bb, A_log, dt_bias, state, out, info.float(), nk, k, v)
    with pytest.raises(ValueError, match="a must have shape"):
        call(qkv, a[:50], bb, A_log, dt_bias, state, out, info, nk, k, v)
    with pytest.raises(TypeError, match="state must be float32"):
        call(qkv, a, bb, A_log, dt_bias, state.double(), out, info, nk, k, v)
    with pytest.raises(ValueError, match=r"info = \(row 3"):
        gated_delta.gated_delta_chunk_reference(qkv, a, bb, A_log, dt_bias, state, out, _info(3, 0, 1, device),
                                                nk, k, v)
