"""tools/bench_prefill.py --quant int4: its arguments, the weights it quantizes and its int4 weight
floor (CPU; the check and the timing need a GPU)."""
import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.quant import QuantizedLinear
from model.weights import random_weights
from tools import bench_prefill


def test_int4_arguments():
    args = bench_prefill.parse_args(["--quant", "int4", "--group-size", "32", "--lm-head", "int4"])
    assert (args.quant, args.group_size, args.lm_head) == ("int4", 32, "int4")
    assert bench_prefill.parse_args([]).quant == "none"


def test_int4_options_without_quant_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_prefill.parse_args(["--group-size", "64"])
    assert "--group-size, --lm-head and --quant-method apply to --quant int4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_prefill.parse_args(["--quant-method", "rtn"])
    assert "--quant-method apply to --quant int4" in capsys.readouterr().err


def test_quantize_gives_the_int4_layout_only_under_quant_int4():
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), moe_intermediate_size=32, shared_expert_intermediate_size=32)
    w = random_weights(cfg, "cpu", torch.float32, seed=0)
    assert bench_prefill.quantize(w, bench_prefill.parse_args([])) is w
    wq = bench_prefill.quantize(w, bench_prefill.parse_args(["--quant", "int4", "--group-size", "32"]))
    m = wq.layers[0]
    assert isinstance(m.mixer.in_proj, QuantizedLinear) and m.mixer.in_proj.group_size == 32
    assert isinstance(m.moe.gate_up_proj, QuantizedLinear) and not isinstance(wq.lm_head, QuantizedLinear)
    w4 = bench_prefill.quantize(w, bench_prefill.parse_args(["--quant", "int4", "--group-size", "32", "--lm-head",
                                                             "int4"]))
    assert isinstance(w4.lm_head, QuantizedLinear)
    from model.quant.layout import quantize_weights
    wr = bench_prefill.quantize(w, bench_prefill.parse_args(["--quant", "int4", "--group-size", "32",
                                                             "--quant-method", "rtn"]))
    want = quantize_weights(w, 32, "rtn").layers[0].mixer.in_proj
    assert torch.equal(wr.layers[0].mixer.in_proj.zeros, want.zeros)
    assert not torch.equal(want.zeros, m.mixer.in_proj.zeros)     # HQQ's differ: the method was used


def test_int4_weight_floor():
    """35b-a3b at 16 tokens: the linears at 0.5 + 4/128 bytes a weight instead of 2; a bf16 lm_head
    (and the norms, the embedding rows) at 2."""
    cfg = ModelConfig.preset("35b-a3b")
    bf16 = bench_prefill.weight_floor_ms(cfg, 16, 1000.0)
    act = cfg.weight_counts(16)["active"]
    int4 = bench_prefill.weight_floor_ms(cfg, 16, 1000.0, bench_prefill.parse_args(["--quant", "int4"]))
    plain = act["lm_head"] + act["embedding_row"] + act["norms"]
    want = (plain * 2 + (sum(act.values()) - plain) * (0.5 + 4 / 128)) / 1e12 * 1e3
    assert int4 == pytest.approx(want, rel=1e-9) and int4 < bf16 / 2
    all4 = bench_prefill.weight_floor_ms(cfg, 16, 1000.0, bench_prefill.parse_args(["--quant", "int4", "--lm-head", "int4"]))
    assert all4 == pytest.approx(int4 - act["lm_head"] * (2 - 0.53125) / 1e12 * 1e3, rel=1e-9)
