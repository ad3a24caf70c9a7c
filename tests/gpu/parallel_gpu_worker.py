"""One rank of the multi-GPU tests (tests/gpu/test_parallel_gpu.py), started with torchrun's
environment by tests/dist_launch.run_ranks, on cuda:LOCAL_RANK with NCCL:

    python -m tests.gpu.parallel_gpu_worker --out DIR --case graph_eager|one_gpu --preset P [--layers L] [--allreduce nccl|symm_mem]
           [--dtype bfloat16|float32] [--steps S]

graph_eager: the Generator's greedy run over S steps eagerly, then replayed as CUDA graphs (decode
step and prefill, collectives inside), from the same state: tokens and every step's logits (a
bitwise checksum of the row) must be identical on this rank.
one_gpu: the same greedy run through graphs, and the single-GPU Decoder on the whole model (built
on this rank's GPU from the same seed): tokens, and the logits teacher-forced with the parallel run's
tokens (max |diff| / max |logit|).
Writes DIR/rank{R}.json."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

PROMPT = [5, 17, 200, 42, 7, 99, 3, 250, 11]


def checksum(row: torch.Tensor) -> int:
    """A position-weighted sum of the row's bits: equal rows give equal sums, and a change of any
    element (or a swap of two) changes it."""
    bits = row.contiguous().view(torch.int16 if row.element_size() == 2 else torch.int32).to(torch.int64)
    return int((bits * torch.arange(1, bits.numel() + 1, device=row.device)).sum())


def greedy(dec, steps, use_graph):
    """(tokens, per-step logits checksums) of the Generator's greedy run from PROMPT."""
    from model.generation import Generator, SamplingParams

    sums = []

    def record(step, tokens):
        torch.cuda.synchronize()
        sums.append(checksum(dec.logits[0]))

    with Generator(dec, SamplingParams(), use_graph=use_graph) as gen:
        toks = gen.generate([PROMPT], steps, on_tokens=record).tokens[0]
    return toks, sums


def run(args) -> int:
    from model.config import ModelConfig
    from model.parallel import ParallelDecoder, ShardPlan, init_distributed, random_shard_weights

    from model.parallel.symm_comm import make_comm

    comm = init_distributed(timeout_s=args.timeout)
    cfg = ModelConfig.preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    dtype = getattr(torch, args.dtype)
    comm = make_comm(args.allreduce, comm, max_batch=1, hidden_size=cfg.hidden_size, dtype=dtype)
    device = torch.device("cuda", torch.cuda.current_device())
    plan = ShardPlan(cfg, comm.rank, comm.world)
    w = random_shard_weights(plan, device, dtype, seed=0)
    max_seq = len(PROMPT) + args.steps + 8
    dec = ParallelDecoder(plan, w, comm, max_batch=1, max_seq=max_seq, backend="triton")
    out = {"rank": comm.rank, "world": comm.world, "gpu": torch.cuda.get_device_name(device),
           "shard_GB": w.nbytes() / 1e9}
    if args.case == "graph_eager":
        out["eager"] = greedy(dec, args.steps, use_graph=False)
        out["graph"] = greedy(dec, args.steps, use_graph=True)
    elif args.case == "one_gpu":
        from model.decoder import Decoder
        from model.weights import random_weights

        toks, _ = greedy(dec, args.steps, use_graph=True)
        del dec, w
        torch.cuda.empty_cache()
        whole = Decoder(cfg, random_weights(cfg, device, dtype, seed=0), max_batch=1, max_seq=max_seq,
                        backend="triton")
        ref_toks, _ = greedy(whole, args.steps, use_graph=True)
        out["tokens"], out["one_gpu_tokens"] = toks, ref_toks
    else:
        raise ValueError(f"unknown case {args.case!r}")
    Path(args.out, f"rank{comm.rank}.json").write_text(json.dumps(out))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--preset", default="35b-a3b")
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--allreduce", default="nccl")
    args = p.parse_args()
    from model.parallel import run_rank

    return run_rank(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
