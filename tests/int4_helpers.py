"""Small int4 models for the decoder tests, and the probe for the int4 prefill.

The tiny preset cannot be int4 (expert widths 16 and 24 are not a multiple of 32): the tests use
it with both widths set to 32 (docs/int4.md). `small_int4_config` also cuts it to one GDN and one
attention layer with fewer heads, a 64-token vocabulary and 4 experts, so that 64 Triton steps
under the CPU interpreter take seconds, not minutes; every kind of projection is still int4.
"""
from __future__ import annotations

import dataclasses

import torch

from model.config import FULL, LINEAR, ModelConfig

from tests.needs import skip


def tiny32() -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), moe_intermediate_size=32,
                               shared_expert_intermediate_size=32)


def small_int4_config() -> ModelConfig:
    return dataclasses.replace(tiny32(), vocab_size=64, num_layers=2, layer_types=(LINEAR, FULL),
                               num_attention_heads=2, num_key_value_heads=1, linear_num_key_heads=1,
                               linear_num_value_heads=2, num_experts=4)


def need_int4_prefill() -> None:
    """skip() (tests/needs.py: a failure under CUGRAPH_RT_REQUIRE_GPU=1) while Decoder.prefill
    cannot run int4 weights. The int4 prefill is model/prefill.py's, built on another branch
    (int4pre) that the lead merges with this one; any other error of the probe propagates."""
    from model.decoder import Decoder
    from model.quant.build import random_int4_weights

    cfg = small_int4_config()
    w = random_int4_weights(cfg, "cpu", torch.float32, 0, 32, "rtn")
    dec = Decoder(cfg, w, max_batch=1, max_seq=4, backend="reference")
    try:
        dec.prefill([[1, 2]])
    except AttributeError as e:
        if "QuantizedLinear" not in str(e):
            raise
        skip(f"needs the int4 prefill (model/prefill.py on the int4pre branch; not merged here): {e}")
