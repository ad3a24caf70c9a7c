"""The decoder's reference path against transformers' Qwen3_5MoeForCausalLM (tiny preset, fp32,
random non-zero norm weights): prefill plus 16 greedy decode steps."""
import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.weights import random_weights

from tests.hf_reference import hf_greedy, hf_model, ours_greedy
from tests.needs import need_module

need_module("transformers")

PROMPT_A = [5, 17, 200, 42, 7, 99, 3, 250, 11]
PROMPT_B = [1, 2, 3, 4]
STEPS = 16
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    w = random_weights(cfg, "cpu", torch.float32, seed=1)
    return cfg, w


@pytest.fixture(scope="module")
def hf_runs(tiny):
    cfg, w = tiny
    torch.manual_seed(0)
    model = hf_model(cfg, w)
    return {tuple(p): hf_greedy(model, p, STEPS) for p in (PROMPT_A, PROMPT_B)}


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_norm_weights_are_nonzero(tiny):
    _, w = tiny
    assert w.final_norm.abs().min() > 0 and all(L.input_norm.abs().sum() > 0 for L in w.layers)


def test_reference_decoder_matches_transformers(tiny, hf_runs):
    cfg, w = tiny
    dec = Decoder(cfg, w, max_batch=1, max_seq=64, backend="reference")
    logits, tokens = ours_greedy(dec, [PROMPT_A], STEPS)
    hf_logits, hf_tokens = hf_runs[tuple(PROMPT_A)]
    assert tokens[0] == hf_tokens
    assert _max_diff(logits[0], hf_logits) <= TOL
    assert dec.logits.shape == (1, cfg.vocab_size)


def test_batch_of_two_different_prompts(tiny, hf_runs):
    cfg, w = tiny
    dec = Decoder(cfg, w, max_batch=3, max_seq=64, backend="reference")
    # a short prompt first: rows run in lock-step and row 0 stops before row 1
    logits, tokens = ours_greedy(dec, [PROMPT_B, PROMPT_A], STEPS)
    for row, p in enumerate((PROMPT_B, PROMPT_A)):
        hf_logits, hf_tokens = hf_runs[tuple(p)]
        assert tokens[row] == hf_tokens
        assert _max_diff(logits[row], hf_logits) <= TOL


def test_reset_row_restarts_that_sequence_only(tiny, hf_runs):
    cfg, w = tiny
    dec = Decoder(cfg, w, max_batch=2, max_seq=64, backend="reference")
    dec.prefill([PROMPT_A, PROMPT_A])
    dec.reset(0)
    # feed PROMPT_B into row 0 alone while row 1 keeps its state
    for t, tok in enumerate(PROMPT_B):
        dec._forward(torch.tensor([tok]), torch.tensor([t]), 0, 1)
    hf_logits, _ = hf_runs[tuple(PROMPT_B)]
    assert float((dec.logits[0] - hf_logits[0]).abs().max()) <= TOL
    # row 1 carries on from its own state: its next steps are PROMPT_A's greedy continuation
    hf_a, hf_a_tokens = hf_runs[tuple(PROMPT_A)]
    for s, tok in enumerate(hf_a_tokens[:2]):
        dec.logits[1].fill_(float("nan"))
        dec._forward(torch.tensor([tok]), torch.tensor([len(PROMPT_A) + s]), 1, 2)
        assert float((dec.logits[1] - hf_a[s + 1]).abs().max()) <= TOL, s
    with pytest.raises(ValueError, match="row 5 out of range"):
        dec.reset(5)


def test_position_beyond_capacity_is_an_error(tiny):
    cfg, w = tiny
    dec = Decoder(cfg, w, max_batch=2, max_seq=8, backend="reference")
    dec.check_positions(torch.tensor([0, 0]))      # fresh rows: the next step is at position 0
    with pytest.raises(ValueError, match=r"position 8 \(row 1\).*max_seq=8"):
        dec.check_positions(torch.tensor([3, 8]))
    with pytest.raises(ValueError, match=r"position -1 \(row 0\)"):
        dec.check_positions([-1])
    with pytest.raises(ValueError, match="position 8 .*max_seq=8"):
        dec.decode_step(torch.tensor([1, 2]), torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="9 tokens: position 8 .*max_seq=8"):
        dec.prefill([PROMPT_A])
    before = dec.state.kv.clone()
    # the op itself never writes outside the cache: it flags instead
    dec._forward(torch.tensor([1]), torch.tensor([8]), 0, 1)
    assert torch.equal(before, dec.state.kv)
    with pytest.raises(ValueError, match="outside the cache capacity"):
        dec.check_kv_error()
    dec.reset()
    dec.check_kv_error()


def test_step_writes_static_logits_buffer(tiny):
    cfg, w = tiny
    dec = Decoder(cfg, w, max_batch=2, max_seq=8, backend="reference")
    ptr = dec.logits.data_ptr()
    dec.logits.fill_(float("nan"))
    out = dec.decode_step(torch.tensor([3]), torch.tensor([0]))
    assert out.data_ptr() == ptr and out.shape == (1, cfg.vocab_size)
    assert torch.isfinite(out).all() and torch.isnan(dec.logits[1]).all()


def test_random_weights_stay_finite_over_many_steps():
    cfg = ModelConfig.preset("tiny")
    w = random_weights(cfg, "cpu", torch.bfloat16, seed=3)
    dec = Decoder(cfg, w, max_batch=1, max_seq=512, backend="reference")
    tok = torch.tensor([7])
    for p in range(300):
        out = dec.decode_step(tok, torch.tensor([p]))
        tok = out.float().argmax(-1)
    assert torch.isfinite(out.float()).all()
    assert torch.isfinite(dec.state.recurrent).all() and dec.state.recurrent.abs().max() < 1e3
