"""Decode state: preallocated buffers updated in place (addresses never change after creation).

- KV cache of the full-attention layers: one buffer [n_attn, 2, B, NKV, S, D] (model dtype);
  `k(i)`, `v(i)` are the [B, NKV, S, D] views of attention layer i (index among attention layers).
- GDN conv state: [n_lin, B, conv_dim, W] (model dtype), the last W pre-conv inputs.
- GDN recurrent state: [n_lin, B, NV, K, V] in fp32.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


class DecodeState:
    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq: int, device, dtype):
        if max_batch < 1 or max_seq < 1:
            raise ValueError(f"max_batch={max_batch} and max_seq={max_seq} must be >= 1")
        self.cfg, self.max_batch, self.max_seq = cfg, max_batch, max_seq
        self.device, self.dtype = torch.device(device), dtype
        n_att, n_lin = len(cfg.attn_layers), len(cfg.linear_layers)
        self.kv = torch.zeros((n_att, 2, max_batch, cfg.num_key_value_heads, max_seq, cfg.head_dim),
                              device=self.device, dtype=dtype)
        self.conv = torch.zeros((n_lin, max_batch, cfg.conv_dim, cfg.linear_conv_kernel_dim),
                                device=self.device, dtype=dtype)
        self.recurrent = torch.zeros((n_lin, max_batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                      cfg.linear_value_head_dim), device=self.device, dtype=torch.float32)
        # layer index -> index within its kind
        self.slot = {}
        for j, i in enumerate(cfg.attn_layers):
            self.slot[i] = j
        for j, i in enumerate(cfg.linear_layers):
            self.slot[i] = j

    def k(self, layer: int) -> torch.Tensor:
        return self.kv[self.slot[layer], 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.kv[self.slot[layer], 1]

    def conv_state(self, layer: int) -> torch.Tensor:
        return self.conv[self.slot[layer]]

    def recurrent_state(self, layer: int) -> torch.Tensor:
        return self.recurrent[self.slot[layer]]

    def reset(self, row: int | None = None) -> None:
        """Zero the state of one sequence (row) or of all."""
        if row is None:
            for t in (self.kv, self.conv, self.recurrent):
                t.zero_()
            return
        if not isinstance(row, int) or not 0 <= row < self.max_batch:
            raise ValueError(f"row {row!r} out of range [0, {self.max_batch})")
        self.kv[:, :, row].zero_()
        self.conv[:, row].zero_()
        self.recurrent[:, row].zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.conv, self.recurrent))
