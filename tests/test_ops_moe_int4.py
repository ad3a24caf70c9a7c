"""int4 MoE decode experts: the Triton kernels vs their reference (dequantize the experts, then
moe_experts_reference), zero experts, group sizes 32/64/128, and the argument checks. Small shapes
(CPU interpreter); tests/gpu/test_ops_int4_gpu.py runs the 35b-a3b shapes."""
import dataclasses

import pytest
import torch

from model.ops import moe
from model.ops.moe import int4 as moe4
from model.quant import QuantizedLinear, quantize

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _inputs(seed, b, h, e, i, i_s, k, group_size, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, generator=g).to(dtype)
    gu = quantize((torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype), group_size, "rtn")
    dn = quantize((torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype), group_size, "rtn")
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b)]).to(torch.int32)
    w = torch.softmax(torch.randn(b, k, generator=g), -1).to(dtype)
    fused = torch.randn(b, 2 * i_s + 3, generator=g).to(dtype)     # shared g/u | gate logit, a strided slice
    sgu, sgl = fused[:, :2 * i_s], fused[:, 2 * i_s:2 * i_s + 1]
    sdn = quantize((torch.randn(h, i_s, generator=g) / i_s ** 0.5).to(dtype), group_size, "rtn")
    return x, gu, dn, ids, w, sgu, sdn, sgl


def _run(fn, args, b, h, k, i, dtype, **kw):
    ws = moe.moe_workspace(b, k, i, dtype, "cpu").fill_(float("nan"))
    out = torch.full((b, h), float("nan"), dtype=dtype)
    fn(*args[:7], args[7], ws, out, **kw)
    return out, ws[:b * k * i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,e,i,i_s,k,group_size", [(1, 64, 6, 96, 64, 2, 32), (2, 128, 4, 64, 64, 2, 64),
                                                      (3, 128, 4, 128, 128, 2, 128)])
def test_moe_experts_int4_matches_reference(dtype, b, h, e, i, i_s, k, group_size):
    """The reference is moe_experts_reference on the dequantized experts, exactly; the kernels
    match it (and their act workspace matches the reference's)."""
    args = _inputs(h + e + i + b, b, h, e, i, i_s, k, group_size, dtype)
    x, gu, dn, ids, w, sgu, sdn, sgl = args
    ref, ref_ws = _run(moe4.moe_experts_int4_reference, args, b, h, k, i, dtype)
    deq = (x, gu.dequantize(dtype), dn.dequantize(dtype), ids, w, sgu, sdn.dequantize(dtype), sgl)
    ref2, _ = _run(moe.moe_experts_reference, deq, b, h, k, i, dtype)
    assert torch.equal(ref, ref2)
    launches = [None]
    if h > group_size and dtype == torch.float32:   # one group per K tile: the gate/up loop over H advances the scales
        launches.append(moe.MoeLaunch(4, group_size, 4, 3, 4, group_size, 4, 3))
    for launch in launches:
        out, _ = _run(moe4.moe_experts_int4_triton, args, b, h, k, i, dtype, launch=launch)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def _nan_after(w: QuantizedLinear) -> QuantizedLinear:
    """w with its scales and zeros the front of NaN-filled buffers: a read past a tensor's end
    gives NaN (in the interpreter it gave whatever memory followed, so the bug below was flaky)."""
    def tail(t):
        buf = torch.full((t.numel() + 64,), float("nan"), dtype=t.dtype)
        buf[:t.numel()] = t.reshape(-1)
        return buf[:t.numel()].view(t.shape)
    return QuantizedLinear(w.qweight, tail(w.scales), tail(w.zeros), w.group_size, w.shape, w.name)


@pytest.mark.parametrize("i,i_s", [(96, 64), (64, 96)])
def test_moe_int4_down_reads_no_scale_past_the_shorter_of_routed_and_shared(i, i_s):
    """The CUDA-core down kernel loops over the longer of I and IS words in one-group tiles;
    past the shorter one's end it read a scale and zero beyond its last row's groups (NaN x 0 in
    the output when that memory held NaN). With NaN after both tensors, the output matches."""
    b, h, e, k, G = 1, 64, 6, 2, 32
    x, gu, dn, ids, w, sgu, sdn, sgl = _inputs(7, b, h, e, i, i_s, k, G, torch.float32)
    args = (x, gu, _nan_after(dn), ids, w, sgu, _nan_after(sdn), sgl)
    ref, _ = _run(moe4.moe_experts_int4_reference, args, b, h, k, i, torch.float32)
    cfg = dataclasses.replace(moe4.moe_int4_launch_config(b, h, i, k, i_s, G, tc=False), down_block_i=G)
    # down_block_i = G: one-group tiles, where a row's scale and zero are read once per tile
    out, _ = _run(moe4.moe_experts_int4_triton, args, b, h, k, i, torch.float32, launch=cfg)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_moe_int4_act_workspace_matches_the_bf16_kernel_on_dequantized_experts():
    """Kernel 1 alone: the int4 gate/up kernel writes the same act rows as the bf16 one given the
    dequantized experts (fp32: same products, same sums up to order)."""
    b, h, e, i, i_s, k, G = 2, 64, 5, 32, 32, 3, 32
    x, gu, dn, ids, w, sgu, sdn, sgl = _inputs(11, b, h, e, i, i_s, k, G, torch.float32)
    cfg = moe4.moe_int4_launch_config(b, h, i, k, i_s, G, tc=False)   # fp32: the CUDA-core kernel
    ws4 = torch.full((b * k * i,), float("nan"))
    ws = ws4.clone()
    moe4.launch_moe_gate_up_int4(x, gu, ids, ws4, cfg)
    moe.launch_moe_gate_up(x, gu.dequantize(torch.float32), ids, ws, cfg)
    torch.testing.assert_close(ws4, ws, atol=1e-6, rtol=1e-5)


def test_moe_int4_zero_experts_and_zero_shared():
    """All-zero experts and shared expert quantize exactly (zero scale never reached as NaN):
    the output is exactly zero."""
    b, h, e, i, i_s, k, G = 2, 64, 4, 32, 32, 2, 32
    x, gu, dn, ids, w, sgu, sdn, sgl = _inputs(3, b, h, e, i, i_s, k, G, torch.bfloat16)
    z = {n: quantize(torch.zeros(s, dtype=torch.bfloat16), G, "rtn") for n, s in
         (("gu", (e, 2 * i, h)), ("dn", (e, h, i)), ("sd", (h, i_s)))}
    args = (x, z["gu"], z["dn"], ids, w, sgu, z["sd"], sgl)
    out, ws = _run(moe4.moe_experts_int4_triton, args, b, h, k, i, torch.bfloat16)
    assert torch.equal(out, torch.zeros(b, h, dtype=torch.bfloat16)) and torch.equal(ws, torch.zeros_like(ws))


def test_moe_int4_refusals_are_named():
    b, h, e, i, i_s, k, G = 1, 64, 4, 32, 32, 2, 32
    x, gu, dn, ids, w, sgu, sdn, sgl = _inputs(5, b, h, e, i, i_s, k, G, torch.float32)
    ws, out = moe.moe_workspace(b, k, i, torch.float32, "cpu"), torch.empty(b, h)
    with pytest.raises(ValueError, match=r"K=48 \(shape \[64, 48\]\) is not a multiple of group_size=32"):
        quantize(torch.zeros(h, 48), G, "rtn")
    for fn in (moe4.moe_experts_int4_triton, moe4.moe_experts_int4_reference):
        with pytest.raises(TypeError, match="down_proj must be a QuantizedLinear, got Tensor"):
            fn(x, gu, dn.dequantize(), ids, w, sgu, sdn, sgl, ws, out)
        with pytest.raises(ValueError, match="shared_down must be a 2-D int4 weight"):
            fn(x, gu, dn, ids, w, sgu, dn, sgl, ws, out)
        with pytest.raises(ValueError, match=r"down_proj must have shape \(4, 64, 32\), got \(4, 64, 64\)"):   # decode.py's
            fn(x, gu, sdn_as(dn, (e, h, 64)), ids, w, sgu, sdn, sgl, ws, out)
        with pytest.raises(TypeError, match="x must be a tensor of one of"):
            fn(x.int(), gu, dn, ids, w, sgu, sdn, sgl, ws, out)
    sd64 = quantize(torch.zeros(h, 64), 64, "rtn")
    big_ws = moe.moe_workspace(b, k, i, torch.float32, "cpu")
    with pytest.raises(ValueError, match="share one group size, got 32, 32, 64"):
        moe4.moe_experts_int4_triton(x, gu, dn, ids, w, torch.zeros(b, 128), sd64, sgl, big_ws, out)
    with pytest.raises(ValueError, match="down_block_i=16 must be a power of two holding whole groups of 32"):
        moe4.moe_experts_int4_triton(x, gu, dn, ids, w, sgu, sdn, sgl, ws, out,
                                     launch=moe.MoeLaunch(4, 64, 4, 3, 4, 16, 4, 3))


def sdn_as(q: QuantizedLinear, shape) -> QuantizedLinear:
    """A zero int4 weight of another shape and q's group size."""
    return quantize(torch.zeros(shape), q.group_size, "rtn")


def test_moe_int4_launch_config_holds_whole_groups():
    from model.ops.hardware import DeviceProfile
    h200 = DeviceProfile.preset("h200")
    for b in (1, 3, 8, 16):
        for G in (32, 64, 128):
            for h, i, k, i_s in ((2048, 512, 8, 512), (3072, 1024, 8, 1024), (64, 32, 2, 32)):
                if h % G or i % G or i_s % G:
                    continue
                c = moe4.moe_int4_launch_config(b, h, i, k, i_s, G, h200)
                for v in (c.gate_up_block_h, c.down_block_i):
                    assert v % G == 0 and v & (v - 1) == 0
                # the tensor-core kernels: dots of K >= 16 words, 16-row MMA blocks; gate/up up to
                # TC_MAX_BATCH rows, down from DOWN_TC_MIN_BATCH rows
                assert c.gate_up_tc == (b <= moe4.TC_MAX_BATCH)
                assert c.down_tc == (moe4.DOWN_TC_MIN_BATCH <= b <= moe4.TC_MAX_BATCH)
                if c.gate_up_tc:
                    assert c.gate_up_block_h >= 128 and c.gate_up_block_i == 16
                else:
                    assert c.gate_up_block_i * c.gate_up_block_h <= 16384   # accumulators: one fp32 per word
                if c.down_tc:
                    assert c.down_block_i >= 128 and c.down_block_ho == 16
                else:
                    assert c.down_block_ho * 8 * c.down_block_i <= 8192


def _no_cuda_core_kernels(monkeypatch):
    """Batch 1 in bf16/fp16 must take the tensor-core kernels, not fall back to today's."""
    monkeypatch.setattr(moe4, "_moe_gate_up_int4_kernel", None)
    monkeypatch.setattr(moe4, "_moe_down_int4_kernel", None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,e,i,i_s,k,group_size,launch", [
    (640, 9, 96, 128, 8, 32, None),          # H: a masked tail K tile (512 + 128); I, Is < the 128-column tile
    (384, 11, 384, 256, 8, 64, None),        # H < the 512-column tile; I: a masked tail down tile (256 + 128)
    (256, 6, 256, 384, 4, 128, None),        # 4 slots of 8; Is > I
    (256, 9, 96, 128, 8, 32, moe4.MoeInt4Launch(64, 128, 2, 3, 16, 128, 4, 3, True, True)),   # several programs
])
def test_moe_int4_tc_matches_reference(monkeypatch, dtype, h, e, i, i_s, k, group_size, launch):
    """B = 1, bf16/fp16: the tensor-core kernels (outputs poisoned with NaN first) against the
    reference on the dequantized experts, one slot's id -1 (another rank's expert: its act is 0);
    fp16, which the interpreter rounds as the GPU does, within the fp32 summation order; bf16 (whose
    roundings the interpreter truncates, 8 of them in the ascending sum) against today's kernels."""
    x, gu, dn, ids, w, sgu, sdn, sgl = _inputs(h + i + group_size, 1, h, e, i, i_s, k, group_size, dtype)
    ids[0, 1] = -1
    args = (x, gu, dn, ids, w, sgu, sdn, sgl)
    launch = launch or moe4.moe_int4_launch_config(1, h, i, k, i_s, group_size, tc=True)
    ref, _ = _run(moe4.moe_experts_int4_reference, args, 1, h, k, i, dtype)
    if dtype == torch.bfloat16:
        old = moe4.moe_int4_launch_config(1, h, i, k, i_s, group_size, tc=False)
        ref, _ = _run(moe4.moe_experts_int4_triton, args, 1, h, k, i, dtype, launch=old)
    _no_cuda_core_kernels(monkeypatch)
    out, ws = _run(moe4.moe_experts_int4_triton, args, 1, h, k, i, dtype, launch=launch)
    tol = TOL[torch.bfloat16] if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    # the act rows: silu(gate) * up with the reference's roundings; the foreign slot's is 0
    deq = gu.dequantize(dtype)
    for j in range(k):
        row = ws[j * i:(j + 1) * i]
        if ids[0, j] < 0:
            assert torch.equal(row, torch.zeros_like(row))
            continue
        g, u = torch.nn.functional.linear(x, deq[int(ids[0, j])]).chunk(2, dim=-1)
        torch.testing.assert_close(row.float(), (torch.nn.functional.silu(g) * u)[0].float(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_int4_batch1_default_is_tc_gate_up_and_cuda_core_down(monkeypatch, dtype):
    """B = 1, bf16/fp16, default launch: gate/up on the tensor cores, down on the CUDA cores (the
    faster pair on an H200), each the other path's kernel removed; equals the CUDA-core pair."""
    b, h, e, i, i_s, k, G = 1, 256, 9, 128, 128, 8, 32
    args = _inputs(43, b, h, e, i, i_s, k, G, dtype)
    c = moe4.moe_int4_launch_config(b, h, i, k, i_s, G)
    assert c.gate_up_tc and not c.down_tc
    ref, ref_ws = _run(moe4.moe_experts_int4_triton, args, b, h, k, i, dtype,
                       launch=moe4.moe_int4_launch_config(b, h, i, k, i_s, G, tc=False))
    monkeypatch.setattr(moe4, "_moe_gate_up_int4_kernel", None)
    monkeypatch.setattr(moe4, "_moe_down_int4_tc_kernel", None)
    out, ws = _run(moe4.moe_experts_int4_triton, args, b, h, k, i, dtype)
    tol = TOL[torch.bfloat16] if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    assert not torch.isnan(out).any() and not torch.isnan(ws).any()
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(ws.float(), ref_ws.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_int4_tc_takes_several_rows(monkeypatch, dtype):
    """B = 3 (each row its own experts, one row with a foreign id -1): the tensor-core kernels, outputs
    poisoned first, equal the reference (fp16, which the interpreter rounds as the GPU does) or
    today's kernels (bf16, whose roundings the interpreter truncates); the act rows equal today's."""
    b, h, e, i, i_s, k, G = 3, 256, 9, 128, 128, 4, 32
    args = _inputs(41, b, h, e, i, i_s, k, G, dtype)
    args[3][1, 2] = -1
    c = moe4.moe_int4_launch_config(b, h, i, k, i_s, G)
    assert c.gate_up_tc and c.down_tc
    old = moe4.moe_int4_launch_config(b, h, i, k, i_s, G, tc=False)
    ref, ref_ws = _run(moe4.moe_experts_int4_triton, args, b, h, k, i, dtype, launch=old)
    if dtype == torch.float16:
        ref, _ = _run(moe4.moe_experts_int4_reference, args, b, h, k, i, dtype)
    _no_cuda_core_kernels(monkeypatch)
    out, ws = _run(moe4.moe_experts_int4_triton, args, b, h, k, i, dtype)
    tol = TOL[torch.bfloat16] if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    assert not torch.isnan(out).any() and not torch.isnan(ws).any()
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(ws.float(), ref_ws.float(), **tol)
    foreign = (1 * k + 2) * i
    assert torch.equal(ws[foreign:foreign + i], torch.zeros(i, dtype=dtype))


def test_moe_int4_tc_refusals():
    """Tensor-core tiles must be >= 128 columns; the tensor-core kernels take batch 1 in bf16/fp16 only."""
    b, h, e, i, i_s, k, G = 1, 256, 4, 128, 128, 2, 32
    x, gu, dn, ids, w, sgu, sdn, sgl = _inputs(5, b, h, e, i, i_s, k, G, torch.float32)
    ws, out = moe.moe_workspace(b, k, i, torch.float32, "cpu"), torch.empty(b, h)
    cfg = moe4.moe_int4_launch_config(b, h, i, k, i_s, G)
    with pytest.raises(ValueError, match="tensor-core expert kernels take batches up to 8, <= 8 slots and bf16/fp16"):
        moe4.moe_experts_int4_triton(x, gu, dn, ids, w, sgu, sdn, sgl, ws, out, launch=cfg)
    with pytest.raises(ValueError, match="gate_up_block_h=64 must be .* at least 128 columns"):
        moe4.moe_experts_int4_triton(x.bfloat16(), gu, dn, ids, w, sgu, sdn, sgl, ws.bfloat16(), out.bfloat16(),
                                     launch=moe4.MoeInt4Launch(16, 64, 2, 3, 16, 128, 4, 3, True, True))
    with pytest.raises(ValueError, match="down_block_i=64 must be .* at least 128 columns"):
        moe4.moe_experts_int4_triton(x.bfloat16(), gu, dn, ids, w, sgu, sdn, sgl, ws.bfloat16(), out.bfloat16(),
                                     launch=moe4.MoeInt4Launch(16, 128, 2, 3, 16, 64, 4, 3, False, True))
    # fp32 rows at batch 1 keep the CUDA-core kernels
    moe4.moe_experts_int4_triton(x, gu, dn, ids, w, sgu, sdn, sgl, ws, out)
