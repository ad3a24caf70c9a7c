"""tools/bench_launch.py argument handling (the benchmark itself needs a GPU)."""
import importlib.util
from pathlib import Path

import pytest

import cugraph_rt as cg

_PATH = Path(__file__).resolve().parents[1] / "tools" / "bench_launch.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_launch", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("sizes", ["0,5", "a", ",", "-1"])
def test_bad_sizes_exit_2_naming_them(sizes, capsys):
    with pytest.raises(SystemExit) as info:
        _load().main(["--sizes", sizes])
    assert info.value.code == 2
    assert f"argument --sizes: expected comma-separated positive integers, got {sizes!r}" in capsys.readouterr().err


def test_no_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(cg, "is_available", lambda: False)   # a GPU machine too
    assert _load().main(["--sizes", "1"]) == 2
    assert "bench_launch: no CUDA GPU here; graphs need an NVIDIA GPU and driver. Nothing run." in \
        capsys.readouterr().out
