"""The one way a test skips. Every reason a test would not run (no GPU visible, a CPU-only torch,
cuda-python seeing no device, a missing optional package, too little free GPU memory) goes through
`skip()`; with CUGRAPH_RT_REQUIRE_GPU=1 (tools/gpu_session.sh sets it) that is a failure naming the
reason instead, so a GPU run cannot pass by skipping. tests/test_require_gpu.py checks that no test
skips any other way."""
from __future__ import annotations

import importlib
import os

import pytest

REQUIRE_ENV = "CUGRAPH_RT_REQUIRE_GPU"


def required() -> bool:
    """True when CUGRAPH_RT_REQUIRE_GPU is set to anything but empty or 0."""
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def skip(reason: str):
    """pytest.skip(reason) (also at module level), or pytest.fail under CUGRAPH_RT_REQUIRE_GPU=1."""
    if required():
        pytest.fail(f"{REQUIRE_ENV}=1 turns this skip into a failure: {reason}", pytrace=False)
    try:   # -rs then names the skipped test's file and line rather than this one (pytest >= 7)
        exc = pytest.skip.Exception(reason, allow_module_level=True, _use_item_location=True)
    except TypeError:
        exc = pytest.skip.Exception(reason, allow_module_level=True)
    raise exc


def need_module(name: str, why: str = ""):
    """The imported module, else skip() saying which package is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        error = exc
    skip(f"needs {name}{f' ({why})' if why else ''}, which does not import: {error}")


def gpu_reason() -> str | None:
    """None when a CUDA GPU is usable through both torch and cuda-python, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (needs an NVIDIA GPU and driver)"
    try:
        from cugraph_rt.device import require_cuda
        require_cuda()
    except Exception as exc:  # noqa: BLE001 - any failure here is the reason
        return f"cuda-python sees no usable GPU: {exc}"
    return None


def need_free_gpu_memory(nbytes: float, what: str) -> None:
    """skip() unless the current GPU has `nbytes` free."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    if free < nbytes:
        skip(f"{what} needs {nbytes / 1e9:.0f} GB free on the GPU, {free / 1e9:.0f} GB free")
