"""Small int4 models for the decoder tests.

The tiny preset cannot be int4 (expert widths 16 and 24 are not a multiple of 32): the tests use
it with both widths set to 32 (docs/int4.md). `small_int4_config` also cuts it to one GDN and one
attention layer with fewer heads, a 64-token vocabulary and 4 experts, so that 64 Triton steps
under the CPU interpreter take seconds, not minutes; every kind of projection is still int4.
"""
from __future__ import annotations

import dataclasses


from model.config import FULL, LINEAR, ModelConfig


def tiny32() -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), moe_intermediate_size=32,
                               shared_expert_intermediate_size=32)


def small_int4_config() -> ModelConfig:
    return dataclasses.replace(tiny32(), vocab_size=64, num_layers=2, layer_types=(LINEAR, FULL),
                               num_attention_heads=2, num_key_value_heads=1, linear_num_key_heads=1,
                               linear_num_value_heads=2, num_experts=4)
