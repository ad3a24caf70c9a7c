"""Generation on the CPU reference path: the loop's bookkeeping (prompts, lock-step rows, stopping),
and the command lines run as processes."""
import os
import subprocess
import sys

import numpy as np

import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.generation import Generator, SamplingParams
from model.weights import random_weights


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    return cfg, random_weights(cfg, device="cpu", dtype=torch.float32, seed=1)


def _decoder(tiny, batch=1, max_seq=48):
    cfg, weights = tiny
    return Decoder(cfg, weights, max_batch=batch, max_seq=max_seq, backend="reference")


def _greedy_by_hand(dec, prompt, n):
    dec.reset()
    out, pos, tok = [], 0, None
    for t in prompt:
        logits = dec.decode_step(torch.tensor([t]), torch.tensor([pos]))
        pos += 1
    for _ in range(n):
        tok = int(torch.argmax(logits[0]))
        out.append(tok)
        logits = dec.decode_step(torch.tensor([tok]), torch.tensor([pos]))
        pos += 1
    return out


def test_greedy_generation_matches_a_hand_written_loop(tiny):
    dec = _decoder(tiny)
    res = Generator(dec, SamplingParams(), use_graph=False).generate([[5, 9, 2]], 12)
    assert res.tokens[0] == _greedy_by_hand(dec, [5, 9, 2], 12)
    assert res.stop_reasons == ["length"] and res.decode_tokens == 12 and res.prefill_tokens == 3


def test_rows_of_different_prompt_lengths_match_single_row_runs(tiny):
    prompts = [[3, 4, 5, 6, 7], [8]]
    both = Generator(_decoder(tiny, batch=2), use_graph=False).generate(prompts, 6)
    for r, p in enumerate(prompts):
        alone = Generator(_decoder(tiny), use_graph=False).generate([p], 6)
        assert both.tokens[r] == alone.tokens[0]


def test_stops_at_end_of_sequence(tiny):
    dec = _decoder(tiny)
    full = Generator(dec, use_graph=False).generate([[1, 2]], 10).tokens[0]
    eos = full[3]
    res = Generator(dec, use_graph=False).generate([[1, 2]], 10, eos_token_ids=[eos])
    assert res.tokens[0] == full[: full.index(eos) + 1] and res.stop_reasons == ["eos"]


@pytest.mark.parametrize("prompts,max_new,match", [
    ([[1, 2]], 0, "max_new_tokens must be a positive int, got 0"),
    ([[]], 4, "every prompt needs at least one token"),
    ([[1, 10**9]], 4, "prompt 0: token id 1000000000 outside the vocabulary [0, 256)"),
    ([[-5]], 4, "prompt 0: token id -5 outside the vocabulary"),
    ([[1]] * 3, 4, "3 prompts but the decoder was built for batch 2"),
    ([[1] * 40], 10, "prompt 0 of 40 tokens + 10 new tokens needs 49 cache positions; the decoder holds 48"),
])
def test_bad_requests_are_refused_and_the_generator_still_works(tiny, prompts, max_new, match):
    gen = Generator(_decoder(tiny, batch=2), use_graph=False)
    with pytest.raises(ValueError) as info:
        gen.generate(prompts, max_new)
    assert match in str(info.value)
    again = Generator(_decoder(tiny, batch=2), use_graph=False).generate([[1, 2]], 3)
    assert gen.generate([[1, 2]], 3).tokens == again.tokens


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=float("inf")), dict(top_k=-2), dict(top_p=0.0),
                                dict(top_p=1.5)])
def test_bad_sampling_params_name_the_value(kw):
    with pytest.raises(ValueError, match=repr(next(iter(kw.values())))):
        SamplingParams(**kw)


def _run(*args):
    """A command as its own process, on the CPU even on a GPU machine (no device visible)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)


def test_generate_cli_prints_the_greedy_tokens(tiny):
    """The command line end to end (random tiny weights, seed 0, CPU reference path): the tokens it
    prints are the greedy tokens of the same model run here; bad flags are tests/test_reliability_inputs.py's."""
    cfg = ModelConfig.preset("tiny")
    weights = random_weights(cfg, device="cpu", dtype=torch.float32, seed=0)
    dec = Decoder(cfg, weights, max_batch=1, max_seq=3 + 6, backend="reference")
    eos = () if cfg.eos_token_id is None else tuple(np.atleast_1d(cfg.eos_token_id).tolist())
    want = Generator(dec, use_graph=False).generate([[1, 2, 3]], 6, eos_token_ids=eos)
    r = _run("-m", "model.generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "prompt (3 tokens): [1, 2, 3]", r.stdout
    assert [int(t) for t in lines[1].split()] == want.tokens[0], r.stdout
    n = len(want.tokens[0])
    assert "eager on CPU, batch 1: time to first token " in lines[2] and "(prefill 3 tok, " in lines[2], r.stdout
    assert f"decode {n} tok (" in lines[2] and f"stop: {want.stop_reasons[0]}" in lines[2], r.stdout


@pytest.mark.parametrize("tool", ["tools.capture_trace", "tools.bench_decode"])
def test_tools_say_they_need_a_gpu(tool, tmp_path):
    r = _run("-m", tool, "--out", str(tmp_path))
    assert r.returncode == 2 and "need an NVIDIA GPU" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())     # nothing written
