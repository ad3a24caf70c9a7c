"""Start N ranks of a Python module as separate processes with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), as the CPU multi-process tests
do, and collect each rank's exit status and output. Every run has a deadline: past it every rank
is killed and the test fails saying so (a bug must never hang the suite)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class RankResult(NamedTuple):
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra or {})
    return env


def run_ranks(world: int, args: list, *, timeout: float = 90.0, env: dict | None = None) -> list:
    """Run `python *args` as ranks 0..world-1; [RankResult] in rank order, or AssertionError (all
    killed) when they are not all done within `timeout` seconds."""
    port = free_port()
    procs = []
    for r in range(world):
        e = child_env({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env or {})})
        procs.append(subprocess.Popen([sys.executable, *map(str, args)], env=e, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + timeout
    out = []
    try:
        for r, p in enumerate(procs):
            so, se = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            out.append(RankResult(r, p.returncode, so, se))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        raise AssertionError(f"{world} ranks of {args} were not done within {timeout:.0f} s (killed): a hang") from None
    return out


def check_ok(results) -> None:
    bad = [r for r in results if r.returncode != 0]
    assert not bad, "\n".join(f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-3000:]}" for r in bad)
