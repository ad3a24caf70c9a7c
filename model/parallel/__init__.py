"""Parallel decode of Qwen3.5-MoE over N ranks (torch.distributed: NCCL on GPUs, gloo on the CPU;
one process per rank, started by torchrun): tensor parallel attention and Gated DeltaNet, expert
parallel routed experts, tensor parallel shared expert, vocabulary-parallel embedding and lm_head.
Each rank holds, builds and loads only its shard. docs/parallel.md.

    comm = init_distributed()                          # from torchrun's environment
    plan = ShardPlan(cfg, comm.rank, comm.world)       # refuses counts that do not divide
    w = random_shard_weights(plan, device, dtype, seed)   # or load_checkpoint_shard(dir, plan, device)
    dec = ParallelDecoder(plan, w, comm, max_batch=1, max_seq=4096, backend="triton")
    Generator(dec, ...)                                # as on one GPU; the same tokens on every rank

The names below load their module on first use (model.parallel.env stays free of torch).
"""
import importlib

_WHERE = {
    "Comm": "comm", "LocalComm": "comm", "init_distributed": "comm",
    "torchrun_env": "env", "set_multicast_off": "env", "MULTICAST_OFF": "env",
    "ParallelDecoder": "decoder", "ParallelPrefillStep": "prefill",
    "load_checkpoint_shard": "load",
    "ShardPlan": "sharding", "check_world": "sharding",
    "check_shard_weights": "weights", "empty_shard_weights": "weights", "random_shard_weights": "weights",
    "shard_weights": "weights",
    "run_rank": "launch", "quiet_other_ranks": "launch",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
