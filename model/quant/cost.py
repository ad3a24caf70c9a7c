"""Bytes one decode step reads from the weights as they are held (bf16, int4 or mixed): the floor
a benchmark puts beside its figure. Batch-1 decode reads every active weight once: the whole
lm_head, one embedding row per row of the batch, every projection of every layer (GDN or
attention, router + shared expert, the norms), and of the routed experts the expected share that
`batch` rows of top-k picks touch (1 - (1 - k/E)^batch of them, as ModelConfig.weight_counts
counts). An int4 field counts its codes, scales and zeros (QuantizedLinear.nbytes).

For bf16 weights the total equals cfg.bytes_per_token(dtype_bytes, batch) (up to the rounding of
the expert share).
"""
from __future__ import annotations

from ..weights import ModelWeights
from .format import QuantizedLinear


def _nbytes(t) -> int:
    return t.nbytes() if isinstance(t, QuantizedLinear) else t.numel() * t.element_size()


def read_bytes_per_token(w: ModelWeights, batch: int = 1) -> dict:
    """{group: bytes} read from the weights by one decode step of `batch` rows, and "total"."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    cfg = w.cfg
    share = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch
    out = {"lm_head": _nbytes(w.lm_head), "embedding_row": batch * w.embed[0].numel() * w.embed.element_size(),
           "gdn": 0, "attention": 0, "experts": 0.0, "router_shared": 0,
           "norms": _nbytes(w.final_norm)}
    for L in w.layers:
        out["norms"] += _nbytes(L.input_norm) + _nbytes(L.post_norm)
        mixer = "attention" if hasattr(L.mixer, "qkv") else "gdn"
        out[mixer] += sum(_nbytes(getattr(L.mixer, f)) for f in L.mixer.__dataclass_fields__)
        out["router_shared"] += _nbytes(L.moe.router_shared) + _nbytes(L.moe.shared_down)
        out["experts"] += share * (_nbytes(L.moe.gate_up_proj) + _nbytes(L.moe.down_proj))
    out["experts"] = round(out["experts"])
    out["total"] = sum(out.values())
    return out
