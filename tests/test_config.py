"""ModelConfig: presets, derived shapes, Hugging Face config.json in and out, cost model."""
import dataclasses
import json
import warnings

import pytest

from model.config import FULL, LINEAR, ConfigError, ModelConfig


def test_presets_have_every_feature_and_real_shapes():
    tiny = ModelConfig.preset("tiny")
    assert set(tiny.layer_types) == {LINEAR, FULL}
    assert tiny.num_attention_heads > tiny.num_key_value_heads                 # GQA
    assert 0 < tiny.rotary_dim < tiny.head_dim                                 # partial rope
    assert tiny.linear_num_value_heads > tiny.linear_num_key_heads             # key-head sharing
    assert tiny.shared_expert_intermediate_size > 0 and tiny.num_experts_per_tok > 1

    c = ModelConfig.preset("35b-a3b")
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.head_dim, c.rotary_dim) == (248320, 2048, 40, 256, 64)
    assert c.layer_types[3] == FULL and c.layer_types[0] == LINEAR and len(c.attn_layers) == 10
    assert c.conv_dim == 8192 and c.gdn_in_proj_rows == 8192 + 4096 + 64
    assert c.attn_qkv_rows == 16 * 512 + 2 * 2 * 256
    assert c.router_shared_rows == 256 + 1024 + 1
    big = ModelConfig.preset("122b-a10b")
    assert (big.hidden_size, big.num_layers, big.num_attention_heads, big.linear_num_value_heads,
            big.moe_intermediate_size) == (3072, 48, 32, 64, 1024)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ModelConfig.preset("nope")


def test_bytes_per_token_matches_design():
    c = ModelConfig.preset("35b-a3b")
    a = c.weight_counts()["active"]
    assert abs(c.bytes_per_token(2) / 1e9 - 5.9) < 0.05
    assert abs(a["lm_head"] * 2 / 1e9 - 1.02) < 0.01 and abs(a["gdn"] * 2 / 1e9 - 2.0) < 0.05
    assert abs(a["experts"] * 2 / 1e9 - 2.0) < 0.05 and abs(a["attention"] * 2 / 1e9 - 0.55) < 0.01
    assert c.bytes_per_token(2, batch=4) > c.bytes_per_token(2)
    assert abs(c.total_weight_bytes(2) / 1e9 - 69.3) < 0.5


def test_replace_num_layers_keeps_first_layers():
    c = dataclasses.replace(ModelConfig.preset("35b-a3b"), num_layers=5)
    assert c.layer_types == (LINEAR, LINEAR, LINEAR, FULL, LINEAR)


def test_hf_round_trip_top_level_and_nested(tmp_path):
    tiny = ModelConfig.preset("tiny")
    d = tiny.to_hf().to_dict()
    assert ModelConfig.from_hf(d) == tiny
    nested = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
              "text_config": d, "vision_config": {"depth": 2}, "image_token_id": 5}
    (tmp_path / "config.json").write_text(json.dumps(nested))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_hf(tmp_path) == tiny
        assert ModelConfig.from_hf(tmp_path / "config.json") == tiny


def test_hf_defaults_layer_types_and_rope_fields():
    d = ModelConfig.preset("35b-a3b").to_hf_dict()
    del d["layer_types"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True}
    c = ModelConfig.from_hf(d)
    assert c.layer_types == ModelConfig.preset("35b-a3b").layer_types and c.rotary_dim == 64


def test_hf_unknown_and_unsupported_fields():
    d = ModelConfig.preset("tiny").to_hf_dict()
    with pytest.raises(ConfigError, match="some_new_knob=3"):
        ModelConfig.from_hf({**d, "some_new_knob": 3})
    with pytest.warns(UserWarning, match="some_new_knob"):
        ModelConfig.from_hf({**d, "some_new_knob": 3}, strict=False)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        ModelConfig.from_hf({**d, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        ModelConfig.from_hf({**d, "hidden_act": "gelu"})
    missing = dict(d)
    del missing["num_experts"]
    with pytest.raises(ValueError, match="num_experts"):
        ModelConfig.from_hf(missing)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_hf("/nonexistent/dir")


def test_invalid_shapes_rejected():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        dataclasses.replace(ModelConfig.preset("tiny"), num_key_value_heads=3)
    with pytest.raises(ValueError, match="layer_types"):
        dataclasses.replace(ModelConfig.preset("tiny"), num_layers=9)
