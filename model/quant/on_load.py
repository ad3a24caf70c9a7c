"""Quantize while loading (`load_checkpoint(..., quantize=QuantizationConfig(...))`): the int4
layout is allocated first (empty_int4_weights) and each checkpoint tensor, as the loader streams
it, is quantized on the target device and written into its rows of the fused int4 tensors.

Groups run along K and every checkpoint tensor is whole rows of one of our weights (a part of a
fused projection, one expert's gate, up or down), so quantizing the parts one at a time gives the
codes, scales and zeros of quantizing the fused weight whole: the result equals
quantize_weights(load_checkpoint(...)) tensor for tensor, while at most one bf16 checkpoint tensor
(and one row chunk's quantizer temporaries) exists beside the int4 model.
"""
from __future__ import annotations

import torch

from ..weights import hf_targets
from .build import BUILD_CHUNK_ELEMS, empty_int4_weights, quantize_into
from .format import CODES_PER_WORD, QuantizedLinear
from .layout import map_weights
from .qconfig import QuantizationConfig
from .reader import target_view


def _check_spec(quantize) -> QuantizationConfig:
    if not isinstance(quantize, QuantizationConfig):
        raise TypeError(f"quantize must be a model.quant.QuantizationConfig (method, group_size, lm_head, "
                        f"scale_dtype), got {type(quantize).__name__}")
    return quantize


class QuantizingTargets:
    """Where a loader puts each checkpoint tensor when quantizing on the way in."""

    def __init__(self, cfg, device, dtype: torch.dtype, quantize: QuantizationConfig, *,
                 chunk_elems: int = BUILD_CHUNK_ELEMS):
        q = self.spec = _check_spec(quantize)
        self.cfg, self.device, self.dtype, self.chunk_elems = cfg, torch.device(device), dtype, chunk_elems
        # every K checked against the group size here, before anything is allocated
        self.layout = empty_int4_weights(cfg, self.device, dtype, q.group_size, lm_head=q.lm_head,
                                         scale_dtype=q.torch_scale_dtype)
        self._targets = {part: hf_targets(map_weights(self.layout, self._part(part)))
                         for part in ("qweight", "scales", "zeros")}

    @staticmethod
    def _part(part):
        return lambda n, t: getattr(t, part) if isinstance(t, QuantizedLinear) else t

    def put(self, name: str, canon: str, e, part, t: torch.Tensor) -> None:
        """Store checkpoint tensor `t` (named `name`; canonical name, expert index and part as the
        loader's plan has them): quantized into its int4 rows, or copied (converted to the model
        dtype) where the field stays plain."""
        I = self.cfg.moe_intermediate_size
        view = target_view(self._targets["qweight"], canon, e, part, I)
        if view.dtype != torch.int32:      # a plain field (only int4 words are int32 in the layout)
            view.copy_(t)
            return
        q, s, z = (target_view(self._targets[p], canon, e, part, I) for p in ("qweight", "scales", "zeros"))
        rows = QuantizedLinear(q, s, z, self.spec.group_size, (*q.shape[:-1], q.shape[-1] * CODES_PER_WORD), name)
        quantize_into(t.to(self.dtype), rows, self.spec.method, chunk_elems=self.chunk_elems)

    def weights(self):
        return self.layout
