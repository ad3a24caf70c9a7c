"""The chunked prefill of one rank of N: model.prefill.PrefillStep over the rank's shard, with
the collectives at the decode step's points (all-reduce after out_proj / o_proj and after the
experts, vocabulary-parallel embedding and lm_head). The grouped experts see the rank's experts
only: the router's ids of other ranks' experts are -1, which the grouping never places (no GEMM
work, nothing read), on both backends."""
from __future__ import annotations

from ..prefill import PrefillStep
from .vocab import VocabShard


class ParallelPrefillStep(PrefillStep):
    def __init__(self, decoder, chunk):
        self.plan, self.comm = decoder.plan, decoder.comm
        super().__init__(decoder, chunk)

    def _experts_held(self) -> int:
        return len(self.plan.experts)

    def _alloc(self, dev, dt):
        super()._alloc(dev, dt)
        self.vocab_shard = VocabShard(self.comm, self.plan.vocab, self.chunk, 1, dt, dev)

    def _embed(self, tokens, out) -> None:
        self.vocab_shard.embed(self.decoder.weights.embed, tokens, out)

    def _lm_head(self, normed, logits) -> None:
        self.vocab_shard.logits(self.ops.gemv, normed, self.decoder.weights.lm_head, logits)

    def _route(self, router_logits, topk_weights, topk_ids) -> None:
        e = self.plan.experts
        self.ops.router_topk(router_logits, self.cfg.num_experts_per_tok, topk_weights, topk_ids,
                             local_experts=(e.start, len(e)))

    def _gdn(self, i, m, x, out, info):
        super()._gdn(i, m, x, out, info)
        self.comm.all_reduce_(out)

    def _attention(self, i, m, x, out, info):
        super()._attention(i, m, x, out, info)
        self.comm.all_reduce_(out)

    def _moe(self, m, x, out, info):
        super()._moe(m, x, out, info)
        self.comm.all_reduce_(out)
