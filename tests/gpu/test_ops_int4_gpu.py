"""The int4 decode kernels on the GPU at 35b-a3b shapes against their references (dequantize to the
model dtype, then the bf16 op), and captured in one CUDA graph (no allocation) replayed
bit-identically to eager.

Tolerances as tests/gpu/test_ops_gpu.py: on the GPU the kernel rounds the dequantized weight as the
reference does (round to nearest), so kernel and reference differ by fp32 accumulation order
inside a rounding step: a few bf16 ulps, checked as 2e-2 abs/rel (outputs of O(1) magnitude);
fp32 1e-4."""
import pytest
import torch

from tests.gpu._capture import capture_without_allocation
from tests.gpu._int4 import nan_full as _nan, quantized as _q, randn as _randn

from model.ops import moe
from model.ops.linear import int4
from model.ops.moe import int4 as moe4

pytestmark = pytest.mark.gpu

DEV = "cuda"
H, V_SIZE = 2048, 248320
E, TOPK, I, IS = 256, 8, 512, 512


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


# 35b-a3b's 2-D int4 linears (N, K): in_proj (linear attention), out_proj, qkv (full attention),
# o_proj, router + shared gate/up, shared_down; lm_head is its own test
SHAPES = [(12352, 2048), (2048, 4096), (9216, 2048), (2048, 4096), (1281, 2048), (2048, 512)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", sorted(set(SHAPES)))
def test_gemv_int4(dtype, b, n, k):
    x = _randn(b, k, dtype=dtype, seed=1)
    w = _q(n, k, dtype=dtype, seed=2)
    out, ref = _nan(b, n, dtype=dtype), _nan(b, n, dtype=dtype)
    int4.gemv_int4_triton(x, w, out)
    int4.gemv_int4_reference(x, w, ref)
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.parametrize("group_size", [32, 64])
def test_gemv_int4_small_groups(group_size):
    x = _randn(4, H, dtype=torch.bfloat16, seed=1)
    w = _q(9216, H, dtype=torch.bfloat16, seed=2, group_size=group_size, method="hqq")
    out, ref = _nan(4, 9216, dtype=torch.bfloat16), _nan(4, 9216, dtype=torch.bfloat16)
    int4.gemv_int4_triton(x, w, out)
    int4.gemv_int4_reference(x, w, ref)
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


@pytest.mark.parametrize("b", [1, 8])
def test_gemv_int4_lm_head(b):
    x = _randn(b, H, dtype=torch.bfloat16, seed=3)
    w = _q(V_SIZE, H, dtype=torch.bfloat16, seed=4)
    out, ref = _nan(b, V_SIZE, dtype=torch.bfloat16), _nan(b, V_SIZE, dtype=torch.bfloat16)
    int4.gemv_int4_triton(x, w, out)
    int4.gemv_int4_reference(x, w, ref)
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,n", [(1, 12352), (1, 1281), (3, 9216), (16, 2048)])
def test_norm_gemv_int4(dtype, b, n):
    """Fused add + RMSNorm prologue: the new residual exact (one rounded add), normed rows and the
    output as the reference."""
    x = _randn(b, H, dtype=dtype, seed=5)
    res = _randn(b, H, dtype=dtype, scale=3.0, seed=6)
    nw = _randn(H, dtype=dtype, scale=0.2, seed=7)
    w = _q(n, H, dtype=dtype, seed=8)
    got, want = [], []
    for fn, keep in ((int4.norm_gemv_int4_triton, got), (int4.norm_gemv_int4_reference, want)):
        o, r_out, n_out = _nan(b, n, dtype=dtype), _nan(b, H, dtype=dtype), _nan(b, H, dtype=dtype)
        fn(x, res, nw, 1e-6, w, o, residual_out=r_out, normed_out=n_out)
        keep += [o, r_out, n_out]
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], **_tol(dtype))
    torch.testing.assert_close(got[0], want[0], **_tol(dtype))


def _moe_args(b, dtype, group_size=128):
    x = _randn(b, H, dtype=dtype, seed=22)
    gu = _q(E, 2 * I, H, dtype=dtype, seed=23, group_size=group_size)
    dn = _q(E, H, I, dtype=dtype, seed=24, group_size=group_size)
    g = torch.Generator().manual_seed(25)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(b)]).to(DEV, torch.int32)
    w = torch.softmax(_randn(b, TOPK, dtype=torch.float32, seed=26), -1).to(dtype)
    rs = _randn(b, 2 * IS + 1, dtype=dtype, seed=27)
    sdn = _q(H, IS, dtype=dtype, seed=28, group_size=group_size)
    return x, gu, dn, ids, w, rs[:, :2 * IS], sdn, rs[:, 2 * IS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,group_size", [(1, 128), (8, 128), (3, 32)])
def test_moe_int4(dtype, b, group_size):
    args = _moe_args(b, dtype, group_size)
    outs = []
    for fn in (moe4.moe_experts_int4_triton, moe4.moe_experts_int4_reference):
        ws = moe.moe_workspace(b, TOPK, I, dtype, DEV).fill_(float("nan"))
        out = _nan(b, H, dtype=dtype)
        fn(*args, ws, out)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [128, 32])
def test_moe_int4_whole_rows(dtype, group_size):
    """The batch-1 whole-row expert kernels (MODEL_INT4_MOE_ROWS) against the reference, and their
    graph replay bit-identical to eager (nothing allocated during capture)."""
    args = _moe_args(1, dtype, group_size)
    cfg = moe4.moe_int4_launch_config(1, H, I, TOPK, IS, group_size, rows=True)
    assert cfg.gate_up_programs > 0 and cfg.down_programs > 0
    ws = moe.moe_workspace(1, TOPK, I, dtype, DEV).fill_(float("nan"))
    out, ref = _nan(1, H, dtype=dtype), _nan(1, H, dtype=dtype)
    moe4.moe_experts_int4_reference(*args, moe.moe_workspace(1, TOPK, I, dtype, DEV), ref)

    def step():
        moe4.moe_experts_int4_triton(*args, ws, out, launch=cfg)

    step()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, **_tol(dtype))
    eager = out.clone()
    graph = capture_without_allocation(step, "the whole-row int4 experts")
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_int4_kernels_capture_in_one_graph_without_allocation():
    """norm+GEMV, GEMV and the experts (b = 8, bf16) captured with torch.cuda.graph: nothing is
    allocated during capture and the replay writes exactly what eager wrote."""
    b, dt = 8, torch.bfloat16
    x, res, nw = _randn(b, H, dtype=dt, seed=30), _randn(b, H, dtype=dt, seed=31), _randn(H, dtype=dt, seed=32)
    w_in, w_out = _q(12352, H, dtype=dt, seed=33), _q(H, 4096, dtype=dt, seed=34)
    margs = _moe_args(b, dt)
    bufs = {"proj": _nan(b, 12352, dtype=dt), "r_out": _nan(b, H, dtype=dt), "n_out": _nan(b, H, dtype=dt),
            "o": _nan(b, H, dtype=dt), "moe": _nan(b, H, dtype=dt)}
    ws = moe.moe_workspace(b, TOPK, I, dt, DEV)
    x2 = _randn(b, 4096, dtype=dt, seed=35)

    def step():
        int4.norm_gemv_int4_triton(x, res, nw, 1e-6, w_in, bufs["proj"], residual_out=bufs["r_out"],
                                   normed_out=bufs["n_out"])
        int4.gemv_int4_triton(x2, w_out, bufs["o"])
        moe4.moe_experts_int4_triton(bufs["n_out"], *margs[1:], ws, bufs["moe"])

    step()
    torch.cuda.synchronize()
    eager = {k: v.clone() for k, v in bufs.items()}
    graph = capture_without_allocation(step, "an int4 op")
    for v in bufs.values():
        v.fill_(float("nan"))
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    for k, v in bufs.items():
        assert torch.equal(v, eager[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantization_on_the_gpu_is_the_reference_bit_for_bit(dtype):
    """The PTX path of _dequant_words (one lop3; cvt.rn.bf16x2.f32 rounding, which Triton's CPU
    interpreter cannot run): every weight equals QuantizedLinear.dequantize(dtype), zeros 0 and
    2^-13 <= |z| <= 16 (tests/test_ops_int4_dequant.py has the CPU side)."""
    from tests.test_ops_int4_dequant import dequant_by_kernel, random_int4

    n, k, gs = 32, 1024, 128
    g = torch.Generator().manual_seed(7)
    mag = torch.exp(torch.empty(n * k // gs).uniform_(-13 * 0.6931, 4 * 0.6931, generator=g))
    zeros = mag * torch.where(torch.rand(mag.shape, generator=g) < 0.5, -1.0, 1.0)
    zeros[::5] = 0.0
    w = random_int4(n, k, gs, zeros).to(DEV)
    got, ref = dequant_by_kernel(w, dtype), w.dequantize(dtype)
    assert not got.isnan().any()
    assert torch.equal(got, ref), f"{(got != ref).sum().item()} of {got.numel()} weights differ"

