"""Reliability under bad input, on the CPU (docs/reliability.md lists every case): the decoder, the
generator, the checkpoint loader and the command lines.

Each bad input gets a clear exception type with the offending value in its message, and the
object stays usable: the next valid call gives the right result. GraphHandle's refusals are
tested where they live: validate_call in tests/test_cugraph_validation.py (and its property test
tests/test_reliability_property.py), a real handle in tests/gpu/test_reliability_*.py.
"""
import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint
from model.config import ConfigError, ModelConfig
from model.decoder import Decoder
from model.generation import Generator
from model.weights import random_weights
from tests.checkpoint_files import write_checkpoint


# ---- decoder and generator ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    return cfg, random_weights(cfg, "cpu", torch.float32, seed=11)


def _dec(tiny, batch=2, max_seq=8):
    cfg, w = tiny
    return Decoder(cfg, w, max_batch=batch, max_seq=max_seq, backend="reference")


def _state(dec):
    return [t.clone() for t in (dec.state.kv, dec.state.conv, dec.state.recurrent)]


def _same_state(dec, before):
    return all(torch.equal(a, b) for a, b in zip(_state(dec), before))


def _T(*v):
    return torch.tensor(v, dtype=torch.int64)


@pytest.mark.parametrize("tokens,positions,needle", [
    ((3, 256), (2, 2), "token id 256 (row 1) is outside the vocabulary [0, 256)"),
    ((-1, 3), (2, 2), "token id -1 (row 0)"),
    ((3, 4), (2, 8), "position 8 (row 1) is outside the cache capacity: max_seq=8"),
    ((3, 4), (-1, 2), "position -1 (row 0)"),
    ((3, 4), (1, 2), "row 0: position 1 given, but the row holds positions 0..1: its next step must be at position 2"),
    ((3, 4), (2, 4), "row 1: position 4 given, but the row holds positions 0..1: its next step must be at position 2"),
    ((3, 4), (2, 0), "row 1: position 0 given"),
])
def test_decoder_bad_step_values_refused_state_unchanged(tiny, tokens, positions, needle):
    dec, ref = _dec(tiny), _dec(tiny)
    for d in (dec, ref):
        d.prefill([[5, 6], [7, 8]])
    before = _state(dec)
    with pytest.raises(ValueError) as info:
        dec.decode_step(_T(*tokens), _T(*positions))
    assert needle in str(info.value)
    assert _same_state(dec, before)
    out = dec.decode_step(_T(3, 4), _T(2, 2)).clone()       # the next valid step is right
    assert torch.equal(out, ref.decode_step(_T(3, 4), _T(2, 2)))


def test_decoder_batch_and_prompt_limits(tiny):
    cfg, w = tiny
    dec = _dec(tiny)
    with pytest.raises(ValueError, match="batch 3 outside 1..max_batch=2"):
        dec.decode_step(_T(1, 2, 3), _T(0, 0, 0))
    with pytest.raises(ValueError, match="tokens must be a 1-D int64 tensor, got torch.int32"):
        dec.decode_step(torch.tensor([1, 2], dtype=torch.int32), _T(0, 0))
    with pytest.raises(ValueError, match="tokens has 2 rows, positions 1"):
        dec.decode_step(_T(1, 2), _T(0))
    with pytest.raises(ValueError, match="backend must be one of"):
        Decoder(cfg, w, max_batch=1, max_seq=8, backend="cuda")
    with pytest.raises(ValueError, match="different config"):
        Decoder(ModelConfig.preset("35b-a3b"), w, max_batch=1, max_seq=8, backend="reference")
    with pytest.raises(ValueError, match="3 prompts; the decoder holds 1..2 rows"):
        dec.prefill([[1], [2], [3]])
    with pytest.raises(ValueError, match="prompt 1 has 9 tokens: position 8 is outside the cache capacity max_seq=8"):
        dec.prefill([[1], [2] * 9])
    with pytest.raises(ValueError, match="prompt 0: token id 300 outside"):
        dec.prefill([[1, 300]])
    ref = _dec(tiny)
    assert torch.equal(dec.prefill([[1, 2], [3]]), ref.prefill([[1, 2], [3]]))


def test_decoder_reset_row_starts_it_over_and_rows_are_independent(tiny):
    dec = _dec(tiny)
    dec.prefill([[5, 6], [7, 8]])
    dec.reset(1)
    assert dec.next_positions == [2, 0]
    with pytest.raises(ValueError, match="row 1: position 2 given, but the row holds nothing"):
        dec.check_positions([2, 2])
    dec.check_positions([2, 0])
    with pytest.raises(ValueError, match="3 positions from row 0"):
        dec.check_positions([0, 0, 0])


def test_positions_on_device_are_not_read_but_bounded(tiny):
    """advance_positions(None): rows whose positions stayed on the device become unknown; only the
    cache bounds are then checked for them (a GPU decode_step does this, never syncing)."""
    dec = _dec(tiny)
    dec.advance_positions(None, 2)
    assert dec.next_positions == [None, None]
    dec.check_positions([5, 7])
    with pytest.raises(ValueError, match="position 8 \\(row 0\\)"):
        dec.check_positions([8, 0])
    dec.reset()
    assert dec.next_positions == [0, 0]


def test_generator_step_checks_host_values_and_stays_usable(tiny):
    dec = _dec(tiny, batch=2, max_seq=16)
    gen = Generator(dec, use_graph=False)
    gen.step(_T(1, 2), _T(0, 0))
    for toks, pos, exc, needle in [
        ((1, 999), (1, 1), ValueError, "token id 999 (row 1)"),
        ((1, 2), (1, 3), ValueError, "row 1: position 3 given"),
        ((1, 2), (16, 1), ValueError, "position 16 (row 0) is outside the cache capacity"),
        ((1, 2, 3), (1, 1, 1), ValueError, "shape (2,) (the generator's batch); got (3,)"),
    ]:
        before = _state(dec)
        with pytest.raises(exc) as info:
            gen.step(_T(*toks), _T(*pos))
        assert needle in str(info.value)
        assert _same_state(dec, before)
    ref = Generator(_dec(tiny, batch=2, max_seq=16), use_graph=False)
    ref.step(_T(1, 2), _T(0, 0))
    assert torch.equal(gen.step(_T(1, 2), _T(1, 1)), ref.step(_T(1, 2), _T(1, 1)))
    assert torch.equal(dec.logits, ref.decoder.logits)


def test_generator_graph_needs_cuda(tiny):
    with pytest.raises(ValueError, match="use_graph=True needs a CUDA device, the decoder is on cpu"):
        Generator(_dec(tiny), use_graph=True)


# ---- loader ---------------------------------------------------------------------------------------
def _write_ckpt(path, cfg, w, config=None, shards=1):
    return write_checkpoint(path, w.to_hf_state_dict(), config if config is not None else cfg.to_hf_dict(), shards)


def _truncate(f, keep):
    data = f.read_bytes()
    f.write_bytes(data[:keep if keep > 0 else len(data) + keep])


def _loads_ok(tiny, tmp_path):
    cfg, w = tiny
    _write_ckpt(tmp_path / "good", cfg, w)
    cfg2, w2 = load_checkpoint(tmp_path / "good", device="cpu", verbose=False)
    assert cfg2 == cfg and torch.equal(w2.embed, w.embed)


@pytest.mark.parametrize("keep", [5, 40, -100])
def test_truncated_safetensors_named(tiny, tmp_path, keep):
    cfg, w = tiny
    (f,) = _write_ckpt(tmp_path / "a", cfg, w)
    _truncate(f, keep)
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors \(\d+ bytes\) as safetensors"):
        load_checkpoint(tmp_path / "a", device="cpu")
    _loads_ok(tiny, tmp_path)


def test_truncated_shard_and_missing_shard_named(tiny, tmp_path):
    cfg, w = tiny
    files = _write_ckpt(tmp_path / "a", cfg, w, shards=3)
    _truncate(files[1], -64)
    with pytest.raises(CheckpointError, match=files[1].name):
        load_checkpoint(tmp_path / "a", device="cpu")
    files[1].unlink()
    with pytest.raises(CheckpointError, match=f"to {files[1].name}, which is not in"):
        load_checkpoint(tmp_path / "a", device="cpu")
    (tmp_path / "a" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json is not a valid safetensors index"):
        load_checkpoint(tmp_path / "a", device="cpu")
    _loads_ok(tiny, tmp_path)


def test_missing_config_and_directory(tiny, tmp_path):
    cfg, w = tiny
    _write_ckpt(tmp_path / "a", cfg, w)
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json at .*a/config.json"):
        load_checkpoint(tmp_path / "a", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", device="cpu")


def test_wrong_shape_named(tiny, tmp_path):
    cfg, w = tiny
    big = cfg.to_hf_dict() | {"vocab_size": 300}
    _write_ckpt(tmp_path / "a", cfg, w, config=big)
    with pytest.raises(CheckpointError, match=r"(embed_tokens|lm_head)\.weight has shape \[256, 32\], the config expects \[300, 32\]"):
        load_checkpoint(tmp_path / "a", device="cpu")


def test_unknown_config_field_is_an_error_naming_it(tiny, tmp_path):
    cfg, w = tiny
    _write_ckpt(tmp_path / "a", cfg, w, config=cfg.to_hf_dict() | {"sliding_window_pattern": 6})
    with pytest.raises(ConfigError, match="unknown config field\\(s\\) sliding_window_pattern=6"):
        load_checkpoint(tmp_path / "a", device="cpu")
    with pytest.warns(UserWarning, match="sliding_window_pattern"):
        cfg2, _ = load_checkpoint(tmp_path / "a", device="cpu", strict_config=False, verbose=False)
    assert cfg2 == cfg
    # known-irrelevant fields (training knobs, bookkeeping) are fine
    _write_ckpt(tmp_path / "b", cfg, w, config=cfg.to_hf_dict() | {"initializer_range": 0.02,
                                                                    "router_aux_loss_coef": 0.001})
    assert load_checkpoint(tmp_path / "b", device="cpu", verbose=False)[0] == cfg


# ---- command lines (in process: argparse errors exit 2 with the value in the message; the one owner
# of these cases; tests/test_generation.py runs the entry points as processes) ------------------
def _exit2(fn, argv, capsys):
    with pytest.raises(SystemExit) as info:
        fn(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--batch", "0"], "expected a positive integer, got 0"),
    (["--max-seq", "-3"], "expected a positive integer, got -3"),
    (["--max-seq", "4", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"],
     "--max-seq 4 is too small: a 3-token prompt and --max-new-tokens 4 need 6 cache positions"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--top-k", "-1"], "top_k must be >= 0 (0 disables it), got -1"),
    (["--temperature", "nan"], "temperature must be >= 0, got nan"),
    (["--prompt-ids", "1,999"], "prompt token id 999 is outside the vocabulary [0, 256)"),
    (["--prompt-ids", ""], "--prompt-ids is empty"),
    (["--preset", "tiny", "--checkpoint", "x"], "not allowed with argument"),
    (["--max-new-tokens", "2.5"], "expected a positive integer, got '2.5'"),
    (["--max-new-tokens", "0"], "expected a positive integer, got 0"),
    (["--prompt-ids", "1,x"], "--prompt-ids wants comma-separated integers, got '1,x'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--prompt", "hi"], "--prompt needs a tokenizer.json in --checkpoint"),
    (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["--checkpoint", "/nonexistent/dir"], "--checkpoint /nonexistent/dir: no such directory"),
])
def test_generate_cli_bad_flags(argv, needle, capsys):
    from model.generate import main
    assert needle in _exit2(main, argv, capsys)


def test_generate_cli_bad_checkpoint(tiny, tmp_path, capsys):
    from model.generate import main
    cfg, w = tiny
    _write_ckpt(tmp_path / "a", cfg, w, config=cfg.to_hf_dict() | {"mystery_knob": 1})
    err = _exit2(main, ["--checkpoint", str(tmp_path / "a")], capsys)
    assert "mystery_knob=1" in err
    (f,) = _write_ckpt(tmp_path / "b", cfg, w)
    _truncate(f, 40)
    assert "cannot read" in _exit2(main, ["--checkpoint", str(tmp_path / "b")], capsys)


@pytest.mark.parametrize("tool,argv,needle", [
    ("capture_trace", ["--layers", "0"], "expected a positive integer, got 0"),
    ("capture_trace", ["--context", "0"], "--context must be >= 1, got 0"),
    ("capture_trace", ["--dtype", "int8"], "invalid choice"),
    ("capture_trace", ["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ("bench_decode", ["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ("bench_decode", ["--batches", "1,0"], "comma-separated positive integers, got '1,0'"),
    ("bench_decode", ["--batches", "a"], "got 'a'"),
    ("bench_decode", ["--hf-layers", "-1"], "--hf-layers must be >= 0 (0 skips transformers), got -1"),
    ("bench_decode", ["--check-steps", "0"], "expected a positive integer, got 0"),
    ("bench_decode", ["--preset", "huge"], "invalid choice: 'huge'"),
])
def test_tools_bad_flags(tool, argv, needle, capsys):
    import importlib
    mod = importlib.import_module(f"tools.{tool}")
    assert needle in _exit2(mod.parse_args, argv, capsys)


# ---- lifetime: releases are never run inside a capture ------------------------------------------
def test_releases_inside_a_capture_are_deferred_to_its_end():
    import gc

    from cugraph_rt._lifetime import Owned, deferring_releases, releases_deferred

    log = []

    class Fake(Owned):
        def __init__(self, tag):
            self._own(log.append, tag)

    a = Fake("a")
    assert gc.isenabled()
    with deferring_releases():          # what capture() does while the capture is open
        assert not gc.isenabled()       # automatic collection paused during captures
        b = Fake("b")
        del b
        a.close()
        gc.collect()
        assert log == [] and releases_deferred() == 2 and a.closed
        with deferring_releases():      # nested: only the outermost end runs them
            pass
        assert log == []
    assert log == ["b", "a"] and releases_deferred() == 0
    assert gc.isenabled()
