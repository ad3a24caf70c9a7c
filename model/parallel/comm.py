"""The collectives of parallel decode, over a torch.distributed process group (NCCL on GPUs,
gloo on the CPU), and the process group's start-up.

`Comm` is what the sharded decoder calls: all_reduce_(t) (sum, in place) and all_gather_into(out,
t) (out = the ranks' t one after another). `LocalComm` is the one-rank version (no collectives).
Both launch on the caller's current stream, so a CUDA-graph capture of the step records them
(NCCL supports capture; docs/parallel.md says what it needs).

`init_distributed()` starts the process group from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) with a timeout on every collective, after setting the
NVLink-multicast switches off in os.environ (inherited by child processes): multicast stays off
on the machines this runs on.
"""
from __future__ import annotations

import datetime

import torch

from .env import set_multicast_off, torchrun_env

DEFAULT_TIMEOUT_S = 600.0     # a collective that waits longer than this fails (a rank died or hangs)


class LocalComm:
    """One rank, no process group: the reductions are identities."""

    rank, world, backend = 0, 1, "none"

    def all_reduce_(self, t: torch.Tensor) -> None:
        pass

    def all_gather_into(self, out: torch.Tensor, t: torch.Tensor) -> None:
        if out.data_ptr() != t.data_ptr():
            out.view(-1).copy_(t.reshape(-1))

    def barrier(self) -> None:
        pass


class Comm:
    """The collectives over a process group (default: the world group)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed has no process group: call model.parallel.init_distributed() "
                               "(or torch.distributed.init_process_group) first")
        self._dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        # all_gather_single is the newer name (torch >= 2.13); all_gather_into_tensor before it
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_reduce_(self, t: torch.Tensor) -> None:
        """t <- the sum of every rank's t (in place)."""
        self._dist.all_reduce(t, group=self.group)

    def all_gather_into(self, out: torch.Tensor, t: torch.Tensor) -> None:
        """out (contiguous, world * t.numel() elements) <- rank 0's t, rank 1's t, ..."""
        if out.numel() != self.world * t.numel() or not out.is_contiguous() or not t.is_contiguous():
            raise ValueError(f"all_gather_into: out must be contiguous with {self.world} x {t.numel()} elements "
                             f"and t contiguous, got out {tuple(out.shape)}, t {tuple(t.shape)}")
        self._gather(out.view(-1), t.view(-1), group=self.group)

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world={self.world}, backend={self.backend})"


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> Comm:
    """Start (or reuse) the world process group from torchrun's environment and return its Comm.
    backend None: NCCL where CUDA is available (this rank on cuda:LOCAL_RANK, its communicator
    made now, not at the first collective, which may be inside a graph capture), else gloo.
    Every collective fails after timeout_s instead of waiting for a rank that died or hangs."""
    import torch.distributed as dist

    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    env = torchrun_env()
    if env is None:
        raise ValueError("init_distributed needs torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                         "MASTER_PORT): start with python -m torch.distributed.run --nproc-per-node N ...")
    set_multicast_off()
    if dist.is_initialized():
        return Comm()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    kw = {}
    if backend == "nccl":
        n = torch.cuda.device_count()
        if env["LOCAL_RANK"] >= n:
            raise ValueError(f"LOCAL_RANK={env['LOCAL_RANK']} but this process sees {n} CUDA device(s): start at most "
                             f"{n} ranks per host (--nproc-per-node), each rank seeing every GPU of the host "
                             f"(rank k runs on cuda:LOCAL_RANK; do not narrow CUDA_VISIBLE_DEVICES per rank)")
        torch.cuda.set_device(env["LOCAL_RANK"])
        kw["device_id"] = torch.device("cuda", env["LOCAL_RANK"])
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)),
                            rank=env["RANK"], world_size=env["WORLD_SIZE"], **kw)
    return Comm()
