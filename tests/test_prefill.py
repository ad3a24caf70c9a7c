"""Chunked prefill (model.prefill through Decoder.prefill) on the CPU: against transformers, against
the token-by-token decode path, across chunk edges, appended turns, padding and bad input.
Reference backend (fp32) everywhere; the Triton kernels under the interpreter in one test."""
import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.weights import random_weights

from tests.hf_reference import hf_greedy, hf_model, ours_greedy
from tests.needs import need_module

need_module("transformers")

LENGTHS = (1, 63, 64, 65, 200)
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    return cfg, random_weights(cfg, "cpu", torch.float32, seed=1)


@pytest.fixture(scope="module")
def hf(tiny):
    torch.manual_seed(0)
    return hf_model(*tiny)


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def states(dec, row=None):
    s = dec.state
    parts = (s.kv, s.conv, s.recurrent)
    if row is None:
        return [t.clone() for t in parts]
    return [s.kv[:, :, row].clone(), s.conv[:, row].clone(), s.recurrent[:, row].clone()]


def token_by_token(dec, prompt_ids, row=0):
    """Feed the prompt through decode steps of `row` only (the path prefill replaced)."""
    for t, tok in enumerate(prompt_ids):
        dec._forward(torch.tensor([tok]), torch.tensor([t]), row, row + 1)
    return dec.logits[row].clone()


@pytest.mark.parametrize("n", LENGTHS)
def test_last_token_logits_match_transformers(tiny, hf, n):
    cfg, w = tiny
    p = prompt(n)
    dec = Decoder(cfg, w, max_batch=1, max_seq=256, backend="reference")
    dec.logits.fill_(float("nan"))
    ours = dec.prefill([p])[0]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([p])).logits[0, -1]
    assert rel_err(ours, theirs) <= REL_TOL


@pytest.mark.parametrize("n", (63, 65, 200))
def test_states_after_prefill_equal_the_token_by_token_path(tiny, n):
    cfg, w = tiny
    p = prompt(n, seed=1)
    a = Decoder(cfg, w, max_batch=1, max_seq=256, backend="reference")
    b = Decoder(cfg, w, max_batch=1, max_seq=256, backend="reference")
    la = a.prefill([p])[0].clone()
    lb = token_by_token(b, p)
    assert rel_err(la, lb) <= REL_TOL
    for x, y in zip(states(a), states(b)):
        assert float((x - y).abs().max()) <= 1e-4 * max(1.0, float(y.abs().max()))
    assert a.next_positions[0] == n


def test_greedy_continuation_matches_transformers_for_16_steps(tiny, hf):
    cfg, w = tiny
    p = prompt(65, seed=2)
    hf_logits, hf_tokens = hf_greedy(hf, p, 16)
    dec = Decoder(cfg, w, max_batch=1, max_seq=128, backend="reference")
    logits, tokens = ours_greedy(dec, [p], 16)
    assert tokens[0] == hf_tokens
    assert max(rel_err(x, y) for x, y in zip(logits[0], hf_logits)) <= REL_TOL


def test_chunks_of_16_equal_one_chunk(tiny):
    cfg, w = tiny
    p = prompt(70, seed=3)
    one = Decoder(cfg, w, max_batch=1, max_seq=128, backend="reference")
    many = Decoder(cfg, w, max_batch=1, max_seq=128, backend="reference")
    many.prefill_step(16)
    l1, l2 = one.prefill([p])[0].clone(), many.prefill([p])[0].clone()
    assert rel_err(l2, l1) <= 1e-5
    for x, y in zip(states(one), states(many)):
        assert float((x - y).abs().max()) <= 1e-5 * max(1.0, float(y.abs().max()))


def test_rows_of_different_lengths_in_one_call(tiny, hf):
    cfg, w = tiny
    ps = [prompt(5, seed=4), prompt(64, seed=4), prompt(1, seed=4)]
    dec = Decoder(cfg, w, max_batch=3, max_seq=128, backend="reference")
    dec.logits.fill_(float("nan"))
    out = dec.prefill(ps)
    assert out.shape == (3, cfg.vocab_size)
    for r, p in enumerate(ps):
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor([p])).logits[0, -1]
        assert rel_err(out[r], theirs) <= REL_TOL
    assert dec.next_positions == [5, 64, 1]


def test_second_turn_appends_like_one_prefill_of_the_concatenation(tiny):
    cfg, w = tiny
    first, second = prompt(40, seed=5), prompt(30, seed=6)
    chat = Decoder(cfg, w, max_batch=2, max_seq=128, backend="reference")
    whole = Decoder(cfg, w, max_batch=2, max_seq=128, backend="reference")
    chat.prefill([first, [3]])
    # decode two tokens in row 0, then append the second turn where it ended
    toks = [7, 9]
    for i, t in enumerate(toks):
        chat._forward(torch.tensor([t]), torch.tensor([len(first) + i]), 0, 1)
        chat.advance_positions([len(first) + i], first_row=0)
    before_row1 = states(chat, 1)
    l_chat = chat.prefill([second], start_positions=[len(first) + 2])[0].clone()
    l_whole = whole.prefill([first + toks + second])[0].clone()
    assert rel_err(l_chat, l_whole) <= REL_TOL
    for x, y in zip(states(chat, 0), states(whole, 0)):
        assert float((x - y).abs().max()) <= 1e-4 * max(1.0, float(y.abs().max()))
    for x, y in zip(states(chat, 1), before_row1):
        assert torch.equal(x, y)   # the other row is untouched
    assert chat.next_positions[0] == len(first) + 2 + len(second)


def test_padding_changes_no_state_and_no_logit(tiny):
    """A chunk padded with junk tokens past n_valid leaves exactly what the unpadded chunk leaves."""
    cfg, w = tiny
    p = prompt(20, seed=7)
    exact = Decoder(cfg, w, max_batch=2, max_seq=64, backend="reference")
    padded = Decoder(cfg, w, max_batch=2, max_seq=64, backend="reference")
    for d in (exact, padded):
        d.prefill([prompt(9, seed=8), prompt(9, seed=9)])   # both rows hold something
    info = torch.tensor([1, 9, len(p)])
    l1 = exact.prefill_step(32).forward(torch.tensor(p), info).clone()
    junk = torch.tensor(p + prompt(12, seed=10))
    l2 = padded.prefill_step(32).forward(junk, info).clone()
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-5)
    for x, y in zip(states(exact), states(padded)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    # cache slots past the chunk stay exactly zero
    assert padded.state.kv[:, :, 1, :, 9 + len(p):].abs().max() == 0


@pytest.mark.parametrize("bad, match", [
    ([[]], "prompt 0 is empty"),
    ([[1] * 65], "prompt 0 has 65 tokens: position 64 is outside the cache capacity max_seq=64"),
    ([[1, 256]], "token id 256 outside the vocabulary"),
])
def test_bad_prompts_name_the_value_and_write_nothing(tiny, bad, match):
    cfg, w = tiny
    dec = Decoder(cfg, w, max_batch=2, max_seq=64, backend="reference")
    dec.prefill([[5, 6, 7]])
    before, logits = states(dec), dec.logits.clone()
    with pytest.raises(ValueError, match=match):
        dec.prefill(bad)
    assert all(torch.equal(x, y) for x, y in zip(states(dec), before)) and torch.equal(dec.logits, logits)
    assert dec.next_positions[0] == 3


def test_start_position_must_continue_the_row(tiny):
    cfg, w = tiny
    dec = Decoder(cfg, w, max_batch=2, max_seq=64, backend="reference")
    dec.prefill([[5, 6, 7]])
    before = states(dec)
    with pytest.raises(ValueError, match="row 0: start position 5 given, but the row holds positions 0..2"):
        dec.prefill([[1, 2]], start_positions=[5])
    with pytest.raises(ValueError, match="start position -1"):
        dec.prefill([[1, 2]], start_positions=[-1])
    with pytest.raises(ValueError, match="2 start positions for 1 prompts"):
        dec.prefill([[1, 2]], start_positions=[3, 0])
    with pytest.raises(ValueError, match="position 64 is outside"):
        dec.prefill([[1] * 62], start_positions=[3])
    assert all(torch.equal(x, y) for x, y in zip(states(dec), before))
    dec.prefill([[1, 2]], start_positions=[3])      # the right continuation works afterwards
    assert dec.next_positions[0] == 5


def test_triton_kernels_equal_the_reference_path(tiny, device):
    """Triton prefill (interpreter on CPU, kernels on a GPU) against the reference path."""
    cfg = tiny[0]
    w = random_weights(cfg, device, torch.float32, seed=1)
    ps = [prompt(65, seed=11), prompt(3, seed=12)]
    ref = Decoder(cfg, w, max_batch=2, max_seq=128, backend="reference")
    tri = Decoder(cfg, w, max_batch=2, max_seq=128, backend="triton")
    tri.prefill_step(64)           # two chunks for the first prompt
    tri.logits.fill_(float("nan"))
    lr, lt = ref.prefill(ps).clone(), tri.prefill(ps).clone()
    assert rel_err(lt, lr) <= REL_TOL
    for x, y in zip(states(tri), states(ref)):
        assert float((x - y).abs().max()) <= 1e-4 * max(1.0, float(y.abs().max()))


def test_an_all_padding_chunk_changes_nothing(tiny, device):
    """n_valid = 0 (what a graph bucket no call reached is warmed up with: zeroed static inputs)
    runs without error and leaves every state as it was (Triton kernels; interpreter on CPU)."""
    cfg = tiny[0]
    w = random_weights(cfg, device, torch.float32, seed=1)
    dec = Decoder(cfg, w, max_batch=2, max_seq=64, backend="triton")
    dec.prefill([prompt(5, seed=13), prompt(7, seed=14)])
    before = states(dec)
    dec.prefill_step(16).forward(torch.tensor(prompt(16, seed=15), device=device),
                                 torch.tensor([1, 7, 0], device=device))
    assert all(torch.equal(x, y) for x, y in zip(states(dec), before))


@pytest.mark.parametrize("n", [5, 13, 16, 57])
def test_mm_splits_an_unaligned_width_into_aligned_rows_and_the_rest(n, monkeypatch):
    """out = x @ w.T into a row-padded buffer (as the router + shared projection's), every column
    written (the buffer is poisoned first); a width that is not a multiple of 8 (57: the tiny
    preset's router + shared rows) is two torch.mm calls, the first over the multiple of 8."""
    from model.ops.linear import dense
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(7, 32, generator=g), torch.randn(n, 32, generator=g)
    buf = torch.full((7, dense.aligned_width(n)), float("nan"))
    assert buf.shape[1] % 8 == 0 and buf.shape[1] - n < 8
    widths, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, out: (widths.append(b.shape[1]), mm(a, b, out=out)))
    dense.mm_rows_aligned(x, w, buf[:, :n])
    torch.testing.assert_close(buf[:, :n], x @ w.t(), atol=1e-5, rtol=1e-5)
    assert widths == ([n] if n % 8 == 0 or n < 8 else [n // 8 * 8, n % 8])
