"""model.memory_plan: the estimate equals what the decoder allocates, and a run that cannot fit is
refused before anything is allocated, naming both figures and what to try instead."""
import pytest
import torch

from model import memory_plan as mp
from model.config import ModelConfig
from model.decoder import Decoder
from model.generation import Generator
from model.weights import random_weights

GiB = 1 << 30


def _tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in vars(obj).values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("backend,batch,max_seq", [("reference", 1, 8), ("reference", 3, 100), ("triton", 2, 1000)])
def test_plan_equals_what_decoder_and_generator_allocate(backend, batch, max_seq, device):
    cfg = ModelConfig.preset("tiny")
    w = random_weights(cfg, device, torch.float32, seed=0)
    dec = Decoder(cfg, w, max_batch=batch, max_seq=max_seq, backend=backend)
    gen = Generator(dec, use_graph=False)
    parts = mp.decode_memory(cfg, batch=batch, max_seq=max_seq, dtype_bytes=4, backend=backend)
    assert parts["weights"] == w.nbytes()
    assert parts["KV cache"] + parts["GDN states"] == dec.state.nbytes()
    # every tensor the decoder holds besides weights and state; a new buffer there must be planned too
    assert parts["step workspaces"] == _tensor_bytes(dec)
    assert parts["sampler"] == _tensor_bytes(gen._sampler) + gen._next_tokens.numel() * 8
    assert ("temporaries (reference ops)" in parts) == (backend == "reference")


def test_plan_at_35b_a3b_shapes():
    cfg = ModelConfig.preset("35b-a3b")
    parts = mp.decode_memory(cfg, batch=1, max_seq=262144, dtype_bytes=2, extra={"prefill workspace": 123})
    assert abs(parts["weights"] / 1e9 - 69.3) < 0.1                       # DESIGN.md's figure
    assert parts["KV cache"] == 10 * 2 * 2 * 256 * 262144 * 2             # 10 attention layers, K and V
    assert parts["GDN states"] == 30 * (8192 * 4 * 2 + 32 * 128 * 128 * 4)
    assert parts["prefill workspace"] == 123 and list(parts)[-1] == "prefill workspace"
    with pytest.raises(ValueError, match="extra\\['x'\\] must be a byte count"):
        mp.decode_memory(cfg, batch=1, max_seq=8, dtype_bytes=2, extra={"x": -1})
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        mp.decode_memory(cfg, batch=0, max_seq=8, dtype_bytes=2)


def test_check_fits_names_both_figures_and_the_suggestion():
    parts = {"weights": 20 * GiB, "KV cache": 2 * GiB}
    with pytest.raises(mp.NotEnoughMemoryError) as info:
        mp.check_fits(parts, "cpu", what="the big preset", suggestion="try --layers 3",
                      free=(10 * GiB, "host memory"))
    msg = str(info.value)
    assert msg == ("the big preset needs 22.00 GiB (weights 20.00 GiB, KV cache 2.00 GiB) but only 10.00 GiB "
                   "of host memory is free; try --layers 3")
    assert (info.value.need, info.value.free) == (22 * GiB, 10 * GiB)
    mp.check_fits(parts, "cpu", free=(24 * GiB, "host memory"))             # fits with the reserve
    with pytest.raises(mp.NotEnoughMemoryError):                            # needs the reserve too
        mp.check_fits(parts, "cpu", free=(22 * GiB + 100, "host memory"))
    mp.check_fits(parts, "cpu", free=(None, "unknown"))                     # cannot tell: not refused


def test_max_layers_that_fit_is_the_boundary():
    cfg = ModelConfig.preset("35b-a3b")
    kw = dict(batch=1, max_seq=64, dtype_bytes=4, backend="reference")
    import dataclasses
    five = sum(mp.decode_memory(dataclasses.replace(cfg, num_layers=5), **kw).values())
    free = int((five + mp.RESERVE_MIN) / (1 - mp.RESERVE_FRACTION)) + 1024
    assert mp.max_layers_that_fit(cfg, free, **kw) == 5
    assert mp.max_layers_that_fit(cfg, 1 << 20, **kw) == 0
    assert mp.max_layers_that_fit(cfg, None, **kw) == 40


def test_free_host_memory_is_measured():
    free, label = mp.free_memory("cpu")
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < free <= total and label.startswith("host memory")


# ---- refusals through the command lines -----------------------------------------------------------
def _small_machine(monkeypatch, free=23 * 10 ** 9):
    """A machine with `free` bytes free, where allocating weights fails the test."""
    import model.weights

    monkeypatch.setattr(mp, "free_memory", lambda device: (free, "host memory"))

    def boom(*a, **k):
        raise AssertionError("weights were allocated for a run that should have been refused")
    monkeypatch.setattr(model.weights, "random_weights", boom)


def _exit2(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_generate_refuses_35b_on_a_23_gb_machine(monkeypatch, capsys):
    from model.generate import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the CPU path, also on a GPU machine
    _small_machine(monkeypatch)
    err = _exit2(main, ["--preset", "35b-a3b"], capsys)
    assert "not enough memory: the 35b-a3b preset (batch 1, 36 positions) needs 129.20 GiB (weights 129.12 GiB" in err
    assert "but only 21.42 GiB of host memory is free; try --layers 5 (the first 5 of 40 layers fit)" in err
    assert "a smaller preset (--preset tiny)" in err and "nothing was allocated" in err
    assert "--max-new-tokens, --max-seq or --batch" not in err     # the weights are the problem here


def test_generate_cache_too_large_for_memory_suggests_shorter_runs(monkeypatch, capsys):
    from model.generate import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _small_machine(monkeypatch, free=20 << 20)
    err = _exit2(main, ["--preset", "tiny", "--batch", "64", "--max-new-tokens", "4000"], capsys)
    assert "the tiny preset (batch 64, 4004 positions) needs" in err
    assert "KV cache 62.6 MiB" in err and "try a smaller --max-new-tokens, --max-seq or --batch" in err


def test_demo_refuses_what_does_not_fit(monkeypatch, capsys):
    from model.demo import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _small_machine(monkeypatch)
    err = _exit2(main, ["--preset", "122b-a10b"], capsys)
    assert "the 122b-a10b preset (48 layers) needs 455.08 GiB (weights 454.90 GiB" in err
    assert "only 21.42 GiB of host memory is free; try --layers 1 (the first 1 of 48 layers fit), or --preset tiny" in err


def test_tools_refuse_what_does_not_fit(monkeypatch, capsys):
    from tools import bench_decode, common
    _small_machine(monkeypatch, free=80 * 10 ** 9)
    args = bench_decode.parse_args(["--preset", "122b-a10b", "--dtype", "bfloat16"])
    with pytest.raises(SystemExit) as info:
        common.build_model(args, "cpu", batch=8, max_seq=1024 + 16 + 8)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: not enough memory: 122b-a10b (48 layers, batch 8, 1048 positions) needs 229.11 GiB" in err
    assert "but only 74.51 GiB of host memory is free; try --layers 14 (the first 14 of 48 layers fit)" in err
