"""The decode loop on the device (model/device_loop.py) against the host's per-step loop: the same
tokens, stop reasons and row positions, greedy and sampled, batch 1 and 4 with rows stopping at
different steps, end-of-sequence as the very first token, a budget of 1, per-row budgets, a chat
continuation, tokens streamed while the loop runs, at `tiny` and at `35b-a3b` widths."""
import dataclasses
import gc

import pytest
import torch

pytestmark = pytest.mark.gpu

MODES = ["while", "fixed"]
SAMPLED = dict(temperature=0.8, top_k=20, top_p=0.9, seed=5)


def _generator(cfg, batch, sampling=None, max_seq=360, seed=3):
    from model.decoder import Decoder
    from model.generation import Generator, SamplingParams
    from model.weights import random_weights

    weights = random_weights(cfg, device="cuda", dtype=torch.bfloat16, seed=seed)
    dec = Decoder(cfg, weights, max_batch=batch, max_seq=max_seq, backend="triton")
    return Generator(dec, SamplingParams(**(sampling or {})), use_graph=True)


@pytest.fixture(scope="module")
def tiny_cfg():
    from model.config import ModelConfig

    return ModelConfig.preset("tiny")


def _prompts(batch, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (3 + 2 * r,), generator=g).tolist() for r in range(batch)]


def _both(gen, prompts, budget, mode, **kw):
    """The per-step run and the device loop's, from the same fresh state; checks they agree."""
    ref = gen.generate(prompts, budget, device_loop=False, **kw)
    ref_pos = list(gen.decoder.next_positions)
    got = gen.generate(prompts, budget, device_loop=mode, **kw)
    assert got.tokens == ref.tokens
    assert got.stop_reasons == ref.stop_reasons
    assert gen.decoder.next_positions == ref_pos
    return ref, got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_tiny_device_loop_equals_per_step(tiny_cfg, mode, batch, sampling):
    with _generator(tiny_cfg, batch, sampling) as gen:
        prompts = _prompts(batch, tiny_cfg.vocab_size)
        free, _ = _both(gen, prompts, 40, mode)
        assert all(len(t) == 40 for t in free.tokens)
        # end-of-sequence ids that stop rows at different steps (row r at step ~5 + 9r)
        eos = {free.tokens[r][min(5 + 9 * r, 39)] for r in range(batch)}
        ref, got = _both(gen, prompts, 40, mode, eos_token_ids=eos)
        assert "eos" in ref.stop_reasons
        if batch > 1:
            assert len({len(t) for t in ref.tokens}) > 1, ref.tokens   # rows stopped at different steps
        # end-of-sequence as the very first token of row 0, and a budget of 1
        ref, _ = _both(gen, prompts, 40, mode, eos_token_ids={free.tokens[0][0]})
        assert ref.tokens[0] == [free.tokens[0][0]] and ref.stop_reasons[0] == "eos"
        ref, _ = _both(gen, prompts, 1, mode)
        assert all(len(t) == 1 for t in ref.tokens)
        # per-row budgets
        budgets = [3, 17, 1, 40][:batch]
        ref, _ = _both(gen, prompts, budgets, mode)
        assert [len(t) for t in ref.tokens] == budgets


def test_tiny_fixed_k_with_one_k_ends_exactly(tiny_cfg):
    with _generator(tiny_cfg, 2) as gen:
        loop = gen._device_loop("fixed")
        loop.fixed_steps = (1, 16)
        loop.prepare("fixed")
        _both(gen, _prompts(2, tiny_cfg.vocab_size), 37, "fixed")      # 1 + 16 + 16 + 1 x 4


def test_tiny_while_loop_continues_a_chat(tiny_cfg):
    """Two turns: the second appended where the first left the row, per-step vs while loop."""
    def turns(gen, mode):
        first = gen.generate([[5, 6, 7]], 9, device_loop=mode)
        start = gen.decoder.next_positions[0]
        second = gen.generate([[first.tokens[0][-1], 8, 9]], 9, start_positions=[start], device_loop=mode)
        return first.tokens, second.tokens, list(gen.decoder.next_positions)

    with _generator(tiny_cfg, 1, SAMPLED) as gen:
        assert turns(gen, False) == turns(gen, "while")


def test_tiny_tokens_stream_while_the_loop_runs(tiny_cfg):
    import cugraph_rt as cg

    with _generator(tiny_cfg, 1) as gen:
        loop = gen._device_loop("while")
        seen = []
        res = gen.generate([[1, 2, 3]], 300, device_loop="while",
                           on_tokens=lambda step, toks: seen.append((step, toks[0], loop.stream.query())))
        assert [t for _, t, _ in seen] == res.tokens[0] and [s for s, _, _ in seen] == list(range(1, 301))
        assert any(not done for _, _, done in seen), "no token was read before the loop had finished"
        tree = cg.node_tree(loop._graphs["while"])
        whiles = [r for r in tree if isinstance(r, cg.ConditionalRecord) and r.kind == "while"]
        assert len(whiles) == 1 and whiles[0].bodies and len(whiles[0].bodies[0]) > 10
    live = cg.live_allocations()
    gen.close()                       # idempotent: the with block closed it already
    assert cg.live_allocations() == live
    assert loop._closed and loop.ring_host is None


@pytest.mark.parametrize("batch,sampling", [(1, None), (2, SAMPLED)], ids=["greedy-b1", "sampled-b2"])
def test_35b_widths_device_loop_equals_per_step(batch, sampling):
    from model.config import ModelConfig

    cfg = dataclasses.replace(ModelConfig.preset("35b-a3b"), num_layers=4)
    gen = _generator(cfg, batch, sampling, max_seq=96)
    try:
        prompts = _prompts(batch, cfg.vocab_size, seed=1)
        free, _ = _both(gen, prompts, 24, "while")
        eos = {free.tokens[-1][10]}
        for mode in MODES:
            _both(gen, prompts, 24, mode, eos_token_ids=eos)
    finally:
        gen.close()
        del gen
        gc.collect()
        torch.cuda.empty_cache()
