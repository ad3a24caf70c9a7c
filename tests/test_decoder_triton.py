"""The decoder's Triton path against its reference path on the tiny preset (on CPU the kernels run
under TRITON_INTERPRET=1, set by conftest): logits, greedy tokens and every state buffer."""
import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.weights import random_weights

from tests.hf_reference import ours_greedy

PROMPTS = [[5, 17, 200, 42], [1, 2, 3]]
STEPS = 3


def test_triton_path_matches_reference(device):
    cfg = ModelConfig.preset("tiny")
    w = random_weights(cfg, device, torch.float32, seed=4)
    ref = Decoder(cfg, w, max_batch=2, max_seq=16, backend="reference")
    tri = Decoder(cfg, w, max_batch=2, max_seq=16, backend="triton")
    for d in (ref, tri):                 # poison: an unwritten element shows as NaN
        d.logits.fill_(float("nan"))
    ref_logits, ref_tokens = ours_greedy(ref, PROMPTS, STEPS)
    tri_logits, tri_tokens = ours_greedy(tri, PROMPTS, STEPS)
    assert tri_tokens == ref_tokens
    for r in range(len(PROMPTS)):
        for a, b in zip(ref_logits[r], tri_logits[r]):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri.state.kv, ref.state.kv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.state.conv, ref.state.conv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.state.recurrent, ref.state.recurrent, atol=1e-4, rtol=1e-4)
    assert int(tri.kv_error_flag.item()) == 0


def test_triton_path_flags_position_past_capacity(device):
    cfg = ModelConfig.preset("tiny")
    w = random_weights(cfg, device, torch.float32, seed=4)
    tri = Decoder(cfg, w, max_batch=1, max_seq=4, backend="triton")
    before = tri.state.kv.clone()
    # forward(): the raw (graph) step, without decode_step's host-side checks (which refuse this)
    out = tri.forward(torch.tensor([3], device=device), torch.tensor([4], device=device))
    assert torch.equal(before, tri.state.kv)      # nothing written outside (or inside) the cache
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="outside the cache capacity max_seq=4"):
        tri.check_kv_error()
