"""Decoder and Generator reliability on a GPU (Triton path, graph and eager): a full KV cache is an
error and never an overwrite, bad host inputs are refused before anything runs, and the generator
keeps giving the same tokens and logits as an untouched twin afterwards."""
import pytest
import torch

import cugraph_rt as cg
from model.config import ModelConfig
from model.decoder import Decoder
from model.generation import Generator
from model.weights import random_weights

pytestmark = pytest.mark.gpu
B, S = 2, 8


@pytest.fixture(scope="module")
def weights():
    cfg = ModelConfig.preset("tiny")
    return cfg, random_weights(cfg, "cuda", torch.bfloat16, seed=21)


def _gen(weights, use_graph=True, max_seq=S):
    cfg, w = weights
    dec = Decoder(cfg, w, max_batch=B, max_seq=max_seq, backend="triton")
    return Generator(dec, use_graph=use_graph)


def _T(*v):
    return torch.tensor(v, dtype=torch.int64)


def _state(dec):
    torch.cuda.synchronize()
    return [t.clone() for t in (dec.state.kv, dec.state.conv, dec.state.recurrent)]


def _fill(gen, steps):
    """`steps` steps from a reset, feeding back sampled tokens; returns the last tokens (host)."""
    gen.decoder.reset()
    tok = _T(3, 4)
    for p in range(steps):
        tok = gen.step(tok, torch.full((B,), p, dtype=torch.int64)).cpu()
    return tok


def test_kv_cache_full_is_an_error_never_an_overwrite(weights):
    gen = _gen(weights)
    dec = gen.decoder
    tok = _fill(gen, S)                       # positions 0..S-1: the cache is full
    assert gen.handle.phase == "replay"
    before = _state(dec)
    for p in (S, S + 1, 10**6):
        with pytest.raises(ValueError, match=f"position {p} \\(row 0\\) is outside the cache capacity: max_seq={S}"):
            gen.step(tok, torch.full((B,), p, dtype=torch.int64))
        after = _state(dec)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "refused step changed state"
    # bypassing the host checks (the bare graph, device positions): the kernels still never write
    # outside the cache and flag it instead
    for p in (S, 10**6, -1):
        out = gen.handle(tokens=tok.cuda(), positions=torch.full((B,), p, dtype=torch.int64, device="cuda"))
        torch.cuda.synchronize()
        assert torch.equal(dec.state.kv, before[0]), f"position {p} wrote into the KV cache"
        assert out.shape == (B,)
        with pytest.raises(ValueError, match=f"outside the cache capacity max_seq={S}"):
            dec.check_kv_error()
    dec.reset()
    dec.check_kv_error()
    # and the generator is fine afterwards
    twin = _gen(weights, use_graph=False)
    assert gen.generate([[1, 2], [3]], S - 2).tokens == twin.generate([[1, 2], [3]], S - 2).tokens
    gen.close()


def test_generate_past_the_cache_refused_up_front(weights):
    gen = _gen(weights)
    with pytest.raises(ValueError, match=f"needs {S + 1} cache positions; the decoder holds {S}"):
        gen.generate([[1, 2, 3]], S - 1)
    assert len(gen.generate([[1, 2, 3]], S - 2).tokens[0]) == S - 2
    gen.close()


@pytest.mark.parametrize("use_graph", [True, False])
def test_bad_step_inputs_refused_then_identical_to_an_untouched_twin(weights, use_graph):
    gen, twin = _gen(weights, use_graph), _gen(weights, use_graph=False)
    tok_g = _fill(gen, 3)
    tok_t = _fill(twin, 3)
    assert torch.equal(tok_g, tok_t)
    bad = [
        ((5, 256), (3, 3), ValueError, "token id 256 (row 1) is outside the vocabulary [0, 256)"),
        ((-2, 5), (3, 3), ValueError, "token id -2 (row 0)"),
        ((5, 5), (3, 2), ValueError, "row 1: position 2 given, but the row holds positions 0..2: its next step must be at position 3"),
        ((5, 5), (4, 3), ValueError, "row 0: position 4 given"),
        ((5, 5), (3, 9), ValueError, "position 9 (row 1) is outside the cache capacity"),
        ((5, 5, 5), (3, 3, 3), ValueError, "shape (2,) (the generator's batch); got (3,)"),
    ]
    for toks, pos, exc, needle in bad:
        before = _state(gen.decoder)
        with pytest.raises(exc) as info:
            gen.step(_T(*toks), _T(*pos))
        assert needle in str(info.value)
        assert all(torch.equal(a, b) for a, b in zip(before, _state(gen.decoder)))
    if use_graph:   # a dtype the graph was not built for: the handle's own error
        with pytest.raises(cg.InputTypeError, match="expected dtype torch.int64; given torch.int32"):
            gen.step(tok_g.int(), _T(3, 3))
    for p in range(3, S):
        tok_g = gen.step(tok_g, torch.full((B,), p, dtype=torch.int64)).cpu()
        tok_t = twin.step(tok_t, torch.full((B,), p, dtype=torch.int64)).cpu()
        assert torch.equal(tok_g, tok_t), p
        torch.cuda.synchronize()
        assert torch.equal(gen.decoder.logits, twin.decoder.logits), p
    gen.close()


def test_device_positions_are_not_read_but_the_next_host_step_is_bounded(weights):
    gen = _gen(weights)
    tok = _fill(gen, 2)
    nxt = gen.step(tok.cuda(), torch.full((B,), 2, dtype=torch.int64, device="cuda"))
    assert gen.decoder.next_positions == [None, None]     # unknown: not read (no sync)
    gen.step(nxt, torch.full((B,), 3, dtype=torch.int64))  # host again: bounds checked, history re-learnt
    assert gen.decoder.next_positions == [4, 4]
    with pytest.raises(ValueError, match="row 0: position 6 given"):
        gen.step(nxt, torch.full((B,), 6, dtype=torch.int64))
    gen.close()


def test_batch_larger_than_built_for(weights):
    cfg, w = weights
    with pytest.raises(ValueError, match="max_batch=17: the Triton GEMV handles batches up to 16"):
        Decoder(cfg, w, max_batch=17, max_seq=S, backend="triton")
    gen = _gen(weights)
    with pytest.raises(ValueError, match="3 prompts but the decoder was built for batch 2"):
        gen.generate([[1], [2], [3]], 2)
    with pytest.raises(ValueError, match="batch 3 outside 1..max_batch=2"):
        gen.decoder.decode_step(torch.ones(3, dtype=torch.int64, device="cuda"),
                                torch.zeros(3, dtype=torch.int64, device="cuda"))
    assert len(gen.generate([[1], [2]], 3).tokens) == 2
    gen.close()
