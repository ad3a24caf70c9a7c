"""The decoder with MODEL_FUSED_ROUTER=1 (patched: settings are read at import): every layer's
router top-k runs in the router GEMV's epilogue (no router_topk launch), bf16-layout and int4
weights, and the tokens and logits agree with the reference backend over 16 greedy steps (CPU,
Triton's interpreter; tests/gpu/test_ops_route_gpu.py runs the 35b-a3b shapes)."""
import dataclasses

import pytest
import torch

from model.ops.moe import decode, route
from model.quant.build import random_int4_weights
from model.settings import SETTINGS
from model.weights import random_weights

from tests.int4_helpers import small_int4_config
from tests.launch_spy import RefuseLaunches
from tests.test_decoder_int4 import _greedy_both


@pytest.mark.parametrize("quant", [False, True])
def test_fused_router_decoder_matches_reference(monkeypatch, quant):
    monkeypatch.setattr(route, "SETTINGS", dataclasses.replace(SETTINGS, fused_router=True))
    monkeypatch.setattr(decode, "_router_topk_kernel",
                        RefuseLaunches("router_topk ran as a kernel of its own with MODEL_FUSED_ROUTER=1"))
    cfg = small_int4_config()
    w = (random_int4_weights(cfg, "cpu", torch.float32, seed=7, group_size=32, method="rtn") if quant
         else random_weights(cfg, "cpu", torch.float32, seed=7))
    decs, logits, tokens = _greedy_both(cfg, w, 16)
    assert tokens["triton"] == tokens["reference"] and len(set(tokens["triton"])) > 4
    for p, (a, b) in enumerate(zip(logits["triton"], logits["reference"])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {p}")
    assert int(decs["triton"].route_counter.item()) == 0
