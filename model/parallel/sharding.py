"""Which part of every weight a rank holds: the shard plan of N-way tensor + expert parallel decode.

Rank r of N holds (ranges are contiguous, rank-ordered):
- attention: query heads NH/N (each with its gate); KV heads NKV/N, or, where N exceeds NKV, the
  one KV head its query heads read (replicated over N/NKV ranks); o_proj's columns of its heads;
- Gated DeltaNet: value heads NV/N, key heads NK/N or the one its value heads read (replicated
  where N exceeds NK); in_proj's q/k/v/z/b/a rows, conv channels, A_log, dt_bias of those heads,
  out_proj's columns of its value heads;
- MoE: the router whole (every rank routes every token over every expert, identically); experts
  E/N (expert parallel); the shared expert's intermediate Is/N (gate and up rows, down columns);
- embedding and lm_head: vocabulary rows V/N.
Norm weights are whole everywhere. The rank's decoder runs the unchanged ops on `local` (a
ModelConfig with the local head counts and shared width; vocab_size and num_experts stay the
whole model's: the gathered logits and the router span them), and all-reduces after o_proj /
out_proj, after the experts (routed share + its gated shared-expert part), and after the
embedding (docs/parallel.md).

`pieces(name)` maps a tensor of ModelWeights.tensors() from the whole model to the shard: the dim
it is split along and the spans (src_start, src_stop, dst_start) that make the shard, or None
where the tensor is whole on every rank.
"""
from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import NamedTuple

from ..config import ModelConfig


class Span(NamedTuple):
    src0: int     # rows (or columns) src0..src1-1 of the whole tensor
    src1: int
    dst0: int     # land at dst0.. of the shard

    @property
    def size(self) -> int:
        return self.src1 - self.src0


class Pieces(NamedTuple):
    dim: int
    spans: tuple

    @property
    def size(self) -> int:
        return sum(s.size for s in self.spans)


def _concat(ranges) -> tuple:
    """Spans of (src0, src1) ranges laid one after another in the shard."""
    out, dst = [], 0
    for a, b in ranges:
        out.append(Span(a, b, dst))
        dst += b - a
    return tuple(out)


def _heads(rank: int, world: int, heads: int, groups: int):
    """(range of this rank's heads, range of its group heads) for `heads` split N ways, each group
    head serving heads // groups consecutive heads (GQA: KV heads; GDN: key heads)."""
    per = heads // world
    mine = range(rank * per, (rank + 1) * per)
    per_group = heads // groups
    first, last = mine.start // per_group, (mine.stop - 1) // per_group
    return mine, range(first, last + 1)


def check_world(cfg: ModelConfig, world) -> None:
    """ValueError naming the numbers unless `world` ranks can share cfg's model: each count that
    is split must divide by it, and where it exceeds the KV heads (or GDN key heads) their number
    must divide it (each rank then holds one, replicated)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"the number of ranks must be an int >= 1, got {world!r}")
    split = [("num_attention_heads", cfg.num_attention_heads),
             ("linear_num_value_heads", cfg.linear_num_value_heads),
             ("num_experts", cfg.num_experts),
             ("vocab_size", cfg.vocab_size),
             ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size)]
    grouped = [("num_key_value_heads", cfg.num_key_value_heads),
               ("linear_num_key_heads", cfg.linear_num_key_heads)]
    bad = [f"{name}={n}" for name, n in split if n % world]
    bad_groups = [f"{name}={n}" for name, n in grouped if n % world and world % n]
    if bad or bad_groups:
        why = []
        if bad:
            why.append(f"{', '.join(bad)} {'is not a multiple' if len(bad) == 1 else 'are not multiples'} of {world}")
        if bad_groups:
            why.append(f"{', '.join(bad_groups)} {'is' if len(bad_groups) == 1 else 'are'} neither a multiple nor "
                       f"a divisor of {world} (KV heads and GDN key heads are split, or replicated when "
                       f"fewer than the ranks)")
        raise ValueError(f"{world} ranks cannot share the {cfg.name} model: {'; '.join(why)}")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `world` over the model `cfg` (the whole model's config)."""

    cfg: ModelConfig
    rank: int
    world: int

    def __post_init__(self):
        if not isinstance(self.cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(self.cfg).__name__}")
        check_world(self.cfg, self.world)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be an int in [0, {self.world}), got {self.rank!r}")

    # ---- what this rank holds -------------------------------------------------------------------
    @cached_property
    def attn_heads(self) -> tuple[range, range]:
        """(query heads, KV heads) of this rank."""
        c = self.cfg
        return _heads(self.rank, self.world, c.num_attention_heads, c.num_key_value_heads)

    @cached_property
    def gdn_heads(self) -> tuple[range, range]:
        """(value heads, key heads) of this rank."""
        c = self.cfg
        return _heads(self.rank, self.world, c.linear_num_value_heads, c.linear_num_key_heads)

    def _split(self, n: int) -> range:
        per = n // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def experts(self) -> range:
        return self._split(self.cfg.num_experts)

    @property
    def vocab(self) -> range:
        return self._split(self.cfg.vocab_size)

    @property
    def shared(self) -> range:
        """This rank's columns of the shared expert's intermediate."""
        return self._split(self.cfg.shared_expert_intermediate_size)

    @cached_property
    def local(self) -> ModelConfig:
        """The config the rank's ops run on: local head counts and shared-expert width; the whole
        model's vocab_size and num_experts (the gathered logits and the router span them)."""
        (q, kv), (v, k) = self.attn_heads, self.gdn_heads
        return dataclasses.replace(self.cfg, num_attention_heads=len(q), num_key_value_heads=len(kv),
                                   linear_num_value_heads=len(v), linear_num_key_heads=len(k),
                                   shared_expert_intermediate_size=len(self.shared))

    # ---- how each tensor is cut -----------------------------------------------------------------
    def pieces(self, name: str) -> Pieces | None:
        """The spans of the whole tensor `name` (a ModelWeights.tensors() name) that make this
        rank's shard, or None where the rank holds it whole."""
        c = self.cfg
        if name in ("embed", "lm_head"):
            return Pieces(0, _concat([(self.vocab.start, self.vocab.stop)]))
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "layers":
            return None          # final_norm, layer norms
        field = f"{parts[2]}.{parts[3]}"
        (q, kv), (v, k) = self.attn_heads, self.gdn_heads
        D, K, V = c.head_dim, c.linear_key_head_dim, c.linear_value_head_dim
        NK, NV, NH, NKV = c.linear_num_key_heads, c.linear_num_value_heads, c.num_attention_heads, c.num_key_value_heads

        def rows(r: range, width: int, base: int = 0):
            return (base + r.start * width, base + r.stop * width)

        conv = [rows(k, K), rows(k, K, NK * K), rows(v, V, 2 * NK * K)]      # q | k | v channels
        E, Is, s = c.num_experts, c.shared_expert_intermediate_size, self.shared
        table = {
            "mixer.in_proj": (0, conv + [rows(v, V, c.conv_dim), rows(v, 1, c.conv_dim + NV * V),
                                         rows(v, 1, c.conv_dim + NV * V + NV)]),          # ... | z | b | a
            "mixer.conv": (0, conv),
            "mixer.A_log": (0, [rows(v, 1)]),
            "mixer.dt_bias": (0, [rows(v, 1)]),
            "mixer.out_proj": (1, [rows(v, V)]),
            "mixer.qkv": (0, [rows(q, 2 * D), rows(kv, D, NH * 2 * D), rows(kv, D, NH * 2 * D + NKV * D)]),
            "mixer.o_proj": (1, [rows(q, D)]),
            "moe.router_shared": (0, [(0, E), (E + s.start, E + s.stop), (E + Is + s.start, E + Is + s.stop),
                                      (E + 2 * Is, E + 2 * Is + 1)]),    # router | shared gate | up | gate logit
            "moe.gate_up_proj": (0, [(self.experts.start, self.experts.stop)]),
            "moe.down_proj": (0, [(self.experts.start, self.experts.stop)]),
            "moe.shared_down": (1, [(s.start, s.stop)]),
        }
        if field not in table:
            return None          # GDN norm, q_norm, k_norm
        dim, ranges = table[field]
        return Pieces(dim, _concat(ranges))

    def local_shape(self, name: str, shape) -> tuple:
        """The shard's shape of tensor `name` whose whole shape is `shape`."""
        p = self.pieces(name)
        shape = tuple(shape)
        if p is None:
            return shape
        return shape[:p.dim] + (p.size,) + shape[p.dim + 1:]
