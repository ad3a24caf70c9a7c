"""The int4 prefill ops on the GPU at 35b-a3b shapes against their references (dequantize to the
model dtype, then the bf16 op: torch.mm, the grouped experts' reference), a chunk's padding rows,
one CUDA graph of both ops (no allocation, replay bit-identical to eager), and the int4 chunked
prefill at 35b-a3b widths (4 layers) through the prefill graphs against the reference backend.

Tolerances: on the GPU the kernels dequantize exactly as the reference (round to nearest) and round
the outputs where it does, so they differ from it by the fp32 summation order inside a rounding
step: bf16 2e-2 abs/rel (outputs of O(1)) and at least 80 % of the outputs bit-equal (a misplaced
rounding point changes far more); fp32 1e-4. The model-level bounds are tests/gpu/test_prefill_gpu.py's."""
import dataclasses

import pytest
import torch

from tests.gpu._capture import capture_without_allocation
from tests.gpu._int4 import nan_full as _nan, quantized as _q, randn as _randn

from model.config import ModelConfig
from model.decoder import Decoder
from model.ops import moe
from model.ops.linear import int4_gemm
from model.ops.moe import grouped_int4 as gi
from model.prefill import PrefillGraphs
from model.quant.layout import quantize_weights
from model.weights import random_weights

pytestmark = pytest.mark.gpu

DEV = "cuda"
H, E, TOPK, I, IS = 2048, 256, 8, 512, 512
CHUNK = 2048
# 35b-a3b's fused 2-D int4 projections (N, K): in_proj (linear attention), out_proj and o_proj,
# qkv (full attention), router + shared gate/up + shared gate
SHAPES = [(12352, 2048), (2048, 4096), (9216, 2048), (1281, 2048)]


@pytest.fixture(autouse=True)
def _exact_reference_matmuls(monkeypatch):
    """cuBLAS may otherwise reduce bf16 GEMMs in reduced precision: keep the reference's roundings canonical."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _check(got, want, dtype):
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        return
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    same = (got == want).float().mean().item()
    assert same >= 0.8, f"only {same:.1%} of the outputs bit-equal to the reference"


def _gemm_case(t, n, k, dtype, group_size, seed):
    """x = the first t rows of a chunk buffer whose other rows are NaN (the prefill's x[:T] view)."""
    chunk = _nan(CHUNK, k, dtype=dtype)
    chunk[:t] = _randn(t, k, dtype=dtype, seed=seed)
    w = _q(n, k, dtype=dtype, seed=seed + 1, group_size=group_size)
    out_buf, ref = _nan(CHUNK, n, dtype=dtype), _nan(t, n, dtype=dtype)
    int4_gemm.gemm_int4_triton(chunk[:t], w, out_buf[:t])
    int4_gemm.gemm_int4_reference(chunk[:t], w, ref)
    assert torch.isnan(out_buf[t:]).all()          # rows past T never written
    return out_buf[:t], ref


@pytest.mark.parametrize("t", [16, 300, 2048])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemm_int4_group_128(t, n, k):
    got, want = _gemm_case(t, n, k, torch.bfloat16, 128, seed=t + n)
    _check(got, want, torch.bfloat16)


@pytest.mark.parametrize("t", [16, 2048])
@pytest.mark.parametrize("n,k", [(9216, 2048), (2048, 4096)])
def test_gemm_int4_group_32(t, n, k):
    got, want = _gemm_case(t, n, k, torch.bfloat16, 32, seed=t + n + 1)
    _check(got, want, torch.bfloat16)


@pytest.mark.parametrize("t", [16, 300])
def test_gemm_int4_fp32(t):
    got, want = _gemm_case(t, 2048, 4096, torch.float32, 128, seed=t + 2)
    _check(got, want, torch.float32)


_EXPERTS = {}


def _experts(dtype, group_size):
    key = (dtype, group_size)
    if key not in _EXPERTS:
        _EXPERTS.clear()   # one set at a time
        _EXPERTS[key] = (_q(E, 2 * I, H, dtype=dtype, seed=1, group_size=group_size),
                         _q(E, H, I, dtype=dtype, seed=2, group_size=group_size),
                         _q(H, IS, dtype=dtype, seed=3, group_size=group_size))
    return _EXPERTS[key]


def _moe_args(t, dtype, group_size, seed):
    gu, dn, sdn = _experts(dtype, group_size)
    x = _randn(t, H, dtype=dtype, seed=seed)
    logits = _randn(t, E, dtype=torch.float32, seed=seed + 1).to(dtype)
    wts = torch.empty(t, TOPK, dtype=dtype, device=DEV)
    ids = torch.empty(t, TOPK, dtype=torch.int32, device=DEV)
    moe.router_topk_reference(logits, TOPK, wts, ids)
    fused = _randn(t, E + 2 * IS + 1, dtype=dtype, seed=seed + 2)
    return [x, gu, dn, ids, wts, fused[:, E:E + 2 * IS], sdn, fused[:, E + 2 * IS:]]


def _moe_both(args, t, dtype, info):
    ws = moe.moe_grouped_workspace(t, TOPK, E, H, I, IS, dtype, DEV)
    ws.act.fill_(float("nan"))
    ws.y.fill_(float("nan"))
    got, want = _nan(t, H, dtype=dtype), _nan(t, H, dtype=dtype)
    gi.moe_experts_grouped_int4_triton(*args, ws, got, info)
    gi.moe_experts_grouped_int4_reference(*args, ws, want, info)
    return got, want


@pytest.mark.parametrize("t,group_size", [(2048, 128), (2048, 32), (16, 128)])
def test_grouped_int4_experts(t, group_size):
    """35b-a3b experts; the last tenth of the chunk is padding (x NaN): valid rows as the
    reference, padding rows the shared term alone, nothing NaN."""
    dtype = torch.bfloat16
    n = t - t // 10
    args = _moe_args(t, dtype, group_size, seed=10 + t + group_size)
    args[0][n:] = float("nan")
    info = torch.tensor([0, 0, n], dtype=torch.int64, device=DEV)
    got, want = _moe_both(args, t, dtype, info)
    _check(got, want, dtype)


def test_grouped_int4_experts_fp32():
    args = _moe_args(128, torch.float32, 128, seed=5)
    got, want = _moe_both(args, 128, torch.float32, None)
    _check(got, want, torch.float32)


def test_int4_prefill_ops_capture_in_one_graph_without_allocation():
    """The GEMM (in_proj shape) and the grouped experts on a 300-token chunk, captured with
    torch.cuda.graph: nothing allocated during capture, the replay writes exactly what eager wrote."""
    t, dt = 300, torch.bfloat16
    x = _randn(t, H, dtype=dt, seed=40)
    w = _q(12352, H, dtype=dt, seed=41)
    args = _moe_args(t, dt, 128, seed=42)
    info = torch.tensor([0, 0, t], dtype=torch.int64, device=DEV)
    ws = moe.moe_grouped_workspace(t, TOPK, E, H, I, IS, dt, DEV)
    bufs = {"proj": _nan(t, 12352, dtype=dt), "moe": _nan(t, H, dtype=dt)}

    def step():
        int4_gemm.gemm_int4_triton(x, w, bufs["proj"])
        gi.moe_experts_grouped_int4_triton(*args, ws, bufs["moe"], info)

    step()
    torch.cuda.synchronize()
    eager = {k: v.clone() for k, v in bufs.items()}
    graph = capture_without_allocation(step, "an int4 prefill op")
    for v in bufs.values():
        v.fill_(float("nan"))
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    for k, v in bufs.items():
        assert torch.equal(v, eager[k]), k


def _rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _fro(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("precision", ("fp32", "bf16"))
def test_int4_prefill_graphs_match_the_reference_backend_at_35b_widths(precision):
    """35b-a3b widths, 4 layers, every linear and the lm_head int4 (RTN, group 128): a 300-token
    prompt in chunks of 128 (the last padded into the 64 bucket) through the prefill graphs against
    the reference backend on the same int4 weights; bounds of tests/gpu/test_prefill_gpu.py."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    cfg = dataclasses.replace(ModelConfig.preset("35b-a3b"), num_layers=4)
    wq = quantize_weights(random_weights(cfg, DEV, dtype, seed=5), 128, "rtn", lm_head="int4")
    p = torch.randint(0, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(9)).tolist()
    tri = Decoder(cfg, wq, max_batch=1, max_seq=320, backend="triton")
    graphs = PrefillGraphs(tri.prefill_step(128), buckets=(64, 128))
    try:
        graphs.prepare(row=0)
        tri.reset()
        tri.logits.fill_(float("nan"))
        lt = tri.prefill([p], chunk_runner=graphs)[0].clone()
    finally:
        graphs.close()
    ref = Decoder(cfg, wq, max_batch=1, max_seq=320, backend="reference")
    ref.prefill_step(128)
    lr = ref.prefill([p])[0].clone()
    assert torch.isfinite(lt).all()
    pairs = [(lt, lr)] + [(getattr(tri.state, n), getattr(ref.state, n)) for n in ("kv", "conv", "recurrent")]
    for a, b in pairs:
        if precision == "fp32":
            assert _rel(a, b) <= 1e-3
        else:
            assert _fro(a, b) <= 8e-2 and _rel(a, b) <= 1.5e-1
    if precision == "fp32":
        assert int(lt.argmax()) == int(lr.argmax())
    else:
        assert int(lt.argmax()) in lr.float().topk(5).indices.tolist()
