"""Shared test setup: a test marked `gpu` skips with a reason where no CUDA GPU is usable (a
failure instead under CUGRAPH_RT_REQUIRE_GPU=1, see tests/needs.py), and with no GPU every Triton
kernel runs under Triton's CPU interpreter."""
import os

import pytest

from tests.needs import gpu_reason, skip

GPU_SKIP_REASON = gpu_reason()
HAS_GPU = GPU_SKIP_REASON is None

if not HAS_GPU:
    # Must be set before any @triton.jit runs: kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # before any fixture: a GPU test without a GPU builds nothing
    if not HAS_GPU and item.get_closest_marker("gpu") is not None:
        skip(f"GPU test: {GPU_SKIP_REASON}")


@pytest.fixture
def device():
    """The device kernel tests run on: the GPU when present, else the CPU (Triton interpreter)."""
    return "cuda" if HAS_GPU else "cpu"
