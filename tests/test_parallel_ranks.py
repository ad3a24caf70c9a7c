"""Parallel decode on the CPU: N ranks as processes over gloo (tests/parallel_worker.py), each
holding only its shard, against the single-process decoder on the whole model: logits of a
chunked prefill and greedy steps within 1e-5 (fp32) at the tiny preset (random weights sharded at
creation) and at a checkpoint written by transformers' save_pretrained (each rank reading its
slices), Generator tokens (greedy and sampled) equal; the Triton kernels (interpreter) at N = 2;
a rank that raises or stalls ends every rank with an error instead of a hang."""
import time

import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.weights import random_weights
from tests import parallel_cases as pc
from tests.dist_launch import check_ok, run_ranks

TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers-written checkpoint (save_pretrained of Qwen3_5MoeForCausalLM, norms random)."""
    from tests.hf_reference import hf_model

    cfg = ModelConfig.preset("tiny")
    path = tmp_path_factory.mktemp("hf_ckpt")
    hf_model(cfg, random_weights(cfg, "cpu", torch.float32, seed=11)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def expected(checkpoint):
    """What the single-process decoder gives for every case."""
    from model.checkpoint import load_checkpoint

    cfg = pc.tiny()
    w = random_weights(cfg, "cpu", torch.float32, seed=pc.SEED)
    dec = Decoder(cfg, w, max_batch=2, max_seq=32, backend="reference")
    out = {"tiny": {"greedy": pc.greedy(dec), "generate": pc.generate(dec)}}
    tri = Decoder(cfg, w, max_batch=1, max_seq=32, backend="triton")
    out["triton"] = {"greedy": pc.greedy(tri, pc.PROMPTS[:1], 2)}
    ccfg, cw = load_checkpoint(checkpoint, device="cpu")
    out["ckpt"] = {"greedy": pc.greedy(Decoder(ccfg, cw, max_batch=2, max_seq=32, backend="reference"))}
    return out


def _run(world, cases, tmp_path, checkpoint):
    res = run_ranks(world, ["-m", "tests.parallel_worker", "--out", tmp_path, "--cases", ",".join(cases),
                            "--checkpoint", checkpoint], timeout=120)
    check_ok(res)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world,cases", [(1, ("tiny", "ckpt")), (2, ("tiny", "triton", "ckpt")),
                                         (4, ("tiny", "ckpt"))])
def test_ranks_equal_the_single_process_decoder(world, cases, expected, checkpoint, tmp_path):
    ranks = _run(world, cases, tmp_path, checkpoint)
    cfg = pc.tiny()
    for r, got in enumerate(ranks):
        for case in cases:
            logits, tokens = got[case]["greedy"]
            want_logits, want_tokens = expected[case]["greedy"]
            assert tokens == want_tokens, (r, case)
            assert all(t.shape == (cfg.vocab_size,) for row in logits for t in row)
            diff = pc.max_diff(logits, want_logits)
            assert diff <= TOL, f"rank {r} of {world}, {case}: logits differ by {diff:.3g}"
        # each rank holds its slice of the vocabulary and of the experts only
        assert got["tiny"]["embed_shape"] == (cfg.vocab_size // world, cfg.hidden_size)
        assert got["tiny"]["experts_shape"][0] == cfg.num_experts // world
        assert got["tiny"]["generate"] == expected["tiny"]["generate"], f"rank {r} of {world}: Generator tokens"


@pytest.mark.parametrize("case", ["fail", "stall"])
def test_a_failing_rank_ends_every_rank(case, tmp_path):
    t0 = time.monotonic()
    res = run_ranks(2, ["-m", "tests.parallel_worker", "--out", tmp_path, "--cases", case,
                        "--stall-timeout", 1.5], timeout=60)
    took = time.monotonic() - t0
    assert [r.returncode for r in res] == [1, 1], [(r.returncode, r.stderr[-500:]) for r in res]
    assert f"rank 1 of 2: failed: ValueError: injected failure on rank 1 ({case})" in res[1].stderr
    assert "rank 0 of 2: failed: " in res[0].stderr
    if case == "stall":     # rank 0 gave up at its timeout while rank 1 was still alive
        assert "Timed out" in res[0].stderr or "timed out" in res[0].stderr.lower(), res[0].stderr[-800:]
    assert took < 45
