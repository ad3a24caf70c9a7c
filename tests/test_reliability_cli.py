"""Reliability of the command lines under a new user's inputs: every bad flag is an argparse-style
error (exit code 2, the flag and value named on stderr, no traceback), refused before anything is
allocated; the demo says what it is; cugraph_rt names a driver that is too old; the package
declares what the code imports."""
import ast
import importlib
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()


def _exit2(fn, argv, capsys):
    with pytest.raises(SystemExit) as info:
        fn(argv)
    assert info.value.code == 2
    res = capsys.readouterr()
    assert "Traceback" not in res.err
    return res.err


@pytest.mark.parametrize("argv,needle", [
    (["--max-new-tokens", "10000000000"], "a 4-token prompt and --max-new-tokens 10000000000 need 10000000003 "
                                          "positions, beyond the model's max_position_embeddings=4096; use "
                                          "--max-new-tokens 4093 or less"),
    (["--max-seq", "100000"], "--max-seq 100000 is beyond the model's max_position_embeddings=4096"),
    (["--batch", "100000"], "--batch 100000: the Triton GEMV decodes at most 16 rows together" if ON_GPU else
     "--batch 100000: the CPU reference path decodes row by row in Python, so more than 256 rows would take "
     "minutes per token; use at most 256"),
    (["--seed", str(2 ** 64)], f"argument --seed: expected a seed in [0, 2**63 - 1 = {2 ** 63 - 1}] (it is held "
                               f"in a signed 64-bit integer), got {2 ** 64}"),
    (["--seed", "-1"], "argument --seed: expected a seed in [0, 2**63 - 1"),
    (["--seed", "1e3"], "argument --seed: expected an integer seed"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0 (0 is greedy), got inf"),
    (["--top-k", "1000"], "--top-k 1000 is larger than the vocabulary (256); 0 turns top-k off"),
    (["--layers", "5"], "--layers 5: the tiny preset has 4 layers"),
    (["--layers", "0"], "argument --layers: expected a positive integer, got 0"),
    (["--checkpoint", "x", "--layers", "1"], "--checkpoint x: no such directory"),
    (["--device-loop", "while", "--no-graph"], "--device-loop while replays the decode step as a CUDA graph: it "
                                               "needs a CUDA GPU and no --no-graph"),
])
def test_generate_bad_numbers_refused_before_allocating(argv, needle, capsys, monkeypatch):
    import model.weights
    from model.generate import main

    monkeypatch.setattr(model.weights, "random_weights", lambda *a, **k: pytest.fail("allocated"))
    err = _exit2(main, argv, capsys)
    assert needle in err, err


def test_generate_layers_cuts_the_preset_and_not_a_checkpoint(tmp_path, capsys):
    from model.config import ModelConfig
    from model.generate import main

    (tmp_path / "config.json").write_text(__import__("json").dumps(ModelConfig.preset("tiny").to_hf_dict()))
    err = _exit2(main, ["--checkpoint", str(tmp_path), "--layers", "1"], capsys)
    assert "--layers applies to --preset (random weights); a checkpoint is loaded whole" in err
    assert main(["--layers", "1", "--prompt-ids", "3", "--max-new-tokens", "1"]) == 0
    assert "stop: length" in capsys.readouterr().out


# ---- tools ----------------------------------------------------------------------------------------
def _tool(name):
    if name == "bench_launch":      # a script, not a package module
        spec = importlib.util.spec_from_file_location("bench_launch", ROOT / "tools" / "bench_launch.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main
    return importlib.import_module(f"tools.{name}").parse_args


@pytest.mark.parametrize("tool,argv,needle", [
    ("bench_launch", ["--sizes", "x"], "argument --sizes: expected comma-separated positive integers, got 'x'"),
    ("bench_launch", ["--sizes", "0,5"], "expected comma-separated positive integers, got '0,5'"),
    ("bench_launch", ["--sizes", ""], "expected comma-separated positive integers, got ''"),
    ("bench_launch", ["--calls", "-1"], "argument --calls: expected a positive integer, got -1"),
    ("bench_launch", ["--calls", "1.5"], "argument --calls: expected a positive integer, got '1.5'"),
    ("bench_decode", ["--batches", "4,32"], "--batches 32: the Triton GEMV decodes at most 16 rows together"),
    ("bench_decode", ["--seed", str(2 ** 63)], "argument --seed: expected a seed"),
    ("bench_decode", ["--context", "-5"], "argument --context: expected a positive integer, got -5"),
    ("bench_decode", ["--steps", "x"], "argument --steps: expected a positive integer, got 'x'"),
    ("bench_decode", ["--ref-layers", "0"], "argument --ref-layers: expected a positive integer, got 0"),
    ("bench_decode", ["--variants", "default,fused_ruter"], "unknown setting 'fused_ruter'"),
    ("bench_decode", ["--variants", "fused_conv=maybe"], "'fused_conv=maybe' needs a value in"),
    ("capture_trace", ["--batch", "17"], "--batch 17: the Triton GEMV decodes at most 16 rows together"),
    ("capture_trace", ["--seed", "-3"], "argument --seed: expected a seed"),
    ("capture_trace", ["--profile-steps", "-1"], "--profile-steps must be >= 0"),
    ("bench_moe", ["--seed", str(2 ** 70)], "argument --seed: expected a seed"),
    ("bench_moe", ["--max-seconds", "nan"], "--max-seconds must be > 0, got nan (a finite number of seconds)"),
    ("bench_moe", ["--max-seconds", "inf"], "--max-seconds must be > 0, got inf"),
    ("bench_moe", ["--copies", "0"], "argument --copies: expected a positive integer, got 0"),
    ("bench_gemv", ["--max-seconds", "nan"], "--max-seconds must be > 0, got nan"),
    ("bench_gemv", ["--reps", "-2"], "argument --reps: expected a positive integer, got -2"),
    ("bench_loop", ["--new", "1"], "--new must be >= 2 (the decode time is the time after the first token), got 1"),
    ("bench_loop", ["--batches", "8,17"], "--batches 17: the Triton GEMV decodes at most 16 rows together"),
    ("bench_loop", ["--ks", "4,0"], "argument --ks: expected comma-separated positive integers"),
    ("bench_prefill", ["--sweep-chunks", "512,x"], "argument --sweep-chunks: expected comma-separated positive integers"),
])
def test_tools_numeric_flags(tool, argv, needle, capsys):
    assert needle in _exit2(_tool(tool), argv, capsys)


def test_tools_layers_and_checkpoint_errors_exit_2(tmp_path, capsys):
    from tools import capture_trace, common

    args = capture_trace.parse_args(["--checkpoint", str(tmp_path / "nope")])
    assert "--checkpoint" in _exit2(lambda a: common.build_model(args, "cpu"), None, capsys)
    args = capture_trace.parse_args(["--checkpoint", str(tmp_path), "--layers", "2"])
    assert "--layers applies to --preset" in _exit2(lambda a: common.build_model(args, "cpu"), None, capsys)
    (tmp_path / "config.json").write_text("[]")
    args = capture_trace.parse_args(["--checkpoint", str(tmp_path)])
    assert "config.json must hold a JSON object" in _exit2(lambda a: common.build_model(args, "cpu"), None, capsys)
    args = capture_trace.parse_args(["--layers", "9"])
    assert "--layers 9: must be in [1, 4]" in _exit2(lambda a: common.build_model(args, "cpu"), None, capsys)


# ---- demo -----------------------------------------------------------------------------------------
def test_cpu_demo_says_weights_are_random_and_why_no_gpu_once(capsys, monkeypatch):
    from model.demo import main
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the CPU demo, also on a GPU machine

    assert main(["--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "random weights (seed 0): the tokens it generates mean nothing" in out
    assert out.count("NVIDIA GPU") == 1, out
    assert "No CUDA graphs here: " in out and re.search(r"generated \[\d+, \d+\]", out)
    assert "max_position_embeddings=4096" in _exit2(main, ["--max-new-tokens", "5000"], capsys)
    assert "argument --max-new-tokens: expected a positive integer, got 0" in _exit2(main, ["--max-new-tokens", "0"], capsys)


# ---- cugraph_rt: a driver older than cuda-bindings' CUDA major -------------------------------------
def test_driver_too_old_names_both_versions(monkeypatch):
    from cugraph_rt import device, errors

    monkeypatch.setattr(errors, "driver_version", lambda: 12040)
    monkeypatch.setattr(errors, "runtime_version", lambda: 13050)
    monkeypatch.setattr(device, "driver_version", lambda: 12040)
    reason = errors.unavailable_reason()
    assert "the NVIDIA driver is too old: it supports CUDA 12.4" in reason
    assert "needs a driver for CUDA 13.0 or newer" in reason
    assert "pip install 'cuda-bindings>=12.0,<13'" in reason
    with pytest.raises(errors.CudaUnavailableError, match="supports CUDA 12.4.*needs a driver for CUDA 13.0") as info:
        device.require_cuda()
    assert info.value.call == "cudaDriverGetVersion"      # told from the versions, before any runtime call
    assert not device.is_available()
    assert errors.driver_too_old(13000, 13050) is False          # minor versions within a major are fine
    assert errors.driver_too_old(12090, 12040) is False
    assert errors.driver_too_old(0, 13050) is False               # no driver: a different message
    monkeypatch.setattr(errors, "driver_version", lambda: 0)
    assert "no NVIDIA driver found" in errors.unavailable_reason()


# ---- packaging: what the code imports is declared ---------------------------------------------------
DIST = {"cuda": "cuda-bindings", "numpy": "numpy", "torch": "torch", "triton": "triton",
        "safetensors": "safetensors", "tqdm": "tqdm", "tokenizers": "tokenizers", "jinja2": "jinja2",
        "matplotlib": "matplotlib", "transformers": "transformers", "pytest": "pytest",
        "hypothesis": "hypothesis"}
LOCAL = {"cugraph_rt", "model", "tools", "tests", "__future__"}
OPTIONAL = {"transformers"}     # model.config.ModelConfig.to_hf only: comparisons in tests and tools


def _imports(folder):
    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in LOCAL}


def _requirements(entries):
    return {re.split(r"[<>=\[ ;]", e, maxsplit=1)[0].lower() for e in entries}


def test_every_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _requirements(project["dependencies"])
    extras = project["optional-dependencies"]
    tools = runtime | _requirements(extras["tools"])
    assert {"tokenizers", "jinja2"} <= runtime and {"matplotlib", "transformers"} <= tools - runtime
    assert "cugraph_rt[tools]" in extras["test"]
    cupy = {"cupy"} if {"cupy-cuda12", "cupy-cuda13"} <= extras.keys() else set()   # the optional CuPy adapter
    for folder, declared in (("model", runtime | OPTIONAL), ("cugraph_rt", runtime | cupy), ("tools", tools)):
        missing = {DIST.get(n, n) for n in _imports(folder)} - declared
        assert not missing, f"{folder}/ imports {sorted(missing)}, not declared in pyproject.toml"


def test_setup_script_matches_cuda_bindings_to_torch():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    assert "torch.version.cuda" in text
    assert '12) python -m pip install -q "cuda-bindings>=12.9,<13"' in text
    assert '13) python -m pip install -q "cuda-bindings>=13,<14"' in text
    assert text.index("cuda-bindings>=13,<14") < text.index('-e ".[test]"')
