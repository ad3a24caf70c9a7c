"""The decoder with MODEL_FUSED_CONV=1 (patched: settings are read at import): every GDN layer's
conv1d runs inside the gated-delta kernel (no conv1d_update launch), and the tokens, logits and
final states agree with the reference backend over 16 greedy steps, and with the unfused Triton
decoder bit for bit (CPU, Triton's interpreter)."""
import dataclasses

import torch

from model.config import LINEAR
from model.ops import conv
from model.ops.gated_delta import step
from model.settings import SETTINGS
from model.weights import random_weights

from tests.int4_helpers import small_int4_config
from tests.launch_spy import CountLaunches
from tests.test_decoder_int4 import _greedy_both


def test_fused_conv_decoder_matches_reference_and_the_unfused_decoder(monkeypatch):
    cfg = small_int4_config()
    w = random_weights(cfg, "cpu", torch.float32, seed=8)
    counted = CountLaunches(conv._conv1d_update_kernel)
    monkeypatch.setattr(conv, "_conv1d_update_kernel", counted)
    _, unfused_logits, unfused_tokens = _greedy_both(cfg, w, 16)
    gdn_layers = sum(1 for t in cfg.layer_types if t == LINEAR)
    assert counted.launches == 16 * gdn_layers > 0
    monkeypatch.setattr(step, "SETTINGS", dataclasses.replace(SETTINGS, fused_conv=True))
    decs, logits, tokens = _greedy_both(cfg, w, 16)
    assert counted.launches == 16 * gdn_layers, "conv1d_update ran with MODEL_FUSED_CONV=1"
    assert tokens["triton"] == tokens["reference"] == unfused_tokens["triton"] and len(set(tokens["triton"])) > 4
    for p, (a, b, u) in enumerate(zip(logits["triton"], logits["reference"], unfused_logits["triton"])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {p}")
        assert torch.equal(a, u), p
    tri, ref = decs["triton"].state, decs["reference"].state
    for name in ("conv", "recurrent"):
        torch.testing.assert_close(getattr(tri, name), getattr(ref, name), atol=1e-4, rtol=1e-4, msg=name)
    assert int(decs["triton"].conv_counters.abs().sum()) == 0
