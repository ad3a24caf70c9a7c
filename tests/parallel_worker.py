"""One rank of the CPU multi-process tests (tests/test_parallel_ranks.py), started by
tests/dist_launch.run_ranks with torchrun's environment:

    python -m tests.parallel_worker --out DIR --cases tiny,triton,ckpt [--checkpoint DIR]

Each case builds this rank's shard, runs tests/parallel_cases.py's sequence through a
ParallelDecoder over gloo and stores what it saw in DIR/rank{R}.pt (the test compares it with the
single-process decoder). Cases `fail` / `stall`: rank 1 raises (at once / after 2 timeouts, alive meanwhile) before a
collective that rank 0 enters; every rank must end non-zero, rank 0 at once / at the timeout of
its process group (model.parallel.launch.run_rank)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tests import parallel_cases as pc


def _decoder(comm, weights_of, backend, max_batch=2):
    from model.parallel import ParallelDecoder, ShardPlan

    plan = ShardPlan(pc.tiny() if weights_of is None else weights_of[0], comm.rank, comm.world)
    w = weights_of[1](plan) if weights_of is not None else None
    return ParallelDecoder(plan, w, comm, max_batch=max_batch, max_seq=32, backend=backend)


def run(args) -> int:
    from model.parallel import init_distributed, load_checkpoint_shard, random_shard_weights

    comm = init_distributed(timeout_s=args.timeout)
    results = {}
    random_w = (pc.tiny(), lambda plan: random_shard_weights(plan, "cpu", torch.float32, pc.SEED))
    for case in args.cases.split(","):
        if case == "tiny":
            dec = _decoder(comm, random_w, "reference")
            results[case] = {"greedy": pc.greedy(dec), "generate": pc.generate(dec),
                             "embed_shape": tuple(dec.weights.embed.shape),
                             "experts_shape": tuple(dec.weights.layers[0].moe.gate_up_proj.shape)}
        elif case == "triton":       # Triton kernels under the CPU interpreter: one row, fewer steps
            dec = _decoder(comm, random_w, "triton", max_batch=1)
            results[case] = {"greedy": pc.greedy(dec, pc.PROMPTS[:1], 2)}
        elif case == "ckpt":
            from model.config import ModelConfig

            cfg = ModelConfig.from_hf(args.checkpoint)
            dec = _decoder(comm, (cfg, lambda plan: load_checkpoint_shard(args.checkpoint, plan, "cpu")), "reference")
            results[case] = {"greedy": pc.greedy(dec)}
        elif case in ("fail", "stall"):
            import datetime

            import torch.distributed as dist
            from model.parallel import Comm

            # a group whose collectives time out after --stall-timeout (the world group's is generous,
            # so that start-up skew between the ranks never trips it)
            short = Comm(dist.new_group(timeout=datetime.timedelta(seconds=args.stall_timeout)))
            if comm.rank == 1:
                if case == "stall":             # alive but stuck: rank 0 must give up at the timeout
                    time.sleep(2 * args.stall_timeout)
                raise ValueError(f"injected failure on rank 1 ({case})")
            short.all_reduce_(torch.ones(4))    # waits for rank 1, which never comes
            results[case] = "not reached"
        else:
            raise ValueError(f"unknown case {case!r}")
    torch.save(results, Path(args.out) / f"rank{comm.rank}.pt")
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cases", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--stall-timeout", type=float, default=1.5)
    args = p.parse_args()
    from model.parallel import run_rank

    return run_rank(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
