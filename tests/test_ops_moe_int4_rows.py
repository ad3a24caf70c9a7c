"""The batch-1 whole-row int4 expert kernels (model/ops/moe/int4_rows.py, MODEL_INT4_MOE_ROWS)
against the reference and the per-block kernels: blocks that do not divide the rows, fewer
programs than blocks, I != Is, other ranks' experts, the ascending-id sum, the configuration and
the refusals (CPU, Triton's interpreter; tests/gpu/test_ops_int4_gpu.py runs 35b-a3b shapes)."""
import dataclasses

import pytest
import torch

from model.ops import moe
from model.ops.hardware import INTERPRETER, DeviceProfile
from model.ops.moe import int4 as moe4
from model.quant import quantize
from model.settings import Settings

from tests.test_ops_moe_int4 import TOL, _inputs, _run


def _rows(b, h, i, i_s, k, G, **fields):
    return dataclasses.replace(moe4.moe_int4_launch_config(b, h, i, k, i_s, G, INTERPRETER, rows=True), **fields)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,e,i,i_s,k,G", [(64, 6, 96, 64, 2, 32), (128, 5, 64, 128, 3, 64),
                                           (256, 8, 128, 128, 8, 128)])
@pytest.mark.parametrize("narrow", [False, True])
def test_rows_kernels_match_reference(dtype, h, e, i, i_s, k, G, narrow):
    """Output against the reference; the act rows against the per-block CUDA-core gate/up kernel's.
    narrow: small blocks (the last one partial where I is not a multiple) striding over 3 and 2
    programs, so a program takes several blocks and prefetches past the last."""
    args = _inputs(h + i + k, 1, h, e, i, i_s, k, G, dtype)
    ref, _ = _run(moe4.moe_experts_int4_reference, args, 1, h, k, i, dtype)
    _, per_block_act = _run(moe4.moe_experts_int4_triton, args, 1, h, k, i, dtype,
                            launch=moe4.moe_int4_launch_config(1, h, i, k, i_s, G, INTERPRETER, tc=False, rows=False))
    cfg = _rows(1, h, i, i_s, k, G)
    if narrow:
        cfg = dataclasses.replace(cfg, gate_up_block_i=64 if i == 96 else 8, gate_up_programs=3, down_block_ho=4,
                                  down_programs=2)
    assert cfg.gate_up_programs > 0 and cfg.down_programs > 0
    out, act = _run(moe4.moe_experts_int4_triton, args, 1, h, k, i, dtype, launch=cfg)
    assert not torch.isnan(out).any() and not torch.isnan(act).any()
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(act.float(), per_block_act.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_down_adds_slots_in_ascending_expert_id(dtype):
    """Slot outputs +A, -A and 0.9375 where A + 0.9375 rounds back to A: in ascending expert id
    (A, 0.9375, -A) the sum is 0, in slot order (-A, A, 0.9375) it would be 0.9375. Each slot's
    act is one 1 (column 0), each expert's down rows one constant (exact in int4: 15 codes of a
    power-of-two scale), the shared expert zero."""
    A = 15.0 * (2 ** 22 if dtype == torch.float32 else 2 ** 8)     # ulp(A) = 4 in fp32, 2 in fp16
    h, e, i, G, k = 32, 10, 32, 32, 3
    values = {2: A, 5: 0.9375, 9: -A}
    dn = torch.zeros(e, h, i)
    for ex, v in values.items():
        dn[ex, :, 0] = v
    down = quantize(dn.to(dtype), G, "rtn")
    assert set(down.dequantize(dtype)[:, 0, 0].tolist()) == {0.0, A, 0.9375, -A}
    ids = torch.tensor([[9, 2, 5]], dtype=torch.int32)
    act = torch.zeros(k, i, dtype=dtype)
    act[:, 0] = 1.0
    wts = torch.ones(1, k, dtype=dtype)
    shared_down = quantize(torch.zeros(h, i, dtype=dtype), G, "rtn")
    sgu, sgl = torch.zeros(1, 2 * i, dtype=dtype), torch.zeros(1, 1, dtype=dtype)
    out = torch.full((1, h), float("nan"), dtype=dtype)
    moe4.launch_moe_down_int4(act.reshape(-1), down, ids, wts, sgu, shared_down, sgl, out, _rows(1, h, i, i, k, G))
    a, small = torch.tensor(A, dtype=dtype), torch.tensor(0.9375, dtype=dtype)
    assert float((a + small) - a) == 0.0 and float((-a + a) + small) == 0.9375   # the premise, in dtype
    assert torch.equal(out, torch.zeros(1, h, dtype=dtype))


def test_rows_kernels_skip_other_ranks_experts():
    """An id < 0 (expert parallel: another rank's expert) reads no weights and adds nothing, and its
    act row is zero, as in the per-block kernels and the reference."""
    h, e, i, i_s, k, G = 64, 6, 64, 64, 4, 32
    x, gu, dn, ids, w, sgu, sdn, sgl = _inputs(5, 1, h, e, i, i_s, k, G, torch.float32)
    ids[0, 1], ids[0, 3] = -1, -1
    args = (x, gu, dn, ids, w, sgu, sdn, sgl)
    ref, _ = _run(moe4.moe_experts_int4_reference, args, 1, h, k, i, torch.float32)
    out, act = _run(moe4.moe_experts_int4_triton, args, 1, h, k, i, torch.float32, launch=_rows(1, h, i, i_s, k, G))
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    act = act.view(k, i)
    assert torch.equal(act[1], torch.zeros(i)) and torch.equal(act[3], torch.zeros(i)) and act[0].abs().sum() > 0


def test_rows_config():
    """rows=True: batch 1 gets both whole-row kernels on four programs per SM, K tiles of whole
    rows, blocks of about 8192 weights (35b-a3b: 2 + 2 rows of 2048; 2 rows of 8 slots x 512);
    more rows, or tc=True, do not. The default follows MODEL_INT4_MOE_ROWS (off)."""
    h100 = DeviceProfile.preset("h100")
    cfg = moe4.moe_int4_launch_config(1, 2048, 512, 8, 512, 128, h100, rows=True)
    assert (cfg.gate_up_programs, cfg.down_programs) == (4 * h100.sm_count,) * 2
    assert (cfg.gate_up_block_i, cfg.gate_up_block_h, cfg.down_block_ho, cfg.down_block_i) == (2, 2048, 2, 512)
    assert not (cfg.gate_up_tc or cfg.down_tc)
    for other in (moe4.moe_int4_launch_config(2, 2048, 512, 8, 512, 128, h100, rows=True),
                  moe4.moe_int4_launch_config(1, 2048, 512, 8, 512, 128, h100, rows=True, tc=True),
                  moe4.moe_int4_launch_config(1, 2048, 512, 8, 512, 128, h100)):
        assert other.gate_up_programs == other.down_programs == 0
    assert moe4.SETTINGS.int4_moe_rows is False
    assert Settings.from_env({"MODEL_INT4_MOE_ROWS": "1"}).int4_moe_rows is True
    with pytest.raises(ValueError, match="MODEL_INT4_MOE_ROWS='maybe'"):
        Settings.from_env({"MODEL_INT4_MOE_ROWS": "maybe"})


@pytest.mark.parametrize("fields,b,message", [
    ({}, 2, r"launch.gate_up_programs=4: the whole-row expert kernels take one row.*got B=2"),
    ({"gate_up_block_h": 32}, 1, r"gate_up_block_h >= 64 \(whole rows\).*gate_up_block_h=32"),
    ({"down_block_i": 32}, 1, r"launch.down_programs=4.*down_block_i >= 64 \(whole rows\).*down_block_i=32"),
    ({"down_tc": True, "down_block_i": 128}, 1, r"launch.down_programs=4.*down_tc=True"),
    ({"gate_up_programs": -1}, 1, r"launch.gate_up_programs=-1"),
])
def test_rows_refusals_name_the_value_and_write_nothing(fields, b, message):
    """A whole-row launch that cannot run is refused before either kernel runs: out and act_ws keep
    their poison, and the same call then works with the default."""
    h, e, i, i_s, k, G = 64, 4, 64, 64, 2, 32
    args = _inputs(9, b, h, e, i, i_s, k, G, torch.float32)
    cfg = dataclasses.replace(_rows(1, h, i, i_s, k, G), **fields)
    ws = moe.moe_workspace(b, k, i, torch.float32, "cpu").fill_(float("nan"))
    out = torch.full((b, h), float("nan"))
    with pytest.raises(ValueError, match=message):
        moe4.moe_experts_int4_triton(*args, ws, out, launch=cfg)
    assert torch.isnan(out).all() and torch.isnan(ws).all()
    moe4.moe_experts_int4_triton(*args, ws, out)
    ref, _ = _run(moe4.moe_experts_int4_reference, args, b, h, k, i, torch.float32)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
