"""The per-rank read bytes behind the parallel floor (model.parallel.cost), and the parallel
benchmark's refusal without a GPU."""
import os
import subprocess
import sys

import pytest

from model.config import ModelConfig
from model.parallel import ShardPlan
from model.parallel.cost import rank_read_bytes
from tests.dist_launch import ROOT


@pytest.mark.parametrize("name", ["tiny", "35b-a3b", "122b-a10b"])
@pytest.mark.parametrize("batch", [1, 4])
def test_one_rank_reads_what_the_cost_model_says(name, batch):
    cfg = ModelConfig.preset(name)
    assert rank_read_bytes(ShardPlan(cfg, 0, 1), 2, batch)["total"] == pytest.approx(cfg.bytes_per_token(2, batch),
                                                                                       rel=1e-9)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_split_the_lm_head_and_experts_and_share_the_router(world):
    cfg = ModelConfig.preset("35b-a3b")
    one = rank_read_bytes(ShardPlan(cfg, 0, 1), 2, 1)
    parts = [rank_read_bytes(ShardPlan(cfg, r, world), 2, 1) for r in range(world)]
    assert all(p == parts[0] for p in parts)                     # every rank reads as much
    assert parts[0]["lm_head"] * world == one["lm_head"]
    assert parts[0]["experts"] * world == pytest.approx(one["experts"])
    # the router (E rows a layer) and the norms are read by every rank; KV heads replicated past 2 ranks
    router = cfg.num_layers * cfg.num_experts * cfg.hidden_size * 2
    assert parts[0]["other"] * world > one["other"] + (world - 1) * router * 0.99
    assert parts[0]["total"] < one["total"] / world * 1.25


def test_bench_parallel_says_it_needs_a_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "tools.bench_parallel", "--out", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "need an NVIDIA GPU" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
