"""Parallel decode benchmark, one process per GPU under torchrun (a benchmark, not a test).

    torchrun --nproc-per-node 2 -m tools.bench_parallel --preset 122b-a10b --context 1024 --out out/parallel
    torchrun --nproc-per-node 1 -m tools.bench_parallel --preset 35b-a3b     # the same path on one GPU

Every rank builds its shard (random weights sharded at creation, or --checkpoint slices) and its
ParallelDecoder, checks that the graph replay (collectives inside) equals eager on every rank
(greedy tokens and the last logits, bit for bit, over --check-steps; nothing is timed otherwise),
fills --context positions, then times the replayed step with CUDA events (median of --steps; the
ranks run in lock-step, the job's step is the slowest rank's). The per-GPU floor is the weight
bytes each rank reads (model.parallel.cost.rank_read_bytes) plus its KV cache over the copy
bandwidth measured on its GPU. A profile of --profile-steps replays (CUPTI kernel records) splits
each rank's step into NCCL kernels, the other kernels, and idle time. Rank 0 prints the table
and writes bench_parallel.json and one Chrome trace per rank.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tools import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m tools.bench_parallel",
                                description=__doc__.split("\n")[0])
    common.add_model_args(p, default_preset="35b-a3b")
    p.add_argument("--context", type=common.positive_int, default=1024)
    p.add_argument("--steps", type=common.positive_int, default=100)
    p.add_argument("--check-steps", type=common.positive_int, default=16, help="graph == eager over N steps")
    p.add_argument("--profile-steps", type=common.nonnegative_int, default=10, help="0 skips the profile")
    p.add_argument("--dist-timeout", type=common.finite_float(0, lo_open=True), default=600.0)
    p.add_argument("--allreduce", choices=("nccl", "symm_mem"), default="nccl",
                   help="the decode step's all-reduce: NCCL, or torch's symmetric-memory one-shot kernel "
                        "(model/parallel/symm_comm.py; run both and compare)")
    p.add_argument("--out", type=Path, default=Path("out/parallel"))
    return p.parse_args(argv)


def split_profile(profile) -> dict:
    """us per step in NCCL kernels, in the others, and idle (span minus kernel time)."""
    nccl = sum(r.us_per_step for r in profile.rows if "nccl" in r.name.lower())
    return {"nccl_us": nccl, "compute_us": profile.busy_us - nccl, "idle_us": profile.idle_us,
            "span_us": profile.span_us, "kernels_per_step": profile.kernels_per_step}


def bench_rank(args, comm, torch) -> dict:
    import dataclasses

    from model.config import ModelConfig
    from model.generation import Generator, SamplingParams
    from model.parallel import ParallelDecoder, ShardPlan, load_checkpoint_shard, random_shard_weights
    from model.parallel.cost import rank_read_bytes
    from tools.bench_decode import fill_context, greedy_tokens

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda", torch.cuda.current_device())
    if args.checkpoint is not None:
        cfg = ModelConfig.from_hf(args.checkpoint)
    else:
        cfg = ModelConfig.preset(args.preset or args.default_preset)
        if args.layers is not None:
            cfg = dataclasses.replace(cfg, num_layers=min(args.layers, cfg.num_layers))
    plan = ShardPlan(cfg, comm.rank, comm.world)
    t0 = time.perf_counter()
    w = (load_checkpoint_shard(args.checkpoint, plan, device, dtype) if args.checkpoint is not None
         else random_shard_weights(plan, device, dtype, args.seed))
    build_s = time.perf_counter() - t0
    from model.parallel.symm_comm import make_comm

    comm = make_comm(args.allreduce, comm, max_batch=1, hidden_size=cfg.hidden_size, dtype=dtype)
    dec = ParallelDecoder(plan, w, comm, max_batch=1, max_seq=args.context + args.check_steps + 8, backend="triton")
    eager = Generator(dec, SamplingParams(), use_graph=False)
    graph = Generator(dec, SamplingParams(), use_graph=True, prefill_graphs=False)
    stream = graph.handle.stream.torch
    e_tok, e_logits = greedy_tokens(eager, 1, args.check_steps, stream, torch)
    g_tok, g_logits = greedy_tokens(graph, 1, args.check_steps, stream, torch)
    same = torch.tensor([int(e_tok == g_tok and torch.equal(e_logits, g_logits))], device=device)
    comm.all_reduce_(same)          # how many ranks agree
    if int(same) != comm.world:
        raise SystemExit(f"graph replay differs from eager on {comm.world - int(same)} rank(s) "
                         f"(this rank: tokens equal {e_tok == g_tok}); no speed reported")
    with torch.cuda.stream(stream):
        dec.reset()
    fill_context(graph, 1, args.context, torch)
    tok = torch.ones(1, dtype=torch.int64, device=device)
    pos = torch.full((1,), args.context - 1, dtype=torch.int64, device=device)
    torch.cuda.synchronize()

    def replay():
        graph.handle(tokens=tok, positions=pos)

    step_ms = statistics.median(common.time_cuda(replay, args.steps, stream=stream))
    bw = common.copy_bandwidth_gbs()
    dtype_bytes = torch.finfo(dtype).bits // 8
    read = rank_read_bytes(plan, dtype_bytes, 1)
    kv = common.kv_bytes_per_token(plan.local, args.context, dtype_bytes)
    row = {"rank": comm.rank, "gpu": torch.cuda.get_device_name(device), "shard_GB": w.nbytes() / 1e9,
           "build_s": build_s, "step_ms": step_ms, "read_bytes": read["total"] + kv, "copy_bandwidth_GBs": bw,
           "floor_ms": (read["total"] + kv) / (bw * 1e9) * 1e3,
           "check": f"graph == eager over {args.check_steps} steps"}
    if args.profile_steps:
        from tools.kernel_profile import profile_replays

        with torch.cuda.stream(stream):
            prof = profile_replays(replay, args.profile_steps, args.out / f"trace_rank{comm.rank}.json")
        row.update(split_profile(prof))
    graph.close()
    eager.close()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = common.require_gpu("bench_parallel")
    from model.parallel import init_distributed, run_rank, torchrun_env

    if torchrun_env() is None:
        common.fail("start it with torchrun: torchrun --nproc-per-node N -m tools.bench_parallel ...")
    args.out.mkdir(parents=True, exist_ok=True)

    def run():
        import torch.distributed as dist

        comm = init_distributed(args.dist_timeout)
        row = bench_rank(args, comm, torch)
        rows = [None] * comm.world
        dist.all_gather_object(rows, row)
        if comm.rank == 0:
            report(args, comm.world, rows)
        return 0

    return run_rank(run)


def report(args, world, rows) -> None:
    step = max(r["step_ms"] for r in rows)           # lock-step: the slowest rank sets the pace
    floor = max(r["floor_ms"] for r in rows)
    result = {"date": time.strftime("%Y-%m-%d"), "world": world, "preset": args.preset or args.default_preset,
              "layers": args.layers, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
              "dtype": args.dtype, "context": args.context, "steps": args.steps, "step_ms": step,
              "tok_s": 1e3 / step, "per_gpu_floor_ms": floor, "floor_over_step": floor / step, "rows": rows,
              "argv": sys.argv}
    (args.out / "bench_parallel.json").write_text(json.dumps(result, indent=1))
    print(f"\n{world} x {rows[0]['gpu']}, {result['preset']}, {args.dtype}, context {args.context}, "
          f"medians of {args.steps} replays; graph == eager checked on every rank")
    print(f"{'rank':>4} {'shard GB':>8} {'GB/tok':>7} {'floor ms':>9} {'step ms':>8} {'floor/step':>10} "
          f"{'nccl us':>8} {'other us':>9} {'idle us':>8}")
    for r in rows:
        print(f"{r['rank']:>4} {r['shard_GB']:>8.2f} {r['read_bytes'] / 1e9:>7.3f} {r['floor_ms']:>9.3f} "
              f"{r['step_ms']:>8.3f} {r['floor_ms'] / r['step_ms']:>10.2f} {r.get('nccl_us', float('nan')):>8.1f} "
              f"{r.get('compute_us', float('nan')):>9.1f} {r.get('idle_us', float('nan')):>8.1f}")
    print(f"step {step:.3f} ms ({1e3 / step:.1f} tok/s), per-GPU floor {floor:.3f} ms: {floor / step:.0%} of the floor")


if __name__ == "__main__":
    sys.exit(main())
