"""Inputs shared by the int4 GPU op tests: seeded normal tensors, their int4 quantization, and
NaN-poisoned outputs (so a kernel that writes nothing cannot pass)."""
import torch

from model.quant import quantize

DEV = "cuda"


def randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


def quantized(*shape, dtype, seed, group_size=128, method="rtn"):
    """A [..., K] weight of scale K^-1/2 (outputs of O(1)) quantized to int4."""
    return quantize(randn(*shape, dtype=dtype, scale=shape[-1] ** -0.5, seed=seed), group_size, method)


def nan_full(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)
