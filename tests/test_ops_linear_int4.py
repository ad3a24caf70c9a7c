"""int4 GEMV and norm+GEMV: Triton kernels vs their references (dequantize, then the bf16 op), the
packing order, edge cases of the group parameters, and the argument checks. Small shapes (CPU
interpreter); tests/gpu/test_ops_int4_gpu.py runs the 35b-a3b shapes."""
import pytest
import torch

from model.ops import linear
from model.ops.linear import int4
from model.quant import QuantizedLinear, pack_int4, quantize

# fp32: accumulation order only. bf16: the output's rounding, and the interpreter truncates the
# dequantized weight to bf16 where the reference (and the GPU) round
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _qw(n, k, group_size, dtype, seed=0, method="rtn"):
    g = torch.Generator().manual_seed(seed)
    return quantize((torch.randn(n, k, generator=g) / k ** 0.5).to(dtype), group_size, method)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("b", [1, 3])
def test_gemv_int4_matches_reference(dtype, group_size, b):
    """K = 3 groups (K not a power of two: a masked tail), N odd; once with the default launch (bf16
    at B = 3: the tensor-core kernel; else the CUDA-core one, one K tile), once with the CUDA-core
    kernel at one group per K tile (the loop over K, scales advancing per tile) and once with the
    whole-row kernel on 2 programs (5 blocks of 4 rows: several per program, a partial last one)."""
    n, k = 19, 3 * group_size
    w = _qw(n, k, group_size, dtype, seed=group_size + b)
    x = torch.randn(b, k, generator=torch.Generator().manual_seed(b)).to(dtype)
    ref = _nan(b, n, dtype=dtype)
    int4.gemv_int4_reference(x, w, ref)
    # the reference is exactly gemv_reference on the dequantized weight
    ref2 = _nan(b, n, dtype=dtype)
    linear.gemv_reference(x, w.dequantize(dtype), ref2)
    assert torch.equal(ref, ref2)
    atol, rtol = TOL[dtype]
    for launch in (None, int4.GemvInt4Launch(int4.next_pow2(b), 4, group_size, 4, 3),
                   int4.GemvInt4Launch(int4.next_pow2(b), 4, int4.next_pow2(k), 4, 3, programs=2)):
        out = _nan(b, n, dtype=dtype)
        int4.gemv_int4_triton(x, w, out, launch=launch)
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def test_gemv_int4_nibble_order_and_groups():
    """Hand-packed codes: column c of row r holds (r + c) % 16, each group its own scale and zero;
    a one-hot x picks one column, so every output is one dequantized weight, exactly."""
    n, k, G = 5, 64, 32
    codes = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 16
    scales = torch.tensor([[0.5, 2.0]]).repeat(n, 1) * (1 + torch.arange(n)[:, None])
    zeros = torch.tensor([[3.0, -1.0]]).repeat(n, 1)
    w = QuantizedLinear(pack_int4(codes), scales, zeros, G, (n, k))
    x = torch.eye(k)[[0, 1, 7, 8, 33, 63]]
    cols = torch.tensor([0, 1, 7, 8, 33, 63])
    want = ((codes[:, cols].float() - zeros[:, cols // G]) * scales[:, cols // G]).T
    for launch in (int4.GemvInt4Launch(8, 2, 32, 4, 3), int4.GemvInt4Launch(8, 2, 64, 4, 3, programs=2)):
        out = _nan(6, n, dtype=torch.float32)
        int4.gemv_int4_triton(x, w, out, launch=launch)
        assert torch.equal(out, want), launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_int4_constant_groups_and_zero_rows(dtype):
    """RTN stores a constant group exactly and an all-zero row as zeros: the kernel gives exact
    products there (zero rows exactly 0, never NaN from a zero scale)."""
    n, k, G = 6, 128, 32
    wf = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    wf[0] = 0.0                                   # all-zero row
    wf[1] = -0.75                                 # constant negative row
    wf[2, :G] = 1.5                               # one constant group
    wf[3, G:2 * G] = 0.0                          # one zero group
    w = quantize(wf.to(dtype), G, "rtn")
    deq = w.dequantize(dtype)
    assert torch.equal(deq[0], torch.zeros(k, dtype=dtype)) and torch.equal(deq[1], wf[1].to(dtype))
    x = torch.randint(-3, 4, (3, k), generator=torch.Generator().manual_seed(4)).to(dtype)
    out, ref = _nan(3, n, dtype=dtype), _nan(3, n, dtype=dtype)
    int4.gemv_int4_triton(x, w, out)
    int4.gemv_int4_reference(x, w, ref)
    assert torch.equal(out[:, 0], torch.zeros(3, dtype=dtype))
    assert torch.equal(out[:, 1], (x.float().sum(1) * -0.75).to(dtype))   # small integers: exact
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_gemv_int4_strided_rows():
    """x and out as column slices of wider buffers (fused projection outputs)."""
    w = _qw(17, 64, 32, torch.float32)
    big_x = torch.randn(2, 90, generator=torch.Generator().manual_seed(5))
    big_out = _nan(2, 50, dtype=torch.float32)
    int4.gemv_int4_triton(big_x[:, 10:74], w, big_out[:, 3:20])
    torch.testing.assert_close(big_out[:, 3:20], big_x[:, 10:74] @ w.dequantize(torch.float32).T,
                               atol=1e-5, rtol=1e-5)
    assert torch.isnan(big_out[:, :3]).all() and torch.isnan(big_out[:, 20:]).all()


def test_gemv_int4_refusals_are_named():
    w = _qw(8, 64, 32, torch.float32)
    x, out = torch.zeros(2, 64), torch.zeros(2, 8)
    with pytest.raises(ValueError, match="K=96 .* not a multiple of group_size=64"):
        quantize(torch.zeros(8, 96), 64, "rtn")
    with pytest.raises(ValueError, match="K=96 .* not a multiple of group_size=64"):
        QuantizedLinear(torch.zeros(8, 12, dtype=torch.int32), torch.ones(8, 1), torch.zeros(8, 1), 64, (8, 96))
    bad = QuantizedLinear(torch.zeros(8, 12, dtype=torch.int32), torch.ones(8, 3), torch.zeros(8, 3), 32, (8, 96))
    bad.group_size = 64          # mutated after its checks: the kernels check again
    for fn in (int4.gemv_int4_triton, int4.gemv_int4_reference):
        with pytest.raises(ValueError, match="K=96 is not a multiple of group_size=64"):
            fn(torch.zeros(2, 96), bad, out)
        with pytest.raises(TypeError, match="w must be a QuantizedLinear, got Tensor"):
            fn(x, torch.zeros(8, 64), out)
        with pytest.raises(ValueError, match="x must have shape"):
            fn(torch.zeros(2, 32), w, out)
        with pytest.raises(ValueError, match="out must have shape"):
            fn(x, w, torch.zeros(2, 9))
        with pytest.raises(TypeError, match="x must be one of .* got torch.int32"):
            fn(x.int(), w, out)
    with pytest.raises(ValueError, match="batches up to 16, got B=17"):
        int4.gemv_int4_triton(torch.zeros(17, 64), w, torch.zeros(17, 8))
    with pytest.raises(ValueError, match="block_k=16 must be a power of two holding whole groups of 32"):
        int4.gemv_int4_triton(x, w, out, launch=int4.GemvInt4Launch(2, 2, 16, 4, 3))
    with pytest.raises(ValueError, match=r"launch.programs=2 must be 0, or > 0 with whole rows \(block_k=32 >= K=64\)"):
        int4.gemv_int4_triton(x, w, out, launch=int4.GemvInt4Launch(2, 2, 32, 4, 3, programs=2))


def test_gemv_int4_config_holds_whole_groups():
    from model.ops.hardware import DeviceProfile
    h200 = DeviceProfile.preset("h200")
    for b in range(1, 17):
        for g in (32, 64, 128):
            for n, k in ((2048, 2048), (8192, 2048), (2048, 4096), (248320, 2048), (32, 32 * 3)):
                for norm in (False, True):
                    c = int4.gemv_int4_config(b, n, k, g, norm=norm, profile=h200)
                    assert c.block_k % g == 0 and c.block_k & (c.block_k - 1) == 0
                    assert c.block_b >= b and c.block_b * c.block_n * c.block_k <= int4._INT4_WEIGHTS_PER_PROGRAM


def test_gemv_int4_rows_config():
    """rows=True (the MODEL_INT4_ROWS setting): batch 1 and K <= 4096 get the whole-row kernel on 4
    programs per SM, blocks of 8192 weights; larger batches or K keep the per-block kernel."""
    from model.ops.hardware import DeviceProfile
    h200 = DeviceProfile.preset("h200")
    c = int4.gemv_int4_config(1, 12352, 2048, 128, norm=True, profile=h200, rows=True)
    assert (c.programs, c.block_n, c.block_k) == (4 * h200.sm_count, 4, 2048)
    assert int4.gemv_int4_config(1, 2048, 4096, 128, profile=h200, rows=True).block_n == 2
    for b, k in ((2, 2048), (1, 8192)):
        assert int4.gemv_int4_config(b, 2048, k, 128, profile=h200, rows=True).programs == 0
    assert int4.gemv_int4_config(1, 2048, 2048, 128, profile=h200, rows=False).programs == 0


# ----------------------------------------------------------------------------- norm + GEMV
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,group_size,one_tile", [(1, 32, True), (3, 64, False), (3, 128, True)])
@pytest.mark.parametrize("add", [True, False])
def test_norm_gemv_int4_matches_reference(dtype, b, group_size, one_tile, add):
    """The fused prologue + int4 GEMV equals norm_gemv_reference on the dequantized weight (which
    is norm_gemv_int4_reference); residual_out and normed_out come out; the inputs are untouched.
    one_tile False: the CUDA-core kernel with K over two tiles (the rms a loop of its own); bf16 at
    B = 3 with the default launch: the norm kernel, then the tensor-core kernel. "rows": the
    whole-row kernel on 2 programs of 4 blocks (the prologue once per program, program 0 storing)."""
    n, k = 13, 2 * group_size
    g = torch.Generator().manual_seed(b + group_size)
    x = torch.randn(b, k, generator=g).to(dtype) if add else None
    residual = (torch.randn(b, k, generator=g) * 3).to(dtype)
    nw = (torch.randn(k, generator=g) * 0.2).to(dtype)
    w = _qw(n, k, group_size, dtype, seed=7)
    res_before = residual.clone()
    launch = None if one_tile else int4.GemvInt4Launch(int4.next_pow2(b), 4, group_size, 4, 3)
    outs = {}
    rows = int4.GemvInt4Launch(int4.next_pow2(b), 4, k, 4, 3, programs=2)
    for name, fn, kw in (("triton", int4.norm_gemv_int4_triton, {"launch": launch}),
                         ("rows", int4.norm_gemv_int4_triton, {"launch": rows}),
                         ("int4_ref", int4.norm_gemv_int4_reference, {}),
                         ("bf16_ref", linear.norm_gemv_reference, {})):
        o, n_out = _nan(b, n, dtype=dtype), _nan(b, k, dtype=dtype)
        r_out = _nan(b, k, dtype=dtype) if add else None
        wt = w.dequantize(dtype) if name == "bf16_ref" else w
        fn(x, residual, nw, 1e-6, wt, o, residual_out=r_out, normed_out=n_out, **kw)
        outs[name] = (o, r_out, n_out)
        assert torch.equal(residual, res_before), f"{name} changed residual"
    for a, c in zip(outs["int4_ref"], outs["bf16_ref"]):
        assert (a is None and c is None) or torch.equal(a, c)
    atol, rtol = TOL[dtype]
    for kernel in ("triton", "rows"):
        for a, c in zip(outs[kernel], outs["int4_ref"]):
            if a is not None:
                torch.testing.assert_close(a.float(), c.float(), atol=atol, rtol=rtol)


def test_norm_gemv_int4_bad_arguments_are_named():
    w = _qw(8, 64, 32, torch.float32)
    x, residual, nw, out = torch.zeros(2, 64), torch.ones(2, 64), torch.zeros(64), torch.zeros(2, 8)
    for fn in (int4.norm_gemv_int4_triton, int4.norm_gemv_int4_reference):
        with pytest.raises(ValueError, match="residual_out overlaps residual"):
            fn(x, residual, nw, 1e-6, w, out, residual_out=residual)
        with pytest.raises(ValueError, match=r"norm_weight must have shape \(64,\), got \(8,\)"):
            fn(x, residual, nw[:8], 1e-6, w, out)
        with pytest.raises(ValueError, match="out must have shape"):
            fn(x, residual, nw, 1e-6, w, torch.zeros(2, 9))
        with pytest.raises(TypeError, match="residual must be one of .* got torch.int64"):
            fn(None, residual.long(), nw, 1e-6, w, out)
        with pytest.raises(TypeError, match="w must be a QuantizedLinear"):
            fn(x, residual, nw, 1e-6, torch.zeros(8, 64), out)


@pytest.mark.parametrize("b", [1, 3])
def test_gemv_int4_rounds_the_weight_to_the_model_dtype(b):
    """fp16 rows (the interpreter rounds fp16 as the GPU does), fp32 out, one-hot x: each output is
    one dequantized weight, which must be the fp16-rounded (q - z) * s, not the fp32 value.
    B = 1: the CUDA-core kernel; B = 3: the tensor-core one."""
    n, k = 9, 64
    w = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(9)).half(), 32, "hqq")
    cols = torch.tensor([5, 40, 63])[:b]
    x = torch.eye(k, dtype=torch.float16)[cols]
    exact = w.dequantize(torch.float32)[:, cols].T
    for launch in (None, int4.GemvInt4Launch(int4.next_pow2(b), 4, k, 4, 3, programs=1)):
        out = _nan(b, n, dtype=torch.float32)
        int4.gemv_int4_triton(x, w, out, launch=launch)
        assert torch.equal(out, w.dequantize(torch.float16)[:, cols].T.float()), launch
    assert not torch.equal(out, exact)   # the rounding is visible at these points


def test_int4_launches_at_35b_shapes_are_valid():
    """tools/int4_compile's launches of every int4 kernel (H200 profile, 35b-a3b, B 1 and 8),
    recorded on meta tensors, break none of launch_audit's rules (the offline compile itself
    needs Triton without the interpreter: python -m tools.int4_compile)."""
    from model.ops import _util
    from model.ops.hardware import DeviceProfile
    from tools import int4_compile, launch_audit

    h200 = DeviceProfile.preset("h200")
    log = int4_compile.record(h200, "35b-a3b", (1, 8), 128)
    kernels = {L.kernel for L in log}
    assert {"_gemv_int4_kernel", "_gemv_int4_rows_kernel", "_gemv_int4_dot_kernel", "_moe_gate_up_int4_kernel",
            "_moe_down_int4_kernel", "_moe_gate_up_int4_rows_kernel", "_moe_down_int4_rows_kernel",
            "_moe_gate_up_int4_tc_kernel", "_moe_down_int4_tc_kernel"} <= kernels
    for L in log:
        assert not launch_audit.problems(L, h200, pdl_enabled=_util.HAVE_GDC), L
        for k in ("BLOCK_K", "BLOCK_H"):
            down = L.kernel.startswith("_moe_down_int4")   # whose BLOCK_K counts slots
            if k in L.constexprs and "GROUP" in L.constexprs and not down:
                assert L.constexprs[k] % L.constexprs["GROUP"] == 0
