"""Gated DeltaNet prefill ops (conv1d_prefill, gated_delta_chunk) at 35b-a3b shapes on the GPU:
Triton vs the plain-torch references, vs transformers' torch_chunk_gated_delta_rule, in parts vs
at once, and captured in a CUDA graph replayed with new info values (no allocation, bit-identical
to eager).

Tolerances. conv: states bit-exact (copies); outputs fp32 1e-5, bf16 2e-2 (two bf16 rounding
points). gated delta, fp32 model (products in fp32, "ieee"): outputs and state 1e-4 (the chunked
form regroups the sums; measured ~1e-6 on CPU). bf16 model (products in tf32): the emulated tf32
error at 2048 tokens (interpreter with tf32-rounded operands) was 6e-5 abs on outputs of size
~0.08 and 3.5e-4 abs (7e-5 relative, Frobenius) on a state of size ~1.3, so outputs get
atol 1e-3 / rtol 2e-2 and the state atol 3e-3 / rtol 1e-2 plus a 1e-3 relative Frobenius bound;
with "ieee" products the bf16 state must meet 1e-4."""
import pytest

from tests.needs import need_module
import torch

from tests.gpu._capture import capture_without_allocation

from model.ops import conv, gated_delta

pytestmark = pytest.mark.gpu

DEV = "cuda"
NK, NV, KD, VD, W = 16, 32, 128, 128, 4
C = 2 * NK * KD + NV * VD
B, ROW = 4, 2
CASES = [(16, 1), (64, 63), (128, 64), (128, 65), (256, 200), (2048, 1000), (2048, 2048)]


def _info(row, start, n):
    return torch.tensor([row, start, n], dtype=torch.int64, device=DEV)


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _conv_inputs(t, n, dtype, seed):
    g = _gen(seed)
    xbig = torch.randn(t, C + 64, generator=g, device=DEV)
    xbig[n:] = float("nan")
    x = xbig.to(dtype)[:, 32:32 + C]          # a column slice of a wider projection output
    state = torch.randn(B, C, W, generator=g, device=DEV).to(dtype)
    weight = (torch.randn(C, W, generator=g, device=DEV) * 0.5).to(dtype)
    return x, state, weight


def _gdn_inputs(t, n, dtype, seed):
    g = _gen(seed)
    width = C + NV * VD + 2 * NV                 # qkv | z | b | a, as the fused in_proj lays them out
    proj = torch.randn(t, width, generator=g, device=DEV)
    proj[n:] = float("nan")
    proj = proj.to(dtype)
    qkv, b, a = proj[:, :C], proj[:, C + NV * VD:C + NV * VD + NV], proj[:, C + NV * VD + NV:]
    A_log = torch.log(torch.linspace(0.01, 16, NV, device=DEV)).to(dtype)   # slow to fast decays
    dt_bias = (torch.randn(NV, generator=g, device=DEV) * 0.5).to(dtype)
    state = torch.randn(B, NV, KD, VD, generator=g, device=DEV) * 0.3
    return qkv, a, b, A_log, dt_bias, state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,n", CASES)
def test_conv1d_prefill(dtype, t, n):
    x, state, weight = _conv_inputs(t, n, dtype, seed=t + n)
    st_t, st_r = state.clone(), state.clone()
    out = torch.full((t, C), float("nan"), dtype=dtype, device=DEV)
    ref = torch.full_like(out, float("nan"))
    conv.conv1d_prefill_triton(x, st_t, weight, out, _info(ROW, 5, n))
    conv.conv1d_prefill_reference(x, st_r, weight, ref, _info(ROW, 5, n))
    assert torch.equal(st_t, st_r)
    others = [r for r in range(B) if r != ROW]
    assert torch.equal(st_t[others], state[others])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:n], ref[:n], **tol)


def _gdn_both(t, n, dtype, seed, **kw):
    qkv, a, b, A_log, dt_bias, state = _gdn_inputs(t, n, dtype, seed)
    st_t, st_r = state.clone(), state.clone()
    out = torch.full((t, NV * VD), float("nan"), dtype=dtype, device=DEV)
    ref = torch.full_like(out, float("nan"))
    ws = gated_delta.gated_delta_chunk_workspace(2048, NV, DEV)
    gated_delta.gated_delta_chunk_triton(qkv, a, b, A_log, dt_bias, st_t, out, _info(ROW, 9, n), NK, KD, VD,
                                         workspace=ws, **kw)
    gated_delta.gated_delta_chunk_reference(qkv, a, b, A_log, dt_bias, st_r, ref, _info(ROW, 9, n), NK, KD, VD)
    others = [r for r in range(B) if r != ROW]
    assert torch.equal(st_t[others], state[others]), "another row's state changed"
    assert torch.isfinite(out[:n]).all() and torch.isfinite(st_t).all()
    return out[:n], ref[:n], st_t, st_r


def _check_bf16_tf32(out, ref, st_t, st_r):
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(st_t, st_r, atol=3e-3, rtol=1e-2)
    assert float((st_t - st_r).norm() / st_r.norm()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,n", CASES)
def test_gated_delta_chunk(dtype, t, n):
    out, ref, st_t, st_r = _gdn_both(t, n, dtype, seed=100 + t + n)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(st_t, st_r, atol=1e-4, rtol=1e-4)
    else:
        _check_bf16_tf32(out, ref, st_t, st_r)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("block_v", [16, 32, 64, 128])
def test_gated_delta_chunk_bf16_precisions_and_splits(precision, block_v):
    out, ref, st_t, st_r = _gdn_both(2048, 1500, torch.bfloat16, seed=7, dot_precision=precision, block_v=block_v)
    if precision == "tf32":
        _check_bf16_tf32(out, ref, st_t, st_r)
    else:
        torch.testing.assert_close(st_t, st_r, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=2e-2)


def test_gated_delta_chunk_matches_transformers_chunked_rule():
    mod = need_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    n = 1000
    qkv, a, b, A_log, dt_bias, state = _gdn_inputs(n, n, torch.float32, seed=11)
    # transformers repeats the key heads up to the value heads before its kernel
    q = qkv[:, :NK * KD].reshape(1, n, NK, KD).repeat_interleave(NV // NK, dim=2)
    k = qkv[:, NK * KD:2 * NK * KD].reshape(1, n, NK, KD).repeat_interleave(NV // NK, dim=2)
    v = qkv[:, 2 * NK * KD:].reshape(1, n, NV, VD)
    g = (-A_log.exp() * torch.nn.functional.softplus(a + dt_bias)).unsqueeze(0)
    o_hf, s_hf = mod.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=b.sigmoid().unsqueeze(0),
                                                  initial_state=state[ROW:ROW + 1].clone(),
                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    st = state.clone()
    out = torch.full((n, NV, VD), float("nan"), device=DEV)
    gated_delta.gated_delta_chunk_triton(qkv, a, b, A_log, dt_bias, st, out, _info(ROW, 0, n), NK, KD, VD)
    torch.testing.assert_close(out, o_hf[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st[ROW], s_hf[0], atol=1e-4, rtol=1e-4)


def test_gated_delta_chunk_in_parts_equals_all_at_once():
    """1000 tokens, then 1048 more (a chunk boundary mid-way): as all 2048 at once (fp32)."""
    qkv, a, b, A_log, dt_bias, state = _gdn_inputs(2048, 2048, torch.float32, seed=12)
    st_a, st_b = state.clone(), state.clone()
    out_a = torch.full((2048, NV * VD), float("nan"), device=DEV)
    out_b = torch.full_like(out_a, float("nan"))
    args = (A_log, dt_bias)
    gated_delta.gated_delta_chunk_triton(qkv, a, b, *args, st_a, out_a, _info(ROW, 0, 2048), NK, KD, VD)
    gated_delta.gated_delta_chunk_triton(qkv[:1024], a[:1024], b[:1024], *args, st_b, out_b[:1024],
                                         _info(ROW, 0, 1000), NK, KD, VD)
    gated_delta.gated_delta_chunk_triton(qkv[1000:], a[1000:], b[1000:], *args, st_b, out_b[1000:],
                                         _info(ROW, 1000, 1048), NK, KD, VD)
    torch.testing.assert_close(out_a, out_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st_a, st_b, atol=1e-4, rtol=1e-4)


def test_prefill_ops_capture_and_replay_with_new_info():
    """conv1d_prefill -> gated_delta_chunk captured once on a 256-token bucket: no allocation in the
    capture; replays with other (row, n_valid) values and inputs equal eager runs bit for bit."""
    dtype, t = torch.bfloat16, 256
    x, conv_state, cw = _conv_inputs(t, t, dtype, seed=20)
    _, a, b, A_log, dt_bias, state = _gdn_inputs(t, t, dtype, seed=21)
    x_in = torch.empty(t, C, dtype=dtype, device=DEV)
    ab = torch.empty(t, 2 * NV, dtype=dtype, device=DEV)
    info = _info(0, 0, t)
    conv_out = torch.empty(t, C, dtype=dtype, device=DEV)
    out = torch.empty(t, NV * VD, dtype=dtype, device=DEV)
    ws = gated_delta.gated_delta_chunk_workspace(t, NV, DEV)

    def step():
        conv.conv1d_prefill_triton(x_in, conv_state, cw, conv_out, info)
        gated_delta.gated_delta_chunk_triton(conv_out, ab[:, :NV], ab[:, NV:], A_log, dt_bias, state, out, info,
                                             NK, KD, VD, workspace=ws)

    def load(seed, row, n):
        g = _gen(seed)
        x_in.copy_(torch.randn(t, C, generator=g, device=DEV).to(dtype))
        ab.copy_(torch.randn(t, 2 * NV, generator=g, device=DEV).to(dtype))
        info.copy_(_info(row, 0, n))

    snap = (conv_state.clone(), state.clone())
    load(1, 0, t)
    step()                         # compiles every kernel before the capture
    torch.cuda.synchronize()
    eager = []
    for seed, row, n in ((2, 1, 100), (3, 3, 256), (4, 1, 17)):
        load(seed, row, n)
        step()
        eager.append((conv_out[:n].clone(), out[:n].clone(), conv_state.clone(), state.clone()))
    conv_state.copy_(snap[0])
    state.copy_(snap[1])
    load(1, 0, t)
    step()
    graph = capture_without_allocation(step, "a prefill op")
    for (seed, row, n), (e_conv, e_out, e_cs, e_st) in zip(((2, 1, 100), (3, 3, 256), (4, 1, 17)), eager):
        load(seed, row, n)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(conv_out[:n], e_conv)
        assert torch.equal(out[:n], e_out)
        assert torch.equal(conv_state, e_cs)
        assert torch.equal(state, e_st)
