"""int4 weights in the decoder's fused layout (model/quant/layout.py): quantizing our layout equals
reading the int4 checkpoint into it (both expert layouts), dequantizing equals the dequantizing
checkpoint loader, and the unchanged reference decoder runs the int4 model."""
import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.quant import (QuantizedLinear, dequantize_weights, int4_fields, is_int4_field, load_int4_checkpoint,
                         load_int4_weights, map_weights, quantize_checkpoint, quantize_weights)
from model.quant.layout import nbytes
from model.weights import random_weights

from tests.hf_reference import hf_model, ours_greedy


def _cfg():
    return dataclasses.replace(ModelConfig.preset("tiny"), moe_intermediate_size=32,
                               shared_expert_intermediate_size=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = _cfg()
    w = random_weights(cfg, "cpu", torch.bfloat16, seed=11)
    src = tmp_path_factory.mktemp("bf16")
    hf_model(cfg, w).save_pretrained(src)          # experts one tensor per expert
    dst = tmp_path_factory.mktemp("q") / "int4"
    quantize_checkpoint(src, dst, method="hqq", group_size=32, lm_head="int4", progress=False)
    return cfg, w, dst


def _equal_layouts(a, b):
    fa, fb = dict(int4_fields(a)), dict(int4_fields(b))
    assert fa.keys() == fb.keys() and fa
    for n in fa:
        assert fa[n].shape == fb[n].shape, n
        for part in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(fa[n], part), getattr(fb[n], part)), (n, part)


def test_checkpoint_and_in_memory_quantization_agree(model):
    cfg, w, dst = model
    cfg2, qcfg, wq = load_int4_weights(dst)
    assert cfg2 == cfg and qcfg.lm_head == "int4"
    assert isinstance(wq.layers[0].mixer.in_proj, QuantizedLinear)
    assert wq.layers[0].mixer.in_proj.shape == tuple(w.layers[0].mixer.in_proj.shape)
    assert isinstance(wq.lm_head, QuantizedLinear) and torch.equal(wq.embed, w.embed)
    assert torch.equal(wq.layers[2].mixer.conv, w.layers[2].mixer.conv)
    _equal_layouts(wq, quantize_weights(w, 32, "hqq", lm_head="int4"))
    n_fields = sum(is_int4_field(n, "int4") for n, _ in w.tensors())
    assert len(int4_fields(wq)) == n_fields == 6 * cfg.num_layers + 1   # 2 mixer + 4 MoE a layer, lm_head
    assert nbytes(wq) < 0.45 * w.nbytes()


def test_dequantized_layout_equals_the_dequantizing_loader(model):
    _, _, dst = model
    _, _, wq = load_int4_weights(dst)
    _, _, wd = load_int4_checkpoint(dst)
    a, b = dict(dequantize_weights(wq).tensors()), dict(wd.tensors())
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


def test_reference_decoder_runs_the_int4_model(model):
    cfg, w, _ = model
    g = torch.Generator().manual_seed(0)
    # transformers' init (std 0.02) on every linear: the regime where int4 keeps the logits close
    w = map_weights(w, lambda n, t: (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype)
                    if is_int4_field(n, "bf16") else t)
    wq = quantize_weights(w, 32, "hqq")
    assert not isinstance(wq.lm_head, QuantizedLinear)           # lm_head bf16 by default
    prompt = [[5, 17, 42, 7]]
    logits = []
    for weights in (dequantize_weights(wq, torch.float32), dequantize_weights(w, torch.float32)):
        dec = Decoder(cfg, weights, max_batch=1, max_seq=16, backend="reference")
        (lg,), _ = ours_greedy(dec, prompt, 1)
        logits.append(lg[0])
    a, b = logits
    assert bool(torch.isfinite(a).all())
    rel = float((a - b).norm() / b.norm())
    assert 0.0005 < rel < 0.05, rel                              # int4 moved the logits, and not far


def test_quantize_weights_refuses_ungroupable_and_tied(model):
    cfg, w, _ = model
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.in_proj: K=32 .*group_size=64"):
        quantize_weights(w, 64)
    tiny = random_weights(ModelConfig.preset("tiny"), "cpu", torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match=r"layers\.0\.moe\.down_proj: K=16"):
        quantize_weights(tiny, 32)
    with pytest.raises(ValueError, match="lm_head must be one of"):
        quantize_weights(w, 32, lm_head="fp8")
