"""`python -m model.generate` with int4: an int4 checkpoint keeps its int4 weights (the int4
kernels), `--quant int4` quantizes a bf16 checkpoint while it loads, `--quant int4-dequant` runs
the dequantized int4 model (the reference math) through the bf16 kernels; the tiny preset's widths
cannot be int4 and say so."""
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


def _main_tokens(argv, capsys):
    assert main(argv + ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    return _generated(out), err


def test_int4_checkpoint_dequant_generates_its_reference_tokens(ckpts, cpu, capsys):
    cfg, w, _, dst = ckpts
    tokens, err = _main_tokens(["--checkpoint", str(dst), "--quant", "int4-dequant"], capsys)
    assert ("note: int4 checkpoint: int4 (hqq, group 32, lm_head bf16) through the bf16 kernels on its "
            "dequantized weights") in err
    _, _, wd = load_int4_checkpoint(dst, dtype=torch.float32)
    want = _greedy(cfg, wd, 6)
    assert tokens == want
    assert want != _greedy(cfg, _float(w), 6)          # (the bf16 model writes other tokens here)


def test_quant_int4_dequant_flag_on_a_bf16_checkpoint(ckpts, cpu, capsys):
    cfg, w, src, _ = ckpts
    tokens, err = _main_tokens(["--checkpoint", str(src), "--quant", "int4-dequant", "--group-size", "32"], capsys)
    assert "note: --quant int4-dequant: int4 (hqq, group 32, lm_head bf16) through the bf16 kernels" in err
    want = _greedy(cfg, dequantize_weights(quantize_weights(_float(w), 32, "hqq")), 6)
    assert tokens == want and want != _greedy(cfg, _float(w), 6)


def test_quant_int4_keeps_the_weights_int4(ckpts):
    """--quant int4 on a bf16 checkpoint quantizes while loading (load_checkpoint(quantize=)), an
    int4 checkpoint loads as stored: QuantizedLinear fields equal to quantizing the bf16 load."""
    from model.checkpoint import load_checkpoint
    from model.generate import _load_weights, _quant_plan, build_parser
    from model.quant import QuantizedLinear, int4_fields, load_int4_weights

    cfg, _, src, dst = ckpts
    got = {}
    for name, ckpt, extra in (("bf16", src, ["--quant", "int4", "--group-size", "32", "--lm-head", "int4"]),
                              ("int4", dst, [])):
        args = build_parser().parse_args(["--checkpoint", str(ckpt)] + extra)
        plan = _quant_plan(args, None, cfg, torch.float32)
        assert plan.int4_kernels and plan.spec.group_size == 32
        _, got[name] = _load_weights(args, None, cfg, "cpu", torch.float32, plan)
    assert isinstance(got["bf16"].lm_head, QuantizedLinear) and not isinstance(got["int4"].lm_head, QuantizedLinear)
    _, bf16 = load_checkpoint(src, "cpu", torch.float32)
    want = quantize_weights(bf16, 32, "hqq", lm_head="int4")
    a, b = int4_fields(got["bf16"]), int4_fields(want)
    assert a.keys() == b.keys() and len(a) == 6 * cfg.num_layers + 1
    for n in a:
        for part in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(a[n], part), getattr(b[n], part)), (n, part)
    _, _, stored = load_int4_weights(dst, dtype=torch.float32)
    assert all(torch.equal(x.qweight, int4_fields(got["int4"])[n].qweight) for n, x in int4_fields(stored).items())


def test_quantize_on_load_refuses_before_allocating(ckpts):
    from model.checkpoint import load_checkpoint
    from model.quant import QuantizationConfig

    _, _, src, _ = ckpts
    with pytest.raises(TypeError, match="quantize must be a model.quant.QuantizationConfig"):
        load_checkpoint(src, "cpu", torch.float32, quantize="int4")
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.in_proj: K=32 .*group_size=64"):
        load_checkpoint(src, "meta", torch.float32, quantize=QuantizationConfig(group_size=64))


def test_int4_checkpoint_runs_the_int4_kernels_end_to_end(ckpts, cpu, capsys):
    """The int4 prefill and decode (reference backend on the CPU): the int4 references dequantize
    to fp32 exactly as the dequantizing loader does, so the tokens equal the int4-dequant run's."""
    _, _, _, dst = ckpts
    tokens, err = _main_tokens(["--checkpoint", str(dst)], capsys)
    assert "note: int4 checkpoint: int4 (hqq, group 32, lm_head bf16) through the int4 kernels" in err
    assert tokens == _main_tokens(["--checkpoint", str(dst), "--quant", "int4-dequant"], capsys)[0]


def test_quant_method_picks_the_quantizer(ckpts):
    """--quant-method rtn quantizes a bf16 checkpoint with round-to-nearest (hqq is the default)."""
    from model.checkpoint import load_checkpoint
    from model.generate import _load_weights, _quant_plan, build_parser
    from model.quant import int4_fields

    cfg, _, src, _ = ckpts
    _, bf16 = load_checkpoint(src, "cpu", torch.float32)
    for method in ("rtn", None):
        args = build_parser().parse_args(["--checkpoint", str(src), "--quant", "int4", "--group-size", "32"]
                                         + (["--quant-method", method] if method else []))
        plan = _quant_plan(args, None, cfg, torch.float32)
        assert plan.spec.method == (method or "hqq")
        _, got = _load_weights(args, None, cfg, "cpu", torch.float32, plan)
        want = int4_fields(quantize_weights(bf16, 32, method or "hqq"))
        for n, q in int4_fields(got).items():
            assert torch.equal(q.zeros, want[n].zeros) and torch.equal(q.qweight, want[n].qweight), n


def test_flags_that_cannot_be(ckpts, cpu, capsys):
    _, _, _, dst = ckpts
    for argv, msg in ((["--preset", "tiny", "--quant", "int4", "--group-size", "32"], "--quant int4: layers.0.moe.down_proj: K=16"),
                      (["--preset", "tiny", "--group-size", "32"], "--group-size applies when quantizing: add --quant int4"),
                      (["--checkpoint", str(dst), "--lm-head", "int4"],
                       "--lm-head int4: the checkpoint is int4 already, with lm-head bf16"),
                      (["--preset", "tiny", "--quant-method", "rtn"], "--quant-method applies when quantizing"),
                      (["--checkpoint", str(dst), "--quant-method", "rtn"],
                       "--quant-method rtn: the checkpoint is int4 already, with quant-method hqq")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--max-new-tokens", "2"])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, argv
