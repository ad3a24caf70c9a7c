"""`python -m model.generate` as one rank of a torchrun job (model.generate hands over here when
torchrun's environment is set):

    torchrun --nproc-per-node N -m model.generate --preset tiny --prompt-ids 1,2,3 --max-new-tokens 8
    torchrun --nproc-per-node N -m model.generate --checkpoint DIR --prompt "Hello"

The arguments are model.generate's (plus --dist-timeout) and are checked, with the rank count
against the model's head / expert / vocabulary counts, before the process group starts. Each rank
then builds or loads only its shard (model/parallel/weights.py, load.py) on cuda:LOCAL_RANK (the
CPU with gloo where no GPU is visible) and runs the Generator over its ParallelDecoder; every rank
samples the same tokens, rank 0 prints. A failure on any rank ends every rank (launch.py).
"""
from __future__ import annotations

import argparse
import sys

from .env import set_multicast_off, torchrun_env
from .launch import quiet_other_ranks, run_rank


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from model.generate import build_parser as generate_parser

    from .comm import DEFAULT_TIMEOUT_S

    p = generate_parser()
    p.prog = "torchrun --nproc-per-node N -m model.generate"
    p.add_argument("--dist-timeout", type=_seconds, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds a collective may wait for the other ranks before this rank fails "
                        f"(default {DEFAULT_TIMEOUT_S:g}; loading a checkpoint shard counts)")
    p.add_argument("--allreduce", choices=("nccl", "symm_mem"), default="nccl",
                   help="the decode step's all-reduce: NCCL (default), or torch's symmetric-memory one-shot "
                        "kernel over NVLink peers (CUDA only; larger reductions stay on NCCL)")
    return p


def main(argv=None) -> int:
    env = torchrun_env()
    set_multicast_off()
    quiet_other_ranks(env["RANK"])
    return run_rank(lambda: _main(argv, env))


def _main(argv, env) -> int:
    from model.generate import _check_memory, _generate, _inputs, _notes

    parser = build_parser()
    rank, world = env["RANK"], env["WORLD_SIZE"]
    if rank != 0:
        # the other ranks' output is silenced, but their errors must show: torchrun may stop rank 0
        # before it prints the same error
        def rank_error(message):
            sys.__stderr__.write(f"rank {rank} of {world}: {parser.prog}: error: {message}\n")
            raise SystemExit(2)

        parser.error = rank_error
    args = parser.parse_args(argv)
    error = parser.error
    inp = _inputs(args, error)
    cfg = inp.cfg
    from .sharding import check_world

    try:
        check_world(cfg, world)
    except ValueError as e:
        error(f"--nproc-per-node {world}: {e}")
    if args.quant != "none":
        error(f"--quant {args.quant}: the parallel decoder runs plain (bf16/fp32) weights only; run int4 on one GPU")
    if args.device_loop != "off":
        error(f"--device-loop {args.device_loop}: the device loop is not available in a parallel run yet")

    import torch

    on_gpu = torch.cuda.is_available()
    if args.allreduce != "nccl" and not on_gpu:
        error(f"--allreduce {args.allreduce} needs NCCL on CUDA GPUs; on the CPU the ranks use gloo")
    if on_gpu:
        from model.ops.linear import MAX_BATCH
        if args.batch > MAX_BATCH:
            error(f"--batch {args.batch}: the Triton GEMV decodes at most {MAX_BATCH} rows together")
    device = torch.device("cuda", env["LOCAL_RANK"]) if on_gpu else torch.device("cpu")
    dtype = getattr(torch, args.dtype or "bfloat16") if on_gpu else torch.float32
    backend = "triton" if on_gpu else "reference"
    from .sharding import ShardPlan
    from .weights import empty_shard_weights

    plan = ShardPlan(cfg, env["RANK"], world)
    shard_bytes = empty_shard_weights(plan, "meta", dtype).nbytes()
    _check_memory(args, error, plan.local, device, dtype.itemsize, inp.max_seq, backend,
                  weights=shard_bytes, shard_of=f"rank {plan.rank} of {world}'s shard of ")
    _notes(args, cfg, on_gpu)
    from .comm import init_distributed

    comm = init_distributed(args.dist_timeout)
    from .symm_comm import make_comm

    comm = make_comm(args.allreduce, comm, max_batch=args.batch, hidden_size=cfg.hidden_size, dtype=dtype)
    if args.checkpoint is not None:
        from .load import load_checkpoint_shard

        weights = load_checkpoint_shard(args.checkpoint, plan, device, dtype)
    else:
        from .weights import random_shard_weights

        weights = random_shard_weights(plan, device, dtype, args.seed)
    from .decoder import ParallelDecoder

    decoder = ParallelDecoder(plan, weights, comm, max_batch=args.batch, max_seq=inp.max_seq, backend=backend)
    where = (f"{world} x {torch.cuda.get_device_name(device)}" if on_gpu else f"CPU, {world} ranks") \
        + f" ({comm.backend})"
    return _generate(args, inp, decoder, use_graph=on_gpu and not args.no_graph, device_loop=None, where=where)


if __name__ == "__main__":
    sys.exit(main())
