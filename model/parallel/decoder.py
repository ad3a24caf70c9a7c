"""The decode step of one rank of N: model.decoder.Decoder over the rank's shard (ShardPlan),
the same ops on the local shapes, with the collectives where the shards' partial results meet.

Per layer (as Decoder; + marks what this adds):
  GDN / attention on the rank's heads -> out_proj / o_proj on its columns  + all-reduce (sum)
  router over every expert (replicated, identical on every rank)
  + ids of other ranks' experts -> -1 (router_topk local_experts): the experts kernel skips them
  experts on the rank's experts + gated shared expert on its columns          + all-reduce (sum)
and the vocabulary-parallel embedding (+ all-reduce) and lm_head (+ all-gather of the logits).
The rest of Decoder (state, checks, prefill, the Generator and its graphs) works unchanged: the
logits buffer holds the whole vocabulary, identical on every rank.
"""
from __future__ import annotations

from ..decoder import Decoder
from .comm import Comm, LocalComm
from .sharding import ShardPlan
from .vocab import VocabShard
from .weights import check_shard_weights


def check_comm(plan: ShardPlan, comm) -> None:
    if not isinstance(comm, (Comm, LocalComm)):
        raise TypeError(f"comm must be a model.parallel.Comm or LocalComm, got {type(comm).__name__}")
    if (comm.rank, comm.world) != (plan.rank, plan.world):
        raise ValueError(f"the process group is rank {comm.rank} of {comm.world}, the shard plan rank "
                         f"{plan.rank} of {plan.world}")


class ParallelDecoder(Decoder):
    """Decoder over rank plan.rank's shard `weights` (cfg = plan.local), reducing through `comm`."""

    def __init__(self, plan: ShardPlan, weights, comm, *, max_batch: int, max_seq: int, backend: str = "triton"):
        if not isinstance(plan, ShardPlan):
            raise TypeError(f"plan must be a model.parallel.ShardPlan, got {type(plan).__name__}")
        check_comm(plan, comm)
        check_shard_weights(plan, weights)     # before Decoder's checks, whose messages know no shards
        self.plan, self.comm = plan, comm
        super().__init__(plan.local, weights, max_batch=max_batch, max_seq=max_seq, backend=backend)

    def _check_weights(self, weights) -> None:
        pass                                   # checked against the plan above

    def _alloc_workspaces(self):
        super()._alloc_workspaces()
        self.vocab_shard = VocabShard(self.comm, self.plan.vocab, self.max_batch, self.max_batch, self.dtype,
                                      self.device)

    def _prefill_class(self):
        from .prefill import ParallelPrefillStep

        return ParallelPrefillStep

    # ---- the replaced steps ---------------------------------------------------------------------
    def _embed(self, tokens, out) -> None:
        self.vocab_shard.embed(self.weights.embed, tokens, out)

    def _lm_head(self, normed, logits) -> None:
        self.vocab_shard.logits(self.ops.gemv, normed, self.weights.lm_head, logits)

    def _local_experts(self) -> tuple:
        e = self.plan.experts
        return (e.start, len(e))

    def _gdn(self, i, m, norm_in, out, r0, r1):
        super()._gdn(i, m, norm_in, out, r0, r1)
        self.comm.all_reduce_(out)

    def _attention(self, i, m, norm_in, out, positions, r0, r1):
        super()._attention(i, m, norm_in, out, positions, r0, r1)
        self.comm.all_reduce_(out)

    def _moe(self, m, norm_in, out, n):
        super()._moe(m, norm_in, out, n)
        self.comm.all_reduce_(out)
