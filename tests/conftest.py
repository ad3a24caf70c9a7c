"""Shared test setup: the `gpu` marker skips with a reason where no CUDA GPU is usable, and with no
GPU every Triton kernel runs under Triton's CPU interpreter."""
import os

import pytest


def _gpu_reason():
    """None when a CUDA GPU is usable through both torch and cuda-python, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (needs an NVIDIA GPU and driver)"
    return None


GPU_SKIP_REASON = _gpu_reason()
HAS_GPU = GPU_SKIP_REASON is None

if not HAS_GPU:
    # Must be set before any @triton.jit runs: kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason=f"GPU test: {GPU_SKIP_REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernel tests run on: the GPU when present, else the CPU (Triton interpreter)."""
    return "cuda" if HAS_GPU else "cpu"
