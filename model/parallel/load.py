"""Load one rank's shard from a Hugging Face safetensors checkpoint, reading only its slices.

Every name, shape and dtype is checked from the file headers first, exactly as
model.checkpoint.load_checkpoint checks them (the same plan); then each tensor's slices that the
rank holds are read with safetensors' `get_slice` (a per-expert tensor of another rank's expert
is not read at all) straight into the preallocated shard. No rank reads or allocates the whole
model: its memory holds its shard and one slice at a time.
"""
from __future__ import annotations

import os
import sys

import torch

from ..checkpoint import CheckpointError, _dtype_name, _files, _OpenFiles, _plan
from ..config import ModelConfig
from ..weights import ModelWeights, empty_weights, hf_targets
from .sharding import Pieces, ShardPlan, Span
from .weights import empty_shard_weights


def hf_layout(cfg: ModelConfig) -> dict:
    """transformers' name (as model.weights.hf_targets names it) -> (our tensor's name, first row,
    rows): where each checkpoint tensor sits in our fused layout, read off hf_targets' views."""
    meta = empty_weights(cfg, "meta", torch.float32)
    owner = {id(t): n for n, t in meta.tensors()}
    out = {}
    for hf, view in hf_targets(meta).items():
        base = view if view._base is None else view._base
        first = view.storage_offset() // base.stride(0) if base.dim() > 1 else 0
        out[hf] = (owner[id(base)], first, view.shape[0])
    return out


def _spans_within(p: Pieces, first: int, rows: int) -> Pieces:
    """The spans of p in rows first..first+rows-1 of our tensor (one part of a fused tensor),
    relative to the part: rows of the checkpoint tensor and places in the shard's part."""
    if p.dim != 0:
        return p                    # split along columns: the checkpoint tensor is the whole of ours
    inside = [s for s in p.spans if first <= s.src0 < first + rows]
    assert inside and all(s.src1 <= first + rows for s in inside), (p, first, rows)
    d0 = inside[0].dst0
    return Pieces(0, tuple(Span(s.src0 - first, s.src1 - first, s.dst0 - d0) for s in inside))


def _read(sl, dim: int, s: Span) -> torch.Tensor:
    return sl[(slice(None),) * dim + (slice(s.src0, s.src1),)]


@torch.no_grad()
def load_checkpoint_shard(ckpt_dir, plan: ShardPlan, device="cuda", dtype=None, *, verbose: bool = True,
                          strict_config: bool = True) -> ModelWeights:
    """Rank plan.rank's shard (cfg = plan.local) of the checkpoint in `ckpt_dir`, whose config
    must be plan.cfg. dtype None keeps the checkpoint's (the embedding's, every tensor alike);
    a dtype converts. CheckpointError as load_checkpoint raises it (missing, unexpected,
    mis-shaped tensors; an int4 checkpoint: not supported in parallel)."""
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must be a model.parallel.ShardPlan, got {type(plan).__name__}")
    ckpt_dir = os.fspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    cfg = ModelConfig.from_hf(ckpt_dir, strict=strict_config)
    if cfg != plan.cfg:
        raise ValueError(f"{ckpt_dir} holds a different model ({cfg.name}) than the shard plan's ({plan.cfg.name})")
    from ..quant.reader import read_quantization_config

    if read_quantization_config(ckpt_dir) is not None:
        raise CheckpointError(f"{ckpt_dir} is an int4 checkpoint: the parallel decoder runs plain (bf16/fp32) "
                              f"weights only")
    files = _OpenFiles()
    handle, handles = files.handle, files.handles

    try:
        ck = _plan(cfg, _files(ckpt_dir), cfg.tie_word_embeddings, files.meta)
        if dtype is None:
            dtypes = {d for *_, d in ck.assign}
            dtype = next(d for n, _, c, _, _, d in ck.assign if c == "embed_tokens.weight")
            if len(dtypes) > 1:
                odd = next(n for n, *_, d in ck.assign if d != dtype)
                raise CheckpointError(f"tensor {odd} is not {_dtype_name(dtype)} like the checkpoint's embedding; "
                                      f"pass dtype=... to convert every tensor to one dtype")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        w = empty_shard_weights(plan, torch.device(device), dtype)
        targets, layout = hf_targets(w), hf_layout(cfg)
        I, experts = cfg.moe_intermediate_size, plan.experts
        for name, path, canon, e, part, _ in ck.assign:
            sl = handle(path).get_slice(name)
            if e is not None:                     # one expert's gate, up or down projection
                if e not in experts:
                    continue                      # another rank's: never read
                le = e - experts.start
                if part == "down_proj":
                    dst = targets[canon + ".down_proj"][le]
                else:
                    gu = targets[canon + ".gate_up_proj"][le]
                    dst = gu[:I] if part == "gate_proj" else gu[I:]
                dst.copy_(sl[:])
                continue
            ours, first, rows = layout[canon]
            dst, p = targets[canon], plan.pieces(ours)
            if p is None:
                dst.copy_(sl[:])
                continue
            p = _spans_within(p, first, rows)
            assert p.size == dst.shape[p.dim], (canon, p, tuple(dst.shape))
            for s in p.spans:
                dst.narrow(p.dim, s.dst0, s.size).copy_(_read(sl, p.dim, s))
    finally:
        handles.clear()
    if verbose and ck.skipped:
        groups = ", ".join(f"{k} ({v})" for k, v in sorted(ck.skipped.items()))
        print(f"load_checkpoint_shard: skipped tensors of known extra groups: {groups}", file=sys.stderr)
    return w
