"""Launch configurations of the parallel decode and prefill steps at one rank's local shapes, for a
GPU that need not be here: tools.launch_audit's recorders and rules over a ParallelDecoder of rank
0 of N (every rank has the same shapes) on meta tensors, its collectives no-ops. With --compile each
launch is also compiled offline for the profile's architecture (with the GPU machine's Triton, this
catches front-end errors and shared-memory overflows at the local head / expert / vocabulary counts
before any device time is spent).

    python -m tools.parallel_audit --profile h200 --preset 122b-a10b --world 2,4,8 [--batch 1,8]
           [--prefill 16,4096] [--compile]

Exit status 1 when any launch breaks a rule. tests/test_parallel_audit.py runs the same.
"""
from __future__ import annotations

import argparse
import sys

from tools.launch_audit import (DECODE_MODULES, PREFILL_MODULES, compile_launch, problems, recording,
                                unique)


def _plan_comm(rank: int, world: int):
    """A stand-in for the process group of a shapes-only run: rank `rank` of `world`, no collectives."""
    from model.parallel import LocalComm

    class PlanComm(LocalComm):
        def all_gather_into(self, out, t):
            pass

    c = PlanComm()
    c.rank, c.world = rank, world
    return c


def parallel_decoder(preset: str, world: int, batch: int, max_seq: int, dtype):
    import torch

    from model.config import ModelConfig
    from model.parallel import ParallelDecoder, ShardPlan, empty_shard_weights

    plan = ShardPlan(ModelConfig.preset(preset), 0, world)
    w = empty_shard_weights(plan, torch.device("meta"), dtype)
    return ParallelDecoder(plan, w, _plan_comm(0, world), max_batch=batch, max_seq=max_seq, backend="triton")


def record_parallel(profile, preset: str, worlds, batches=(1,), chunks=(), dtype=None) -> list:
    """The launches of rank 0's decode step (per world and batch) and prefill step (per world and
    chunk) under ``profile``."""
    import torch

    from model.ops.hardware import use_profile

    dtype = torch.bfloat16 if dtype is None else dtype
    meta = torch.device("meta")
    with use_profile(profile), recording(tuple(dict.fromkeys(DECODE_MODULES + PREFILL_MODULES))) as log:
        for n in worlds:
            for b in batches:
                dec = parallel_decoder(preset, n, b, 4096, dtype)
                tokens = torch.zeros(b, dtype=torch.int64, device=meta)
                dec.forward(tokens, tokens.clone())
            for t in chunks:
                dec = parallel_decoder(preset, n, 1, max(t, 16), dtype)
                dec.prefill_step(t).forward(torch.zeros(t, dtype=torch.int64, device=meta),
                                            torch.zeros(3, dtype=torch.int64, device=meta))
    return log


def _ints(text: str, flag: str, ap) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or min(vals) < 1:
        ap.error(f"{flag} needs comma-separated positive ints; got {text!r}")
    return vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.parallel_audit", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h200", help="device preset: a100, l4, l40s, h100, h200")
    ap.add_argument("--preset", default="35b-a3b", help="model preset")
    ap.add_argument("--world", default="2,4,8", help="rank counts, comma-separated")
    ap.add_argument("--batch", default="1", help="decode batches, comma-separated")
    ap.add_argument("--prefill", default="16", help="prefill chunk sizes, comma-separated")
    ap.add_argument("--compile", action="store_true", help="also compile each launch (offline)")
    args = ap.parse_args(argv)
    worlds, batches = _ints(args.world, "--world", ap), _ints(args.batch, "--batch", ap)
    chunks = _ints(args.prefill, "--prefill", ap)
    from model.config import ModelConfig
    from model.ops.hardware import PRESETS
    from model.parallel import check_world
    from model.settings import SETTINGS

    if args.profile not in PRESETS:
        ap.error(f"--profile must be one of {sorted(PRESETS)}; got {args.profile!r}")
    if args.preset not in ModelConfig.preset_names():
        ap.error(f"--preset must be one of {ModelConfig.preset_names()}; got {args.preset!r}")
    for n in worlds:
        try:
            check_world(ModelConfig.preset(args.preset), n)
        except ValueError as e:
            ap.error(f"--world {n}: {e}")
    if args.compile and SETTINGS.interpret:
        ap.error("--compile needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    profile = PRESETS[args.profile]
    launches = unique(record_parallel(profile, args.preset, worlds, batches, chunks))
    bad = 0
    print(f"{profile.name}: {args.preset} at {', '.join(map(str, worlds))} ranks (rank 0's shapes)")
    for L in launches:
        if args.compile:
            compile_launch(L, profile)
        issues = problems(L, profile, pdl_enabled=SETTINGS.pdl)
        bad += bool(issues)
        blocks = {k: v for k, v in L.constexprs.items() if k.startswith("BLOCK") or k == "LOCAL"}
        extra = f" shared={L.compiled['shared']}" if L.compiled else ""
        print(f"{'BAD ' if issues else 'ok  '}{L.kernel:28s} grid={L.grid} {blocks}{extra}"
              + "".join(f"\n      {p}" for p in issues))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
