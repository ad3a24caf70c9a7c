"""tools/bench_moe.py: its sweep grids and the correctness check every configuration passes before
it is timed (CPU, Triton's interpreter; the timing itself needs a GPU)."""
import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.ops import moe
from tools import bench_moe


def test_grids_respect_their_bounds():
    gu = list(bench_moe.gate_up_grid(2048, 512))
    dn = list(bench_moe.down_grid(2048, 512, 8))
    assert gu and dn
    assert all(1024 <= bi * bh <= 4096 * w and bh <= 2048 for bi, bh, w, _ in gu)
    assert all(1024 <= 8 * ho * bi <= 2048 * w and bi <= 512 for ho, bi, w, _ in dn)


def test_bad_max_seconds_named(capsys):
    with pytest.raises(SystemExit):
        bench_moe.parse_args(["--max-seconds", "0"])
    assert "--max-seconds must be > 0, got 0.0" in capsys.readouterr().err


@pytest.mark.parametrize("fields", [
    {},
    dict(gate_up_block_i=1, gate_up_block_h=32, down_block_ho=1, down_block_i=16),
    dict(gate_up_block_i=16, gate_up_block_h=64, gate_up_stages=1, down_block_ho=16, down_block_i=64),
])
def test_configurations_match_the_reference(fields):
    cfg = ModelConfig.preset("tiny")
    bench = bench_moe.Bench(cfg, batch=2, copies=1, seed=3, torch=torch, device="cpu")
    launch = dataclasses.replace(moe.moe_launch_config(**bench.shape), **fields)
    assert bench.check(launch) <= 0.02


def test_a_wrong_result_is_refused():
    cfg = ModelConfig.preset("tiny")
    bench = bench_moe.Bench(cfg, batch=1, copies=1, seed=3, torch=torch, device="cpu")
    bench.reference = bench.reference + 1.0
    with pytest.raises(AssertionError, match="relative error"):
        bench.check(moe.moe_launch_config(**bench.shape))
