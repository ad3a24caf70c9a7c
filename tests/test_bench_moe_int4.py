"""tools/bench_moe.py --quant int4: its arguments, the int4 bytes and floor, the group-holding sweep
grids, and the int4 kernels checked against their reference (CPU, Triton's interpreter; the timing
needs a GPU)."""
import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.ops.moe import int4 as moe4
from model.quant import QuantizedLinear
from model.quant.build import quantize_chunked
from tools import bench_moe


def _tiny32():
    """The tiny preset with its intermediate sizes widened to one group of 32 (tiny's 16 and 24 are not)."""
    return dataclasses.replace(ModelConfig.preset("tiny"), moe_intermediate_size=32, shared_expert_intermediate_size=32)


def test_int4_arguments():
    args = bench_moe.parse_args(["--quant", "int4", "--group-size", "32"])
    assert (args.quant, args.group_size) == ("int4", 32)
    assert bench_moe.parse_args(["--quant", "int4"]).group_size == 128
    plain = bench_moe.parse_args([])
    assert (plain.quant, plain.group_size) == ("none", None)


@pytest.mark.parametrize("argv,message", [
    (["--group-size", "64"], "--group-size applies to --quant int4"),
    (["--quant", "int4", "--group-size", "48"], "invalid choice: 48"),
    (["--quant", "int4", "--preset", "tiny", "--group-size", "32"],
     "the tiny experts' moe_intermediate_size=16, shared_expert_intermediate_size=24 are not a multiple of 32"),
])
def test_bad_int4_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_moe.parse_args(argv)
    assert message in capsys.readouterr().err


def test_int4_bytes_by_hand():
    """tiny widened (H = I = Is = 32), group 32, 3 distinct experts: a [64, 32] gate/up is 1024
    bytes of codes + 2 * 64 rows * 1 group * 2 bytes; a [32, 32] down 512 + 128."""
    cfg = _tiny32()
    gu, dn = bench_moe.expert_bytes(3, cfg.hidden_size, cfg.moe_intermediate_size,
                                    cfg.shared_expert_intermediate_size, 32)
    assert (gu, dn) == (3 * (1024 + 256), 3 * (512 + 128) + (512 + 128))
    # bf16: two bytes a weight, as before
    assert bench_moe.expert_bytes(3, 32, 32, 32) == (3 * 64 * 32 * 2, 3 * 32 * 32 * 2 + 32 * 32 * 2)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_bytes_match_quantized_linear_nbytes(group_size):
    """Per expert, the formula equals QuantizedLinear.nbytes of the quantized weights (bf16 scales)."""
    E, H, I, Is = 3, 256, 128, 128
    g = torch.Generator().manual_seed(0)
    q = {n: quantize_chunked(torch.randn(*s, generator=g).to(torch.bfloat16), group_size, "rtn", name=n)
         for n, s in (("gu", (E, 2 * I, H)), ("dn", (E, H, I)), ("sd", (H, Is)))}
    gu, dn = bench_moe.expert_bytes(E, H, I, Is, group_size)
    assert gu == q["gu"].nbytes() and dn == q["dn"].nbytes() + q["sd"].nbytes()
    assert gu < bench_moe.expert_bytes(E, H, I, Is)[0] / 3


def test_chunked_quantization_equals_one_call():
    """model.quant.build.quantize_chunked (what the tool quantizes with) in chunks of two experts."""
    from model.quant.quantizers import quantize

    w = torch.randn(5, 16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q, whole = quantize_chunked(w, 32, "rtn", name="w", chunk_elems=2 * 16 * 64), quantize(w, 32, "rtn")
    assert q.shape == (5, 16, 64) and q.group_size == 32
    assert all(torch.equal(getattr(q, f), getattr(whole, f)) for f in ("qweight", "scales", "zeros"))


def test_35b_int4_floor_is_about_a_quarter_of_bf16():
    cfg = ModelConfig.preset("35b-a3b")
    dims = cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    bf16 = sum(bench_moe.expert_bytes(8, *dims))
    int4 = sum(bench_moe.expert_bytes(8, *dims, group_size=128))
    assert int4 == pytest.approx(bf16 * (0.5 + 4 / 128) / 2, rel=1e-12)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_grids_hold_whole_groups(group_size):
    shape = dict(b=1, h=2048, i=512, k=8, i_s=512)
    grids = bench_moe.sweep_grids(shape, group_size)
    assert grids["gate_up"] and grids["down"]
    assert all(f["gate_up_block_h"] % group_size == 0 for f in grids["gate_up"])
    assert all(f["down_block_i"] >= group_size for f in grids["down"])
    plain = bench_moe.sweep_grids(shape)
    per_block = [f for f in grids["down"] if f["down_programs"] == 0]
    assert len(per_block) <= len(plain["down"]) and any(f["down_block_i"] == 64 for f in plain["down"])
    assert (group_size == 128) == (len(per_block) < len(plain["down"]))


def test_int4_batch1_grids_add_the_whole_row_kernels():
    """At batch 1 the int4 grids hold whole-row entries (K tile of the whole row, not the tensor
    cores, programs a multiple of the SMs) and pin the others to the per-block kernels; at batch 2,
    and for bf16, there are none."""
    shape = dict(b=1, h=2048, i=512, k=8, i_s=512)
    grids = bench_moe.sweep_grids(shape, 128, sm_count=132)
    for part, k_field, k_tile in (("gate_up", "gate_up_block_h", 2048), ("down", "down_block_i", 512)):
        rows = [f for f in grids[part] if f[f"{part}_programs"]]
        assert len(rows) == 18 and all(f[k_field] == k_tile and f[f"{part}_tc"] is False for f in rows)
        assert {f[f"{part}_programs"] for f in rows} == {264, 528, 1056}
        assert any(f[f"{part}_programs"] == 0 for f in grids[part])
    for grids in (bench_moe.sweep_grids(dict(shape, b=2), 128), bench_moe.sweep_grids(shape)):
        assert not any(f.get("gate_up_programs") or f.get("down_programs") for p in grids for f in grids[p])


@pytest.mark.parametrize("fields", [{}, dict(gate_up_block_i=4, gate_up_block_h=32, down_block_ho=8, down_block_i=32,
                                                gate_up_tc=False, down_tc=False)])
def test_int4_configurations_match_the_int4_reference(fields):
    bench = bench_moe.Bench(_tiny32(), batch=2, copies=2, seed=3, torch=torch, device="cpu", group_size=32)
    L = bench.layers[0]
    assert isinstance(L["gate_up_proj"], QuantizedLinear) and isinstance(L["shared_down"], QuantizedLinear)
    distinct = sum(len(set(c["ids"].flatten().tolist())) for c in bench.layers) / 2
    assert (bench.gate_up_bytes, bench.down_bytes) == bench_moe.expert_bytes(distinct, 32, 32, 32, 32)
    assert bench.gate_up_bytes == distinct * L["gate_up_proj"].nbytes() / 8     # 8 experts
    launch = dataclasses.replace(bench.default_launch(), **fields)
    assert bench.default_launch() == moe4.moe_int4_launch_config(**bench.shape, group_size=32)
    assert bench.check(launch) <= 0.02


def test_int4_whole_row_configurations_match_the_int4_reference():
    """Batch 1: every whole-row entry of the sweep grid at one warp count passes the bench's check
    (bf16 on the interpreter, which truncates where the GPU rounds: some seeds fail the 2 % check
    with the default launch too, seed 4 for one)."""
    bench = bench_moe.Bench(_tiny32(), batch=1, copies=1, seed=3, torch=torch, device="cpu", group_size=32)
    grids = bench_moe.sweep_grids(bench.shape, 32, bench.sm_count)
    rows = [f for part in grids for f in grids[part] if f.get(f"{part}_programs") and f.get(f"{part}_warps") == 4]
    assert len(rows) == 18
    for fields in rows:
        assert bench.check(dataclasses.replace(bench.default_launch(), **fields)) <= 0.02


def test_int4_wrong_result_is_refused():
    bench = bench_moe.Bench(_tiny32(), batch=1, copies=1, seed=3, torch=torch, device="cpu", group_size=32)
    bench.reference = bench.reference + 1.0
    with pytest.raises(AssertionError, match="relative error"):
        bench.check(bench.default_launch())
