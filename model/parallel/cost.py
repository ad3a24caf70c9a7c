"""The weight bytes one rank reads per decode step: the per-GPU floor of a parallel run is that
divided by the GPU's bandwidth (the slowest rank sets the step, and with uniform routing every
rank reads about the same)."""
from __future__ import annotations

import torch

from .sharding import ShardPlan
from .weights import empty_shard_weights


def rank_read_bytes(plan: ShardPlan, dtype_bytes: int = 2, batch: int = 1) -> dict:
    """{"experts": ..., "lm_head": ..., "other": ..., "total": ...} bytes rank plan.rank reads per
    step of `batch` rows: every tensor of its shard once, except the embedding (`batch` rows) and
    the routed experts (of its E/N, the expected number hit by batch x top_k uniform picks over all
    E: (E/N) (1 - (1 - k/E)^batch) a layer). At one rank this is ModelConfig.bytes_per_token."""
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must be a ShardPlan, got {type(plan).__name__}")
    for name, v in (("dtype_bytes", dtype_bytes), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    cfg = plan.cfg
    w = empty_shard_weights(plan, "meta", torch.float32)
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    hit = 1 - (1 - k / E) ** batch
    out = {"experts": 0.0, "lm_head": 0.0, "other": 0.0}
    for name, t in w.tensors():
        n = t.numel()
        if name.endswith(("moe.gate_up_proj", "moe.down_proj")):
            out["experts"] += n * hit
        elif name == "embed":
            out["other"] += batch * cfg.hidden_size
            if cfg.tie_word_embeddings:
                out["lm_head"] += n
        elif name == "lm_head":
            out["lm_head"] += n
        else:
            out["other"] += n
    out = {key: v * dtype_bytes for key, v in out.items()}
    out["total"] = sum(out.values())
    return out
