"""A rank's weights: the shard of every tensor that ShardPlan names, in the decoder's fused layout.

- empty_shard_weights(plan, device, dtype)   allocate the shard (nothing else)
- shard_weights(w, plan)                      cut a whole ModelWeights (tests, small models)
- random_shard_weights(plan, device, dtype, seed)
      the shard of model.weights.random_weights(plan.cfg, device, dtype, seed), exactly: one
      generator runs through every tensor in random_weights' order (random_inits), so each rank
      draws each whole tensor in turn on its device, keeps its slices and frees the rest; the
      rank's memory holds its shard plus one whole tensor at a time, never the whole model
- check_shard_weights(plan, w)                shapes as the plan says (ValueError naming the field)
The checkpoint reader is model/parallel/load.py.
"""
from __future__ import annotations

import dataclasses

import torch

from ..quant.format import QuantizedLinear
from ..quant.layout import map_weights
from ..weights import ModelWeights, empty_weights, random_inits
from .sharding import ShardPlan


def _check_plan(plan) -> None:
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must be a model.parallel.ShardPlan, got {type(plan).__name__}")


def copy_shard(plan: ShardPlan, name: str, whole: torch.Tensor, out: torch.Tensor) -> None:
    """out <- the shard of tensor `name` cut from its whole value `whole` (any device, dtype)."""
    p = plan.pieces(name)
    if p is None:
        out.copy_(whole)
        return
    for s in p.spans:
        out.narrow(p.dim, s.dst0, s.size).copy_(whole.narrow(p.dim, s.src0, s.size))


def empty_shard_weights(plan: ShardPlan, device, dtype) -> ModelWeights:
    """Uninitialised shard weights on `device` (cfg = plan.local)."""
    _check_plan(plan)
    meta = empty_weights(plan.cfg, "meta", dtype)
    w = map_weights(meta, lambda n, t: torch.empty(plan.local_shape(n, t.shape), device=device, dtype=dtype))
    return dataclasses.replace(w, cfg=plan.local)


@torch.no_grad()
def shard_weights(w: ModelWeights, plan: ShardPlan) -> ModelWeights:
    """The shard of a whole model's weights (new contiguous tensors on w's device)."""
    _check_plan(plan)
    if not isinstance(w, ModelWeights) or w.cfg != plan.cfg:
        raise ValueError(f"the weights are not the plan's model (weights: "
                         f"{getattr(getattr(w, 'cfg', None), 'name', type(w).__name__)}, plan: {plan.cfg.name})")
    out = empty_shard_weights(plan, w.device, w.dtype)
    got = dict(out.tensors())
    for name, t in w.tensors():
        if isinstance(t, QuantizedLinear):
            raise TypeError(f"{name} is int4 (QuantizedLinear): sharding int4 weights is not supported; "
                            f"run the bf16 weights in parallel")
        copy_shard(plan, name, t, got[name])
    return out


@torch.no_grad()
def random_shard_weights(plan: ShardPlan, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> ModelWeights:
    """This rank's shard of random_weights(plan.cfg, device, dtype, seed): equal to cutting the
    single-process model (same device type: same generator)."""
    _check_plan(plan)
    device = torch.device(device)
    out = empty_shard_weights(plan, device, dtype)
    shards = dict(out.tensors())
    whole = dict(empty_weights(plan.cfg, "meta", dtype).tensors())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, init in random_inits(plan.cfg):
        if plan.pieces(name) is None:
            init(shards[name], gen)           # held whole: drawn in place
            continue
        t = torch.empty(whole[name].shape, device=device, dtype=dtype)
        init(t, gen)
        copy_shard(plan, name, t, shards[name])
        del t
    return out


def check_shard_weights(plan: ShardPlan, w: ModelWeights) -> None:
    """ValueError/TypeError naming the field unless w is a plain (not int4) shard of the plan on one device."""
    _check_plan(plan)
    if not isinstance(w, ModelWeights):
        raise TypeError(f"weights must be a ModelWeights, got {type(w).__name__}")
    if w.cfg != plan.local:
        raise ValueError(f"the weights were not built for rank {plan.rank} of {plan.world} of the {plan.cfg.name} "
                         f"model (their config differs from the shard's, plan.local)")
    want = dict(empty_shard_weights(plan, "meta", torch.float32).tensors())
    got = dict(w.tensors())
    if got.keys() != want.keys():
        odd = sorted(got.keys() ^ want.keys())
        raise ValueError(f"the weights' fields differ from the shard's layout: {odd[:4]}")
    for n, t in got.items():
        if isinstance(t, QuantizedLinear):
            raise TypeError(f"{n} is int4 (QuantizedLinear): the parallel decoder runs plain weights only")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(want[n].shape):
            raise ValueError(f"{n} has shape {list(t.shape)}; rank {plan.rank} of {plan.world} holds "
                             f"{list(want[n].shape)} of it")
        if t.device != w.device:
            raise ValueError(f"{n} is on {t.device}, the embedding on {w.device}: the weights must share a device")
