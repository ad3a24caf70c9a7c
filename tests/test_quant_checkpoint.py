"""int4 checkpoints: `quantize_checkpoint` / `python -m model.quantize` on a transformers-written
checkpoint (both expert layouts), the written quantization_config, bit-identical round trip,
the dequantizing loader, and the refusals that name the tensor."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_checkpoint
from model.config import ModelConfig
from model.config_checks import ConfigError
from model.quant import (QuantizedLinear, is_linear, load_int4_checkpoint, quantize, quantize_checkpoint,
                         read_int4, read_quantization_config)
from model.quantize import main
from model.weights import random_weights

from tests.hf_reference import hf_model


def _cfg():
    # the tiny preset with every K a multiple of 32 (its expert widths 16 and 24 are not)
    return dataclasses.replace(ModelConfig.preset("tiny"), moe_intermediate_size=32,
                               shared_expert_intermediate_size=32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A transformers save_pretrained checkpoint (bf16, experts one tensor per expert) with side
    files, and its int4 copy (hqq, group 32)."""
    cfg = _cfg()
    w = random_weights(cfg, "cpu", torch.bfloat16, seed=3)
    src = tmp_path_factory.mktemp("bf16")
    hf_model(cfg, w).save_pretrained(src)
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    dst = tmp_path_factory.mktemp("q") / "int4"
    qcfg = quantize_checkpoint(src, dst, method="hqq", group_size=32, progress=False)
    return cfg, w, src, dst, qcfg


def _stem(name):
    return name[: -len(".weight")] if name.endswith(".weight") else name


def test_written_checkpoint_is_self_describing_and_bit_identical(ckpts):
    cfg, w, src, dst, qcfg = ckpts
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {
        "method": "hqq", "group_size": 32, "lm_head": "bf16", "scale_dtype": "bfloat16", "bits": 4,
        "quant_method": "cugraph_rt_int4", "packing": "int32_k8_low_nibble_first"}
    assert read_quantization_config(dst) == qcfg
    for f in ("tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_text() == (src / f).read_text()
    ins, outs = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    n_int4 = 0
    for name, t in ins.items():
        canon = name[len("model."):] if name.startswith("model.") else name
        if is_linear(canon):
            n_int4 += 1
            want = quantize(t, 32, "hqq")
            for part in ("qweight", "scales", "zeros"):
                assert torch.equal(outs.pop(f"{_stem(name)}.{part}"), getattr(want, part)), (name, part)
        else:
            assert torch.equal(outs.pop(name), t), name
    assert not outs                                   # nothing else was written
    assert n_int4 > 3 * cfg.num_experts               # per-expert tensors included
    assert "lm_head.weight" in ins and not is_linear("lm_head.weight")


def test_read_int4_and_dequantizing_loader(ckpts):
    cfg, w, src, dst, _ = ckpts
    cfg2, qcfg, tensors = read_int4(dst)
    assert cfg2 == cfg and qcfg.group_size == 32
    ql = tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert isinstance(ql, QuantizedLinear) and ql.shape == (cfg.hidden_size, 32)
    assert not isinstance(tensors["model.embed_tokens.weight"], QuantizedLinear)

    cfg3, _, wq = load_int4_checkpoint(dst)
    assert cfg3 == cfg and wq.dtype == torch.bfloat16
    assert torch.equal(wq.embed, w.embed) and torch.equal(wq.lm_head, w.lm_head)
    assert torch.equal(wq.layers[0].input_norm, w.layers[0].input_norm)
    moe, moe0 = wq.layers[1].moe, w.layers[1].moe
    assert torch.equal(moe.down_proj[3], quantize(moe0.down_proj[3], 32, "hqq").dequantize())
    I = cfg.moe_intermediate_size
    assert torch.equal(moe.gate_up_proj[5, I:], quantize(moe0.gate_up_proj[5, I:], 32, "hqq").dequantize())
    for got, ref in ((wq.layers[0].mixer.in_proj, w.layers[0].mixer.in_proj), (moe.gate_up_proj, moe0.gate_up_proj),
                     (wq.layers[3].mixer.o_proj, w.layers[3].mixer.o_proj)):
        err = float((got.float() - ref.float()).norm() / ref.float().norm())
        assert 0.01 < err < 0.15                      # quantized, and closely


def test_fused_expert_layout_gives_the_same_model(ckpts, tmp_path):
    cfg, w, src, _, _ = ckpts
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((src / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in w.to_hf_state_dict().items()}, str(tmp_path / "fused" / "model.safetensors"))
    quantize_checkpoint(tmp_path / "fused", tmp_path / "qf", method="rtn", group_size=32, progress=False,
                        shard_bytes=20_000)          # several shards and an index
    quantize_checkpoint(src, tmp_path / "qp", method="rtn", group_size=32, progress=False)
    assert (tmp_path / "qf" / "model.safetensors.index.json").is_file()
    _, _, t = read_int4(tmp_path / "qf")
    assert t["model.layers.0.mlp.experts.gate_up_proj"].qweight.shape == (cfg.num_experts, 64, cfg.hidden_size // 8)
    _, _, a = load_int4_checkpoint(tmp_path / "qf")
    _, _, b = load_int4_checkpoint(tmp_path / "qp")
    for (na, ta), (nb, tb) in zip(a.tensors(), b.tensors()):
        assert na == nb and torch.equal(ta, tb), na


def _tampered(dst, tmp_path, edit_tensors=None, edit_qcfg=None):
    out = tmp_path / "bad"
    shutil.copytree(dst, out)
    if edit_tensors:
        sd = load_file(str(out / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(out / "model.safetensors"))
    if edit_qcfg:
        c = json.loads((out / "config.json").read_text())
        edit_qcfg(c["quantization_config"])
        (out / "config.json").write_text(json.dumps(c))
    return out


L0 = "model.layers.0.linear_attn.out_proj"


def _set(d, k, v):
    d[k] = v


@pytest.mark.parametrize("edit_tensors, edit_qcfg, err, match", [
    (lambda sd: _set(sd, f"{L0}.qweight", sd[f"{L0}.qweight"][:, :4].contiguous()), None, CheckpointError,
     rf"{L0}\.scales has shape \[32, 2\], expected \[32, 1\] for {L0}\.qweight \[32, 4\] .*group_size=32"),
    (lambda sd: _set(sd, f"{L0}.scales", sd[f"{L0}.scales"][:, :1].contiguous()), None, CheckpointError,
     rf"{L0}\.scales has shape \[32, 1\], expected \[32, 2\]"),
    (lambda sd: _set(sd, f"{L0}.qweight", sd[f"{L0}.qweight"].to(torch.int64)), None, CheckpointError,
     rf"{L0}\.qweight is torch\.int64, expected int32"),
    (lambda sd: sd.pop(f"{L0}.zeros"), None, CheckpointError, rf"int4 tensor {L0} lacks {L0}\.zeros"),
    (lambda sd: _set(sd, f"{L0}.weight", torch.zeros(32, 64, dtype=torch.bfloat16)), None, CheckpointError,
     rf"{L0}\.weight is stored both unquantized and as int4"),
    (None, lambda q: _set(q, "group_size", 64), CheckpointError,
     r"model\.layers\.\d+\.\S+\.qweight \[.*\] stands for K=32, which is not a multiple of quantization_config\.group_size=64"),
    (None, lambda q: _set(q, "scale_dtype", "float16"), CheckpointError,
     r"\.scales is torch\.bfloat16, but quantization_config\.scale_dtype is float16"),
    (None, lambda q: _set(q, "lm_head", "int4"), CheckpointError,
     r"lm_head\.weight is stored unquantized, but quantization_config \(lm_head='int4'\) says it is int4"),
    (None, lambda q: _set(q, "bits", 8), ConfigError, r"quantization_config\.bits is 8"),
    (None, lambda q: _set(q, "zero_point", True), ConfigError, r"unknown quantization_config field\(s\) \['zero_point'\]"),
    (None, lambda q: q.update(quant_method="gptq", desc_act=False), ConfigError,
     r"quant_method is 'gptq'; this decoder reads only its own int4 format .*python -m model\.quantize"),
])
def test_disagreeing_checkpoint_is_refused_naming_the_tensor(ckpts, tmp_path, edit_tensors, edit_qcfg, err, match):
    bad = _tampered(ckpts[3], tmp_path, edit_tensors, edit_qcfg)
    with pytest.raises(err, match=match):
        load_int4_checkpoint(bad)


def test_shape_against_model_config_names_the_stored_tensor(ckpts, tmp_path):
    name = "model.layers.3.self_attn.o_proj"          # K = 64: two words fewer still groups evenly
    bad = _tampered(ckpts[3], tmp_path, lambda sd: [_set(sd, f"{name}.{p}", sd[f"{name}.{p}"][:, :n].contiguous())
                                                    for p, n in (("qweight", 4), ("scales", 1), ("zeros", 1))])
    with pytest.raises(CheckpointError, match=rf"{name}\.weight \(stored int4 as {name}\.qweight\) has shape "
                                              rf"\[32, 32\], the config expects \[32, 64\]"):
        load_int4_checkpoint(bad)


def test_loaders_refuse_the_other_kind(ckpts):
    _, _, src, dst, _ = ckpts
    with pytest.raises(CheckpointError, match="is an int4 checkpoint .*load_int4_checkpoint"):
        load_checkpoint(dst, device="cpu")
    with pytest.raises(CheckpointError, match="has no quantization_config"):
        load_int4_checkpoint(src)


def test_cli(ckpts, tmp_path, capsys):
    _, _, src, dst, _ = ckpts
    out = tmp_path / "o"
    assert main(["--checkpoint", str(src), "--out", str(out), "--method", "rtn", "--group-size", "32",
                 "--lm-head", "int4", "--scale-dtype", "fp16", "--device", "cpu", "--quiet"]) == 0
    q = read_quantization_config(out)
    assert (q.method, q.lm_head, q.scale_dtype) == ("rtn", "int4", "float16")
    _, _, t = read_int4(out)
    assert isinstance(t["lm_head.weight"], QuantizedLinear) and t["lm_head.weight"].scales.dtype == torch.float16

    capsys.readouterr()
    assert main(["--checkpoint", str(src), "--out", str(tmp_path / "g64"), "--group-size", "64", "--quiet"]) == 2
    assert "K=32" in capsys.readouterr().err and not (tmp_path / "g64").exists()
    assert main(["--checkpoint", str(src), "--out", str(out), "--quiet"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["--checkpoint", str(dst), "--out", str(tmp_path / "again"), "--quiet"]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(src), "--out", str(tmp_path / "x"), "--group-size", "16"])
    assert e.value.code == 2


def test_tied_lm_head_cannot_be_int4(tmp_path):
    cfg = dataclasses.replace(_cfg(), tie_word_embeddings=True)
    w = random_weights(cfg, "cpu", torch.bfloat16, seed=1)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in w.to_hf_state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "t" / "model.safetensors"))
    with pytest.raises(ValueError, match="tied embeddings"):
        quantize_checkpoint(tmp_path / "t", tmp_path / "o", lm_head="int4", group_size=32, progress=False)
    quantize_checkpoint(tmp_path / "t", tmp_path / "o", group_size=32, progress=False)
    _, _, wq = load_int4_checkpoint(tmp_path / "o")
    assert wq.lm_head is wq.embed and torch.equal(wq.embed, w.embed)
