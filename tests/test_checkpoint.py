"""load_checkpoint: transformers' save_pretrained output, fused experts, multimodal prefixes with
extra groups, sharded index, dtype handling, and the errors for bad checkpoints."""
import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint
from model.config import ModelConfig
from model.decoder import Decoder
from model.weights import random_weights

from tests.checkpoint_files import per_expert, write_checkpoint
from tests.hf_reference import hf_greedy, hf_model, ours_greedy

PROMPT = [9, 8, 7, 100, 200]


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    return cfg, random_weights(cfg, "cpu", torch.float32, seed=2)


def _same_weights(a, b):
    na, nb = dict(a.tensors()), dict(b.tensors())
    assert na.keys() == nb.keys()
    for k in na:
        assert torch.equal(na[k], nb[k].to(na[k].dtype)), k


def test_save_pretrained_checkpoint_loads_and_matches_transformers(tiny, tmp_path):
    cfg, w = tiny
    model = hf_model(cfg, w)
    model.save_pretrained(tmp_path)
    cfg2, w2 = load_checkpoint(tmp_path, device="cpu")
    assert cfg2 == cfg and w2.dtype == torch.float32
    _same_weights(w, w2)
    hf_logits, hf_tokens = hf_greedy(model, PROMPT, 4)
    dec = Decoder(cfg2, w2, max_batch=1, max_seq=32, backend="reference")
    logits, tokens = ours_greedy(dec, [PROMPT], 4)
    assert tokens[0] == hf_tokens
    assert max(float((a - b).abs().max()) for a, b in zip(logits[0], hf_logits)) <= 1e-4


def test_fused_experts_layout(tiny, tmp_path):
    cfg, w = tiny
    sd = w.to_hf_state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    write_checkpoint(tmp_path, sd, cfg.to_hf_dict())
    _, w2 = load_checkpoint(tmp_path, device="cpu")
    _same_weights(w, w2)


def test_multimodal_prefix_extras_nested_config_sharded(tiny, tmp_path, capsys):
    cfg, w = tiny
    sd = {}
    for k, v in per_expert(w.to_hf_state_dict(), cfg).items():
        sd[k if k.startswith("lm_head") else "model.language_model." + k[len("model."):]] = v
    sd["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(6, 4)
    sd["model.visual.merger.linear_fc1.weight"] = torch.zeros(4, 4)
    sd["mtp.fc.weight"] = torch.zeros(4, 8)
    config = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
              "text_config": cfg.to_hf_dict(), "vision_config": {"depth": 1}, "tie_word_embeddings": False}
    write_checkpoint(tmp_path, sd, config, shards=3)
    cfg2, w2 = load_checkpoint(tmp_path, device="cpu")
    assert cfg2 == cfg
    _same_weights(w, w2)
    err = capsys.readouterr().err
    assert "model.visual. (2)" in err and "mtp. (1)" in err


def test_dtype_converted_on_request_only(tiny, tmp_path):
    cfg, w = tiny
    sd = w.to_hf_state_dict()
    write_checkpoint(tmp_path / "a", sd, cfg.to_hf_dict())
    _, wb = load_checkpoint(tmp_path / "a", device="cpu", dtype=torch.bfloat16)
    assert wb.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for _, t in wb.tensors())
    assert torch.equal(wb.embed, w.embed.to(torch.bfloat16))

    mixed = dict(sd)
    mixed["model.layers.0.linear_attn.A_log"] = sd["model.layers.0.linear_attn.A_log"].to(torch.bfloat16)
    write_checkpoint(tmp_path / "b", mixed, cfg.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.linear_attn\.A_log is bfloat16 .*float32.*dtype="):
        load_checkpoint(tmp_path / "b", device="cpu")
    _, w3 = load_checkpoint(tmp_path / "b", device="cpu", dtype=torch.float32)
    assert w3.dtype == torch.float32


def test_missing_tensor(tiny, tmp_path):
    cfg, w = tiny
    sd = dict(w.to_hf_state_dict())
    del sd["model.layers.3.self_attn.k_norm.weight"]
    write_checkpoint(tmp_path / "a", sd, cfg.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"lacks .*layers\.3\.self_attn\.k_norm\.weight \[16\]"):
        load_checkpoint(tmp_path / "a", device="cpu")

    per = per_expert(w.to_hf_state_dict(), cfg)
    del per["model.layers.1.mlp.experts.5.up_proj.weight"]
    write_checkpoint(tmp_path / "b", per, cfg.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.5\.up_proj\.weight \[16, 32\]"):
        load_checkpoint(tmp_path / "b", device="cpu")


def test_unexpected_tensor(tiny, tmp_path):
    cfg, w = tiny
    sd = dict(w.to_hf_state_dict())
    sd["model.layers.0.mlp.mystery.weight"] = torch.zeros(3, 3)
    write_checkpoint(tmp_path, sd, cfg.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.mystery\.weight \[3, 3\]"):
        load_checkpoint(tmp_path, device="cpu")


def test_unexpected_expert_index(tiny, tmp_path):
    cfg, w = tiny
    per = per_expert(w.to_hf_state_dict(), cfg)
    per["model.layers.0.mlp.experts.8.down_proj.weight"] = torch.zeros(32, 16)
    write_checkpoint(tmp_path, per, cfg.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.8\.down_proj"):
        load_checkpoint(tmp_path, device="cpu")


def test_misshaped_tensor(tiny, tmp_path):
    cfg, w = tiny
    sd = dict(w.to_hf_state_dict())
    sd["model.layers.2.linear_attn.in_proj_z.weight"] = torch.zeros(60, 32)
    write_checkpoint(tmp_path / "a", sd, cfg.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"in_proj_z\.weight has shape \[60, 32\], the config expects \[64, 32\]"):
        load_checkpoint(tmp_path / "a", device="cpu")
    sd = dict(w.to_hf_state_dict())
    sd["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(8, 30, 32)
    write_checkpoint(tmp_path / "b", sd, cfg.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"gate_up_proj has shape \[8, 30, 32\], the config expects \[8, 32, 32\]"):
        load_checkpoint(tmp_path / "b", device="cpu")


def test_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path, device="cpu")
