"""tools/bench_moe_prefill.py: its arguments, its sweep grid, and the check every configuration
passes before it is timed (CPU, Triton's interpreter; the timing itself needs a GPU)."""
import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.ops import moe
from tools import bench_moe_prefill as bench


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "0"], "expected comma-separated positive integers, got '0'"),
    (["--tokens", "12,a"], "expected comma-separated positive integers, got '12,a'"),
    (["--max-seconds", "nan"], "--max-seconds must be > 0, got nan"),
])
def test_bad_arguments_are_named(capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_flops_count_pairs_and_shared_expert():
    # 35b-a3b widths: 8 pairs a token, gate/up 2 x 512 x 2048 and down 2048 x 512, shared down 2048 x 512
    assert bench.op_flops(1, 2048, 512, 8, 512) == 2 * 8 * 3 * 512 * 2048 + 2 * 512 * 2048


def test_sweep_grid_is_valid_and_excludes_the_default():
    base = moe.moe_grouped_launch_config(4096, 2048, 512, 8, 256, 512)
    grid = bench.sweep_grid(base)
    assert grid and base not in grid and len(set(grid)) == len(grid)
    assert {c.block_m for c in grid} == {32, 64, 128}
    # each configuration changes one kernel's tiles: the other stays base's
    assert all(c.gate_up == base.gate_up or c.down == base.down for c in grid)
    assert {c.down for c in grid} >= set(bench.tile_grid("down"))


def test_best_pairs_join_the_fastest_tiles_of_each_kernel():
    base = moe.moe_grouped_launch_config(1024, 2048, 512, 8, 256, 512)
    fast_gu, slow_gu, fast_dn = (moe.GemmTiles(128, 64, 8, 4), moe.GemmTiles(64, 128, 4, 4), moe.GemmTiles(256, 64, 8, 3))
    timed = [(base, 100.0), (dataclasses.replace(base, block_m=128, gate_up=slow_gu), 95.0),
             (dataclasses.replace(base, block_m=128, gate_up=fast_gu), 80.0),
             (dataclasses.replace(base, block_m=128, down=fast_dn), 90.0),
             (dataclasses.replace(base, block_m=128, gate_up=fast_gu, down=moe.GemmTiles(64, 32, 4, 3)), 10.0)]
    assert bench.best_pairs(base, timed) == [dataclasses.replace(base, block_m=128, gate_up=fast_gu, down=fast_dn)]
    # a pair already timed is not timed again
    assert bench.best_pairs(base, timed + [(bench.best_pairs(base, timed)[0], 70.0)]) == []


@pytest.mark.parametrize("block_m", [None, 16, 128])
def test_configurations_match_the_reference(block_m):
    case = bench.Case(ModelConfig.preset("tiny"), tokens=40, seed=3, torch=torch, device="cpu")
    launch = case.default_launch()
    if block_m:
        launch = dataclasses.replace(launch, block_m=block_m)
    assert case.check(launch) <= bench.CHECK_BOUND
    assert not torch.isnan(case.args["out"]).any()


def test_a_wrong_result_is_refused():
    case = bench.Case(ModelConfig.preset("tiny"), tokens=16, seed=3, torch=torch, device="cpu")
    case.reference = case.reference + 1.0
    with pytest.raises(AssertionError, match="relative error"):
        case.check(case.default_launch())
