"""Reliability under bad checkpoint files: config.json, generation_config.json, tokenizer.json.

Every bad value is a ConfigError / CheckpointError naming the file and the field (never an
AttributeError, TypeError or ZeroDivisionError from deep inside), and through the command line an
argparse-style error: exit code 2, the message on stderr, no traceback, nothing allocated.
"""
import json
import subprocess
import sys

import pytest

from model.checkpoint import CheckpointError, eos_token_ids, load_tokenizer
from model.config import ConfigError, ModelConfig

TINY = ModelConfig.preset("tiny").to_hf_dict()


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("config,needle", [
    ([], "must hold a JSON object {...}, it holds [] (a list)"),
    ("hello", "it holds 'hello' (a string)"),
    (TINY | {"num_hidden_layers": "four"},
     "field 'num_hidden_layers' must be an integer in [1, 2147483647], got 'four' (a string)"),
    (TINY | {"rope_parameters": "default"},
     "field 'rope_parameters' must be an object {...} or null, got 'default' (a string)"),
    (_without(TINY, "layer_types") | {"full_attention_interval": 0},
     "field 'full_attention_interval' must be an integer in [1, 2147483647], got 0"),
    (TINY | {"hidden_size": 32.0}, "field 'hidden_size' must be an integer"),
    (TINY | {"hidden_size": True}, "field 'hidden_size' must be an integer in [1, 2147483647], got True (a boolean)"),
    (TINY | {"vocab_size": -5}, "field 'vocab_size' must be an integer in [1, 2147483647], got -5"),
    (TINY | {"vocab_size": 2 ** 40}, "field 'vocab_size' must be an integer"),
    (TINY | {"num_experts_per_tok": [2]}, "field 'num_experts_per_tok' must be an integer"),
    (TINY | {"rms_norm_eps": 0}, "field 'rms_norm_eps' must be a finite number in (0, 1), got 0"),
    (TINY | {"rms_norm_eps": "1e-6"}, "field 'rms_norm_eps' must be a finite number in (0, 1), got '1e-6'"),
    (TINY | {"rope_parameters": {"rope_type": "default", "rope_theta": -1}},
     "field 'rope_parameters.rope_theta' must be a finite number in (0, inf), got -1"),
    (TINY | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 2}},
     "field 'rope_parameters.partial_rotary_factor' must be a finite number in (0, 1], got 2"),
    (TINY | {"rope_parameters": {"rope_type": 7, "rope_theta": 1e4}}, "field 'rope_parameters.rope_type' must be a string"),
    (TINY | {"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false, got 'yes'"),
    (TINY | {"hidden_act": ["silu"]}, "field 'hidden_act' must be a string"),
    (TINY | {"layer_types": "linear_attention"}, "field 'layer_types' must be a list of at least 4 entries"),
    (TINY | {"layer_types": ["linear_attention"] * 3}, "field 'layer_types' must be a list of at least 4 entries"),
    (TINY | {"layer_types": ["linear_attention", "sliding_attention"] * 2},
     "field 'layer_types'[1] is 'sliding_attention' (a string), expected one of"),
    (TINY | {"eos_token_id": [1, 256]}, "field 'eos_token_id' must be a token id or a non-empty list of token ids "
                                        "in [0, vocab_size=256), got [1, 256]"),
    (TINY | {"eos_token_id": []}, "field 'eos_token_id' must be a token id or a non-empty list"),
    (TINY | {"bos_token_id": "<s>"}, "field 'bos_token_id' must be a token id"),
    (_without(TINY, "num_experts"), "field 'num_experts' is required and missing"),
    (_without(TINY, "head_dim") | {"hidden_size": 30}, "field 'head_dim' is missing and hidden_size=30 is not a multiple"),
    (TINY | {"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (TINY | {"num_experts_per_tok": 9}, "num_experts_per_tok=9 not in [1, num_experts=8]"),
    ({"model_type": "qwen3_5_moe", "text_config": 5}, "field 'text_config' must be an object {...}, got 5"),
    ({"model_type": "qwen3_5_moe", "text_config": TINY | {"num_hidden_layers": 0}},
     "field 'text_config.num_hidden_layers' must be an integer in [1, 2147483647], got 0"),
])
def test_bad_config_json_is_a_config_error_naming_file_and_field(tmp_path, config, needle):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(tmp_path)
    msg = str(info.value)
    assert needle in msg and str(tmp_path / "config.json") in msg, msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text,needle", [
    ("{not json", "config.json is not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    ("", "config.json is not valid JSON"),
    ('{"vocab_size": 1', "config.json is not valid JSON"),
])
def test_config_json_that_is_not_json_is_named(tmp_path, text, needle):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="corrupt or was not downloaded completely") as info:
        ModelConfig.from_hf(tmp_path)
    assert needle in str(info.value)
    (tmp_path / "config.json").write_bytes(b'{"vocab_size": "\xff"}')
    with pytest.raises(ConfigError, match="config.json is not UTF-8 text"):
        ModelConfig.from_hf(tmp_path)


def test_a_dict_source_is_named_config_and_good_values_still_load():
    with pytest.raises(ConfigError, match="^config: field 'vocab_size'"):
        ModelConfig.from_hf(TINY | {"vocab_size": None, "hidden_size": 32})
    # every field written by to_hf_dict, and transformers' own dict, read back the same
    assert ModelConfig.from_hf(TINY) == ModelConfig.preset("tiny")
    assert ModelConfig.from_hf(TINY | {"eos_token_id": [1, 2]}).eos_token_id == (1, 2)
    assert ModelConfig.from_hf(_without(TINY, "head_dim") | {"hidden_size": 64}).head_dim == 16


# ---- generation_config.json and tokenizer.json ----------------------------------------------------
def test_eos_ids_come_from_generation_config_else_config(tmp_path):
    cfg = ModelConfig.from_hf(TINY | {"eos_token_id": 7})
    assert eos_token_ids(cfg, tmp_path) == (7,)             # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 9], "top_k": 20}))
    assert eos_token_ids(cfg, tmp_path) == (3, 9)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    assert eos_token_ids(cfg, tmp_path) == (4,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    assert eos_token_ids(cfg, tmp_path) == (7,)             # field absent: config.json's
    assert eos_token_ids(ModelConfig.from_hf(_without(TINY, "eos_token_id")), None) == ()
    for bad, needle in [("[1]", "must hold a JSON object"), ("{", "is not valid JSON"),
                        ('{"eos_token_id": "</s>"}', "field 'eos_token_id' must be a token id"),
                        ('{"eos_token_id": [1, 999]}', "in [0, vocab_size=256), got [1, 999]")]:
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(ConfigError, match="generation_config.json") as info:
            eos_token_ids(cfg, tmp_path)
        assert needle in str(info.value)


def test_corrupt_tokenizer_json_is_a_checkpoint_error_naming_it(tmp_path):
    assert load_tokenizer(tmp_path) is None
    for text in ["{", '{"model": 5}', ""]:
        (tmp_path / "tokenizer.json").write_text(text)
        with pytest.raises(CheckpointError, match=r"cannot read .*tokenizer\.json \(\d+ bytes\) as a tokenizer"):
            load_tokenizer(tmp_path)


# ---- through the command line -------------------------------------------------------------------
def _generate(argv, capsys):
    from model.generate import main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def _no_weights(monkeypatch):
    """Fail the test if the command gets as far as allocating weights."""
    import model.checkpoint
    import model.weights

    def boom(*a, **k):
        raise AssertionError("weights were allocated for a run that should have been refused")
    monkeypatch.setattr(model.weights, "random_weights", boom)
    monkeypatch.setattr(model.checkpoint, "load_checkpoint", boom)


@pytest.mark.parametrize("files,needle", [
    ({"config.json": "[]"}, "config.json must hold a JSON object"),
    ({"config.json": json.dumps(TINY | {"num_hidden_layers": "four"})}, "field 'num_hidden_layers'"),
    ({"config.json": json.dumps(_without(TINY, "layer_types") | {"full_attention_interval": 0})},
     "field 'full_attention_interval'"),
    ({"config.json": "{oops"}, "config.json is not valid JSON"),
    ({"config.json": json.dumps(TINY), "tokenizer.json": "{"}, "tokenizer.json"),
    ({"config.json": json.dumps(TINY), "generation_config.json": "[]"}, "generation_config.json must hold"),
])
def test_generate_refuses_bad_files_before_loading_weights(tmp_path, capsys, monkeypatch, files, needle):
    _no_weights(monkeypatch)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    err = _generate(["--checkpoint", str(tmp_path), "--prompt-ids", "1"], capsys)
    assert needle in err and f"--checkpoint {tmp_path}" in err, err


def test_generate_bad_config_as_a_user_sees_it(tmp_path):
    """A subprocess, as typed: exit code 2, the file named, no traceback."""
    (tmp_path / "config.json").write_text('"hello"')
    r = subprocess.run([sys.executable, "-m", "model.generate", "--checkpoint", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "config.json must hold a JSON object {...}, it holds 'hello' (a string)" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
