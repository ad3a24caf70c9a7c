"""`python -m model.generate` with int4: an int4 checkpoint decodes its dequantized weights (the
int4 reference math), `--quant int4` quantizes a bf16 checkpoint or a preset first; the tiny
preset's widths cannot be int4 and say so."""
import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.generate import main
from model.quant import (dequantize_weights, load_int4_checkpoint, map_weights, quantize_checkpoint,
                         quantize_weights)
from model.weights import random_weights

from tests.hf_reference import hf_model, ours_greedy

PROMPT = [3, 1, 4, 1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), moe_intermediate_size=32, shared_expert_intermediate_size=32)
    w = random_weights(cfg, "cpu", torch.bfloat16, seed=22)
    src = tmp_path_factory.mktemp("bf16")
    hf_model(cfg, w).save_pretrained(src)
    dst = tmp_path_factory.mktemp("q") / "int4"
    quantize_checkpoint(src, dst, method="hqq", group_size=32, progress=False)
    return cfg, w, src, dst


def _greedy(cfg, weights, n):
    dec = Decoder(cfg, weights, max_batch=1, max_seq=16, backend="reference")
    _, (tokens,) = ours_greedy(dec, [PROMPT], n)
    return tokens


def _generated(out):
    lines = out.strip().splitlines()
    assert lines[0].startswith("prompt (4 tokens)")
    return [int(t) for t in lines[1].split()]       # ids are printed as they come (no tokenizer)


def _float(w):
    return map_weights(w, lambda n, t: t.float())


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_int4_checkpoint_generates_its_reference_tokens(ckpts, cpu, capsys):
    cfg, w, _, dst = ckpts
    assert main(["--checkpoint", str(dst), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert "int4 checkpoint (hqq, group 32)" in err
    _, _, wd = load_int4_checkpoint(dst, dtype=torch.float32)
    want = _greedy(cfg, wd, 6)
    assert _generated(out) == want
    assert want != _greedy(cfg, _float(w), 6)          # (the bf16 model writes other tokens here)


def test_quant_int4_flag_on_a_bf16_checkpoint(ckpts, cpu, capsys):
    cfg, w, src, _ = ckpts
    assert main(["--checkpoint", str(src), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6",
                 "--quant", "int4", "--group-size", "32"]) == 0
    out, err = capsys.readouterr()
    assert "--quant int4: decoding the dequantized int4 weights (hqq, group 32" in err
    want = _greedy(cfg, dequantize_weights(quantize_weights(_float(w), 32, "hqq")), 6)
    assert _generated(out) == want and want != _greedy(cfg, _float(w), 6)


def test_tiny_preset_cannot_be_int4(cpu, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--quant", "int4", "--group-size", "32", "--max-new-tokens", "2"])
    assert e.value.code == 2
    assert "--quant int4: layers.0.moe.down_proj: K=16" in capsys.readouterr().err
