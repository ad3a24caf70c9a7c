"""int4 grouped experts (model/ops/moe/grouped_int4.py): the Triton op vs its reference (dequantize the
experts, then moe_experts_grouped_reference), group sizes 32/64/128, K tiles holding part of a group,
an expert spanning several blocks, a chunk's padding tokens, and the argument checks. Small shapes
(CPU interpreter); tests/gpu/test_ops_prefill_int4_gpu.py runs the 35b-a3b shapes.

Tolerances as tests/test_ops_moe_grouped.py (fp32 1e-5; bf16 1e-2 and >= 98 % bit-equal): the
kernels round at the reference's points, the dequantized weights exactly as the reference's."""
import dataclasses

import pytest
import torch

from model.ops import moe
from model.ops.moe import grouped_int4 as gi
from model.quant import quantize

from tests.test_ops_moe_grouped import _close, _run, _workspace

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(seed, t, e, k, h, i, i_s, group_size, dtype):
    """x, int4 gate_up/down, ids (expert 5 in every token's first slot: several blocks of one
    expert), routing weights, shared gate/up and gate logit as strided slices of one fused row,
    int4 shared_down."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    gu = quantize((torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype), group_size, "rtn")
    dn = quantize((torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype), group_size, "rtn")
    others = [ex for ex in range(e) if ex != 5]
    ids = torch.tensor([[5] + [others[j] for j in torch.randperm(e - 1, generator=g)[:k - 1]] for _ in range(t)],
                       dtype=torch.int32)
    w = torch.softmax(torch.randn(t, k, generator=g), -1).to(dtype)
    fused = torch.randn(t, e + 2 * i_s + 1 + 3, generator=g).to(dtype)     # router | shared g/u | gate
    sgu, sgl = fused[:, e:e + 2 * i_s], fused[:, e + 2 * i_s:e + 2 * i_s + 1]
    sdn = quantize((torch.randn(h, i_s, generator=g) / i_s ** 0.5).to(dtype), group_size, "rtn")
    return [x, gu, dn, ids, w, sgu, sdn, sgl]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,h,i,i_s", [(32, 64, 32, 32), (64, 64, 64, 64), (128, 128, 128, 128)])
def test_grouped_int4_matches_reference(dtype, group_size, h, i, i_s):
    """37 tokens, the last 7 padding (x NaN); the reference is the bf16 grouped reference on the
    dequantized experts, exactly; the op matches it with its own tiles and with BLOCK_M 16 and
    K tiles of 16 (a part of one group each), and never lets a padding row's NaN out."""
    t, n, e, k = 37, 30, 8, 3
    args = _inputs(group_size + h, t, e, k, h, i, i_s, group_size, dtype)
    args[0][n:] = float("nan")
    info = torch.tensor([0, 5, n])
    ws = _workspace(t, k, e, dtype, "cpu", h=h, i=i, i_s=i_s)
    want = _run(gi.moe_experts_grouped_int4_reference, args, ws, info)
    deq = list(args)
    for j in (1, 2, 6):
        deq[j] = args[j].dequantize(dtype)
    assert torch.equal(want, _run(moe.moe_experts_grouped_reference, deq, ws, info))
    cfg = gi.moe_grouped_int4_launch_config(t, h, i, k, e, i_s)
    assert {cfg.gate_up.block_k, cfg.down.block_k, cfg.shared.block_k} == {min(128, h, i, i_s)}
    k16 = {kernel: dataclasses.replace(getattr(cfg, kernel), block_k=16) for kernel in ("gate_up", "down", "shared")}
    cols = {kernel: dataclasses.replace(getattr(cfg, kernel), block_n=16, columns_first=True)
            for kernel in ("gate_up", "down")}   # the grid (column tiles, blocks)
    for launch in (None, dataclasses.replace(cfg, block_m=16, **k16), dataclasses.replace(cfg, **cols)):
        got = _run(gi.moe_experts_grouped_int4_triton, args, _workspace(t, k, e, dtype, "cpu", h=h, i=i, i_s=i_s),
                   info, launch=launch)
        _close(got, want, dtype)


def test_grouped_int4_act_and_y_equal_the_bf16_kernels_on_dequantized_experts():
    """The workspaces after a run (fp32): act and y of every valid pair as the bf16 grouped kernels
    leave them given the dequantized experts (same products, same roundings, sums in order)."""
    t, e, k, h, i, i_s, G = 21, 8, 2, 64, 64, 32, 32
    args = _inputs(3, t, e, k, h, i, i_s, G, torch.float32)
    ws4, ws = (_workspace(t, k, e, torch.float32, "cpu", h=h, i=i, i_s=i_s) for _ in range(2))
    out4 = _run(gi.moe_experts_grouped_int4_triton, args, ws4)
    deq = list(args)
    for j in (1, 2, 6):
        deq[j] = args[j].dequantize(torch.float32)
    out = _run(moe.moe_experts_grouped_triton, deq, ws)
    torch.testing.assert_close(ws4.act[:t * k], ws.act[:t * k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ws4.y[:t * k], ws.y[:t * k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out4, out, atol=1e-5, rtol=1e-5)


def test_grouped_int4_argument_checks():
    t, e, k, h, i, i_s, G = 4, 8, 2, 64, 32, 32, 32
    args = _inputs(1, t, e, k, h, i, i_s, G, torch.float32)
    ws = _workspace(t, k, e, torch.float32, "cpu", h=h, i=i, i_s=i_s)
    out = torch.empty(t, h)
    for fn in (gi.moe_experts_grouped_int4_triton, gi.moe_experts_grouped_int4_reference):
        for j, name in ((1, "gate_up_proj"), (2, "down_proj"), (6, "shared_down")):
            bad = list(args)
            bad[j] = args[j].dequantize(torch.float32)
            with pytest.raises(TypeError, match=f"{name} must be a QuantizedLinear, got Tensor"):
                fn(*bad, ws, out)
        mutated = dataclasses.replace(args[2])
        mutated.group_size = 64          # after its checks: the op checks again (I = 32)
        with pytest.raises(ValueError, match="down_proj: K=32 is not a multiple of group_size=64"):
            fn(*args[:2], mutated, *args[3:], ws, out)
        with pytest.raises(TypeError, match="x must be a tensor of one of .* got torch.int32"):
            fn(args[0].int(), *args[1:], ws, out)
        with pytest.raises(TypeError, match="out must be torch.float32 like x"):
            fn(*args, ws, out.bfloat16())
        with pytest.raises(ValueError, match="does not fit"):
            fn(*args, _workspace(t - 1, k, e, torch.float32, "cpu", h=h, i=i, i_s=i_s), out)
        with pytest.raises(TypeError, match="info"):
            fn(*args, ws, out, torch.tensor([0, 0, 4], dtype=torch.int32))
    cfg = gi.moe_grouped_int4_launch_config(t, h, i, k, e, i_s)
    with pytest.raises(ValueError, match="launch.down.block_k=8 must be a power of two >= 16"):
        gi.moe_experts_grouped_int4_triton(*args, ws, out,
                                           launch=dataclasses.replace(cfg, down=dataclasses.replace(cfg.down, block_k=8)))


def test_long_chunks_take_the_swept_tiles_and_int4_keeps_its_own():
    """Past 64 pairs an expert (35b-a3b: 4,096 tokens) the bf16 op takes the tiles its H100 sweep
    chose; at 1,024 tokens, and for the int4 op (not swept), the smaller ones."""
    long = moe.moe_grouped_launch_config(4096, 2048, 512, 8, 256, 512)
    assert (long.block_m, long.gate_up, long.down) == (128, moe.GemmTiles(128, 64, 8, 4), moe.GemmTiles(256, 64, 8, 4))
    assert moe.moe_grouped_launch_config(1024, 2048, 512, 8, 256, 512).block_m == 32
    int4 = gi.moe_grouped_int4_launch_config(4096, 2048, 512, 8, 256, 512)
    assert int4.block_m == 64 and int4.gate_up.num_warps == 4
