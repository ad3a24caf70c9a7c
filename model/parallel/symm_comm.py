"""torch's symmetric-memory one-shot all-reduce as the decode step's reduction: the alternative to
NCCL that issue 14 asks to measure (tools/bench_parallel.py --allreduce), chosen with
`--allreduce symm_mem` where it is the faster of the two and both are correct.

One buffer per rank in symmetric memory (torch.distributed._symmetric_memory: every rank maps the
others' buffers over NVLink), sized for the decode step's reductions ([batch, hidden] rows). An
all-reduce copies the rows in and runs the one-shot kernel, each rank reading every peer's buffer
and writing the sum back into the caller's tensor. What does not fit (the prefill's [tokens,
hidden] chunks) or is not contiguous in the buffer's dtype goes to NCCL, which wins on large
messages anyway. NVLink multicast stays off (set_multicast_off: TORCH_SYMM_MEM_DISABLE_MULTICAST=1),
so the kernel uses peer loads only. The ops launch on the current stream, so a graph capture of
the step records them like the NCCL calls.
"""
from __future__ import annotations

import torch

from .comm import Comm

ALLREDUCE = ("nccl", "symm_mem")


def check_allreduce(kind) -> str:
    if kind not in ALLREDUCE:
        raise ValueError(f"allreduce must be one of {ALLREDUCE}, got {kind!r}")
    return kind


class SymmMemComm(Comm):
    """Comm whose all_reduce_ of up to `max_numel` elements of `dtype` runs the one-shot
    symmetric-memory kernel; everything else as Comm (NCCL)."""

    def __init__(self, group=None, *, max_numel: int, dtype: torch.dtype):
        super().__init__(group)
        if isinstance(max_numel, bool) or not isinstance(max_numel, int) or max_numel < 1:
            raise ValueError(f"max_numel must be an int >= 1, got {max_numel!r}")
        if self.backend != "nccl" or not torch.cuda.is_available():
            raise ValueError(f"allreduce='symm_mem' needs NCCL on CUDA GPUs (NVLink peers); this process group "
                             f"is {self.backend}: use allreduce='nccl'")
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        op = getattr(torch.ops.symm_mem, "one_shot_all_reduce_out", None)
        if op is None:
            raise ValueError(f"allreduce='symm_mem': torch {torch.__version__} has no "
                             "torch.ops.symm_mem.one_shot_all_reduce_out; use allreduce='nccl'")
        self._op = op
        self._group_name = (group if group is not None else dist.group.WORLD).group_name
        self.max_numel, self.dtype = max_numel, dtype
        self._buf = symm_mem.empty(max_numel, device=torch.device("cuda", torch.cuda.current_device()), dtype=dtype)
        symm_mem.rendezvous(self._buf, self._group_name)
        self.backend = "nccl+symm_mem"

    def fits(self, t: torch.Tensor) -> bool:
        return t.dtype == self.dtype and t.is_contiguous() and t.numel() <= self.max_numel and t.is_cuda

    def all_reduce_(self, t: torch.Tensor) -> None:
        if not self.fits(t):
            super().all_reduce_(t)
            return
        flat = t.view(-1)
        buf = self._buf[:flat.numel()]
        buf.copy_(flat)
        self._op(buf, "sum", self._group_name, flat)


def make_comm(kind: str, comm: Comm, *, max_batch: int, hidden_size: int, dtype: torch.dtype) -> Comm:
    """`comm` as is for "nccl"; for "symm_mem" a SymmMemComm over the same group whose buffer holds
    the decode step's [max_batch, hidden_size] reductions."""
    if check_allreduce(kind) == "nccl":
        return comm
    return SymmMemComm(comm.group, max_numel=max_batch * hidden_size, dtype=dtype)
