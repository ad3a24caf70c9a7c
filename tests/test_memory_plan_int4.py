"""The memory plan and the bytes-per-token floor with int4 weights: the planned weight bytes equal
what the int4 builders allocate, 35b-a3b int4 with a 4k cache peaks under 22 GB, the command lines
plan int4 runs as int4 (a run that fits in int4 is not refused for its bf16 size), and the floor
counts what the int4 step reads."""
import pytest
import torch

from model import memory_plan as mp
from model.config import ModelConfig
from model.quant import QuantizationConfig
from model.quant.build import empty_int4_weights, int4_weight_bytes, random_int4_weights
from model.quant.cost import read_bytes_per_token
from model.quant.layout import nbytes
from model.weights import empty_weights

from tests.int4_helpers import tiny32


@pytest.mark.parametrize("lm_head,dtype", [("bf16", torch.float32), ("int4", torch.bfloat16)])
def test_planned_int4_weights_equal_what_is_built(lm_head, dtype):
    cfg = tiny32()
    q = QuantizationConfig(group_size=32, lm_head=lm_head, scale_dtype=str(dtype).replace("torch.", ""))
    w = random_int4_weights(cfg, "cpu", dtype, 0, 32, "rtn", lm_head=lm_head)
    planned = mp.decode_memory(cfg, batch=1, max_seq=8, dtype_bytes=dtype.itemsize, quant=q)["weights"]
    assert planned == w.nbytes() == nbytes(w) < 0.45 * empty_weights(cfg, "meta", dtype).nbytes()
    # scales in another dtype than the model's: counted at their own size
    q16 = QuantizationConfig(group_size=32, lm_head=lm_head, scale_dtype="float16")
    w16 = empty_int4_weights(cfg, "meta", dtype, 32, lm_head=lm_head, scale_dtype=torch.float16)
    assert mp.weight_bytes(cfg, dtype.itemsize, q16) == w16.nbytes()


def test_35b_a3b_int4_with_a_4k_cache_peaks_under_22_gb():
    cfg = ModelConfig.preset("35b-a3b")
    plans = {lm: mp.peak_memory(cfg, max_seq=4096, quant=QuantizationConfig(lm_head=lm)) for lm in ("bf16", "int4")}
    w = plans["bf16"]["parts"]["weights"]
    assert w == nbytes(empty_int4_weights(cfg, "meta", torch.bfloat16, 128)) == 19_909_046_016   # docs/int4.md: 19.9 GB
    assert plans["int4"]["parts"]["weights"] == 19_162_099_456                                      # 19.2 GB
    for lm, plan in plans.items():
        # building the weights tensor by tensor holds one bf16 expert stack (1.07 GB) beside the int4 model
        assert plan["build"] - plan["parts"]["weights"] == 256 * 1024 * 2048 * 2 + (1 << 22) * 48
        assert plan["peak"] == max(plan["build"], plan["steady"]) <= 22e9, (lm, plan["peak"])
    assert 21.1e9 < plans["bf16"]["peak"] < 21.3e9
    bf16 = mp.peak_memory(cfg, max_seq=4096)
    assert bf16["peak"] == bf16["steady"] > 69e9                      # bf16 builds in place: no transient


def test_memory_plan_command_prints_the_peak(capsys):
    assert mp.main(["--preset", "35b-a3b", "--quant", "int4", "--max-seq", "4096"]) == 0
    out = capsys.readouterr().out
    assert "35b-a3b (40 layers), int4 g128 lm_head bf16, bfloat16, batch 1, 4096 positions" in out
    assert "weights" in out and "19.909 GB" in out and "peak device memory 21.18 GB" in out


def _refused_or_built(main, argv, capsys, monkeypatch, free):
    """main(argv) on a CPU machine with `free` bytes: 'refused' (exit 2, not enough memory) or
    'built' (the plan passed: it reached the weights' builder, stubbed to stop there)."""
    import model.quant.build
    import model.weights

    class Built(Exception):
        pass

    def stop(*a, **k):
        raise Built

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mp, "free_memory", lambda device: (free, "host memory"))
    monkeypatch.setattr(model.weights, "random_weights", stop)
    monkeypatch.setattr(model.quant.build, "random_int4_weights", stop)
    try:
        main(argv)
    except Built:
        return "built"
    except SystemExit as e:
        assert e.code == 2 and "not enough memory" in capsys.readouterr().err
        return "refused"
    raise AssertionError("neither refused nor built")


def test_generate_plans_int4_as_int4(monkeypatch, capsys):
    from model.generate import main

    # the CPU path runs in fp32: 35b-a3b is 129 GiB in fp32, 19.8 GiB int4 (+ 11 GiB of reference temporaries)
    argv = ["--preset", "35b-a3b", "--max-new-tokens", "2"]
    assert _refused_or_built(main, argv, capsys, monkeypatch, 40 * 2**30) == "refused"
    assert _refused_or_built(main, argv + ["--quant", "int4", "--lm-head", "int4"], capsys, monkeypatch,
                             40 * 2**30) == "built"
    assert _refused_or_built(main, argv + ["--quant", "int4"], capsys, monkeypatch, 28 * 2**30) == "refused"


def test_tools_plan_int4_as_int4(monkeypatch, capsys):
    from tools import bench_decode, common

    def run(extra, free):
        args = bench_decode.parse_args(["--preset", "35b-a3b"] + extra)
        return _refused_or_built(lambda _: common.build_model(args, "cpu", batch=1, max_seq=1048), None, capsys,
                                 monkeypatch, free)

    assert run([], 30e9) == "refused"
    assert run(["--quant", "int4"], 30e9) == "built"
    assert run(["--quant", "int4-dequant"], 30e9) == "refused"          # bf16 on the device


def test_bytes_per_token_floor_counts_what_the_int4_step_reads():
    cfg = ModelConfig.preset("35b-a3b")
    bf16 = read_bytes_per_token(empty_weights(cfg, "meta", torch.bfloat16))
    assert bf16["total"] == cfg.bytes_per_token(2) and read_bytes_per_token(
        empty_weights(cfg, "meta", torch.bfloat16), 8)["total"] == pytest.approx(cfg.bytes_per_token(2, batch=8), abs=1)
    q = {lm: read_bytes_per_token(empty_int4_weights(cfg, "meta", torch.bfloat16, 128, lm_head=lm))
         for lm in ("bf16", "int4")}
    assert q["bf16"]["lm_head"] == bf16["lm_head"] == 248320 * 2048 * 2              # in its own format
    assert q["int4"]["lm_head"] == 248320 * 2048 // 2 + 2 * 248320 * 16 * 2          # codes + scales + zeros
    # an int4 weight reads 0.5 + 4/128 bytes where bf16 reads 2: the experts' share at batch 1
    assert q["bf16"]["experts"] == pytest.approx(bf16["experts"] * (0.5 + 4 / 128) / 2, rel=1e-6)
    assert 2.31e9 < q["bf16"]["total"] < 2.32e9 and 1.56e9 < q["int4"]["total"] < 1.57e9
    assert int4_weight_bytes(cfg, 2, 128) == nbytes(empty_int4_weights(cfg, "meta", torch.bfloat16, 128))
