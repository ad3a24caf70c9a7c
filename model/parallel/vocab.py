"""The vocabulary split over ranks: each holds rows start..start+count-1 of the embedding and of
the lm_head.

- embedding: every rank looks up the ids it holds and writes zeros for the others, then an
  all-reduce sums the ranks (one non-zero term per row: exact in any dtype);
- lm_head: every rank computes its slice of the logits, then an all-gather lays the slices side
  by side into the whole [rows, V] logits, identical on every rank, so the sampler (whose random
  state is the same on every rank) draws the same token everywhere.
All buffers are allocated here once: the step allocates nothing and can be captured.
"""
from __future__ import annotations

import torch


def masked_embedding_reference(table: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """[n, H]: row t is table[tokens[t] - start] where this shard holds that id, else zeros."""
    local = tokens - start
    held = (local >= 0) & (local < table.shape[0])
    return torch.where(held[:, None], table[local.clamp(0, table.shape[0] - 1)], 0).to(table.dtype)


class VocabShard:
    """Workspaces and the two steps of a vocabulary-parallel embedding and lm_head for up to
    `embed_rows` tokens and `logit_rows` logit rows."""

    def __init__(self, comm, vocab: range, embed_rows: int, logit_rows: int, dtype, device):
        self.comm, self.start, self.count = comm, vocab.start, len(vocab)
        i64 = dict(dtype=torch.int64, device=device)
        self._raw = torch.zeros(embed_rows, **i64)          # id - start
        self._idx = torch.zeros(embed_rows, **i64)          # clamped into the shard
        self._miss = torch.zeros(embed_rows, 1, dtype=torch.bool, device=device)
        self.local_logits = torch.zeros(logit_rows, self.count, dtype=dtype, device=device)
        self._gathered = torch.zeros(comm.world * logit_rows * self.count, dtype=dtype, device=device)

    def embed(self, table: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor) -> None:
        """out [n, H] <- the embedding rows of tokens [n] (ids of the whole vocabulary)."""
        n = tokens.shape[0]
        raw, idx, miss = self._raw[:n], self._idx[:n], self._miss[:n]
        torch.sub(tokens, self.start, out=raw)
        torch.clamp(raw, 0, self.count - 1, out=idx)
        torch.ne(raw, idx, out=miss[:, 0])                  # not held here: another rank writes it
        torch.index_select(table, 0, idx, out=out)
        out.masked_fill_(miss, 0)
        self.comm.all_reduce_(out)

    def logits(self, gemv, normed: torch.Tensor, lm_head: torch.Tensor, out: torch.Tensor) -> None:
        """out [n, V] <- normed [n, H] @ lm_head.T over the whole vocabulary; `gemv(x, w, out)` is
        the backend's projection, run on this rank's rows."""
        n, N, Vl = normed.shape[0], self.comm.world, self.count
        local = self.local_logits[:n]
        gemv(normed, lm_head, local)
        if n == 1:                 # [N, 1, Vl] is [1, V] already
            self.comm.all_gather_into(out, local)
            return
        gathered = self._gathered[:N * n * Vl]
        self.comm.all_gather_into(gathered, local)
        out.view(n, N, Vl).copy_(gathered.view(N, n, Vl).transpose(0, 1))
