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


def test_bad_sizes_rejected():
    with pytest.raises(SystemExit):
        _load().main(["--sizes", "0,5"])


@pytest.mark.skipif(cg.is_available(), reason="checks the no-GPU message")
def test_no_gpu_says_so(capsys):
    assert _load().main(["--sizes", "1"]) == 2
    assert "NVIDIA GPU" in capsys.readouterr().out
