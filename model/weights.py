"""Model weights in the decoder's fused layout, seeded random init on the device, and the mapping
to transformers' parameter names.

Fused layout (rows of a [N, K] weight, read by one GEMV):
- GDN `in_proj`      = cat(in_proj_qkv, in_proj_z, in_proj_b, in_proj_a)   [conv_dim + NV*V + 2*NV, H]
- attention `qkv`    = cat(q_proj, k_proj, v_proj)                           [NH*2D + 2*NKV*D, H]
- `router_shared`    = cat(mlp.gate, shared gate_proj, shared up_proj, shared_expert_gate)
                                                                             [E + 2*Is + 1, H]
- experts `gate_up_proj [E, 2I, H]` (gate first) and `down_proj [E, H, I]`, as transformers holds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import FULL, LINEAR, ModelConfig


@dataclass
class GDNWeights:
    in_proj: torch.Tensor     # [conv_dim + NV*V + 2*NV, H]
    conv: torch.Tensor        # [conv_dim, W]
    A_log: torch.Tensor       # [NV]
    dt_bias: torch.Tensor     # [NV]
    norm: torch.Tensor        # [V] gated RMSNorm weight (no 1+)
    out_proj: torch.Tensor    # [H, NV*V]


@dataclass
class AttnWeights:
    qkv: torch.Tensor         # [NH*2D + 2*NKV*D, H]
    q_norm: torch.Tensor      # [D]
    k_norm: torch.Tensor      # [D]
    o_proj: torch.Tensor      # [H, NH*D]


@dataclass
class MoEWeights:
    router_shared: torch.Tensor  # [E + 2*Is + 1, H]
    gate_up_proj: torch.Tensor   # [E, 2I, H]
    down_proj: torch.Tensor      # [E, H, I]
    shared_down: torch.Tensor    # [H, Is]


@dataclass
class LayerWeights:
    kind: str                 # "linear_attention" | "full_attention"
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor   # [H]
    mixer: GDNWeights | AttnWeights
    moe: MoEWeights


@dataclass
class ModelWeights:
    cfg: ModelConfig
    embed: torch.Tensor       # [V, H]
    lm_head: torch.Tensor     # [V, H] (the embedding itself when tied)
    final_norm: torch.Tensor  # [H]
    layers: list = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def tensors(self):
        """(name, tensor) over every distinct tensor in our layout."""
        yield "embed", self.embed
        if self.lm_head is not self.embed:
            yield "lm_head", self.lm_head
        yield "final_norm", self.final_norm
        for i, L in enumerate(self.layers):
            yield f"layers.{i}.input_norm", L.input_norm
            yield f"layers.{i}.post_norm", L.post_norm
            for part in ("mixer", "moe"):
                obj = getattr(L, part)
                for f in obj.__dataclass_fields__:
                    yield f"layers.{i}.{part}.{f}", getattr(obj, f)

    def first_layers(self, n: int) -> "ModelWeights":
        """The model cut to its first n layers (same tensors, no copies; cfg.num_layers = n)."""
        import dataclasses

        if not 1 <= n <= len(self.layers):
            raise ValueError(f"first_layers({n}): must be in [1, {len(self.layers)}]")
        return ModelWeights(dataclasses.replace(self.cfg, num_layers=n), self.embed, self.lm_head,
                            self.final_norm, list(self.layers[:n]))

    def nbytes(self) -> int:
        """Bytes of every distinct tensor; an int4 field (model.quant's QuantizedLinear, whose
        nbytes is a method) counts its codes, scales and zeros."""
        return sum(t.nbytes() if callable(t.nbytes) else t.numel() * t.element_size() for _, t in self.tensors())

    def to_hf_state_dict(self) -> dict:
        """Views under transformers' in-memory `Qwen3_5MoeForCausalLM` names (fused experts)."""
        return hf_state_dict(self)


# ------------------------------------------------------------------------------------------------
# allocation

def _empty(shape, device, dtype):
    return torch.empty(shape, device=device, dtype=dtype)


def empty_weights(cfg: ModelConfig, device, dtype) -> ModelWeights:
    """Uninitialised weights in our layout, allocated on `device` (filled by random init or a loader)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    E, I, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    embed = _empty((V, H), device, dtype)
    lm_head = embed if cfg.tie_word_embeddings else _empty((V, H), device, dtype)
    layers = []
    for kind in cfg.layer_types:
        if kind == LINEAR:
            mixer = GDNWeights(
                in_proj=_empty((cfg.gdn_in_proj_rows, H), device, dtype),
                conv=_empty((cfg.conv_dim, cfg.linear_conv_kernel_dim), device, dtype),
                A_log=_empty((cfg.linear_num_value_heads,), device, dtype),
                dt_bias=_empty((cfg.linear_num_value_heads,), device, dtype),
                norm=_empty((cfg.linear_value_head_dim,), device, dtype),
                out_proj=_empty((H, cfg.linear_value_dim), device, dtype),
            )
        else:
            mixer = AttnWeights(
                qkv=_empty((cfg.attn_qkv_rows, H), device, dtype),
                q_norm=_empty((cfg.head_dim,), device, dtype),
                k_norm=_empty((cfg.head_dim,), device, dtype),
                o_proj=_empty((H, cfg.num_attention_heads * cfg.head_dim), device, dtype),
            )
        moe = MoEWeights(
            router_shared=_empty((cfg.router_shared_rows, H), device, dtype),
            gate_up_proj=_empty((E, 2 * I, H), device, dtype),
            down_proj=_empty((E, H, I), device, dtype),
            shared_down=_empty((H, Is), device, dtype),
        )
        layers.append(LayerWeights(kind, _empty((H,), device, dtype), _empty((H,), device, dtype), mixer, moe))
    return ModelWeights(cfg, embed, lm_head, _empty((H,), device, dtype), layers)


# ------------------------------------------------------------------------------------------------
# random init

def random_inits(cfg: ModelConfig) -> list:
    """(name as in ModelWeights.tensors(), init(t, generator)) of every tensor, in the order
    random_weights draws them: one generator runs through this list, so a builder that allocates
    the tensors one at a time (model.quant.build's int4 one) draws the very same values.

    Linear weights ~ N(0, 1/fan_in) scaled so that every sublayer adds O(0.1-1) to the residual
    stream; 1+w norms get w ~ N(0, 0.1^2) and the gated norm 1 + N(0, 0.1^2) so that a missing
    `1 +` shows; A_log = log U(1, 16) and dt_bias = 1 as in transformers, so the GDN state decays
    and stays bounded over any number of steps (the delta rule with |k| = 1 and beta < 1 is a
    contraction)."""
    H = cfg.hidden_size

    def normal(std, mean=0.0):
        return lambda t, gen: t.normal_(mean, std, generator=gen)

    def lin(fan_in, gain=1.0):
        return normal(gain / fan_in ** 0.5)

    norm_w = normal(0.1)
    out = [("embed", normal(1.0))]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head", lin(H)))
    out.append(("final_norm", norm_w))
    for i, kind in enumerate(cfg.layer_types):
        p = f"layers.{i}."
        out += [(p + "input_norm", norm_w), (p + "post_norm", norm_w)]
        if kind == LINEAR:
            out += [(p + "mixer.in_proj", lin(H)), (p + "mixer.conv", normal(0.5)),
                    (p + "mixer.A_log", lambda t, gen: t.uniform_(1.0, 16.0, generator=gen).log_()),
                    (p + "mixer.dt_bias", lambda t, gen: t.fill_(1.0)),
                    (p + "mixer.norm", normal(0.1, mean=1.0)),
                    (p + "mixer.out_proj", lin(cfg.linear_value_dim, gain=0.5))]
        else:
            out += [(p + "mixer.qkv", lin(H)), (p + "mixer.q_norm", norm_w), (p + "mixer.k_norm", norm_w),
                    (p + "mixer.o_proj", lin(cfg.num_attention_heads * cfg.head_dim, gain=0.5))]
        out += [(p + "moe.router_shared", lin(H)), (p + "moe.gate_up_proj", lin(H)),
                (p + "moe.down_proj", lin(cfg.moe_intermediate_size, gain=0.5)),
                (p + "moe.shared_down", lin(cfg.shared_expert_intermediate_size, gain=0.5))]
    return out


@torch.no_grad()
def random_weights(cfg: ModelConfig, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> ModelWeights:
    """Seeded random weights generated tensor by tensor on `device`, in place (nothing is built on
    the host); the distributions are random_inits'."""
    device = torch.device(device)
    w = empty_weights(cfg, device, dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    tensors = dict(w.tensors())
    for name, init in random_inits(cfg):
        init(tensors[name], gen)
    return w


# ------------------------------------------------------------------------------------------------
# fused layout <-> transformers names

def split_sizes(cfg: ModelConfig) -> dict:
    """Row splits of each fused weight, in order, under transformers' sub-names."""
    E, Is = cfg.num_experts, cfg.shared_expert_intermediate_size
    return {
        "in_proj": [("in_proj_qkv", cfg.conv_dim), ("in_proj_z", cfg.linear_value_dim),
                    ("in_proj_b", cfg.linear_num_value_heads), ("in_proj_a", cfg.linear_num_value_heads)],
        "qkv": [("q_proj", 2 * cfg.num_attention_heads * cfg.head_dim),
                ("k_proj", cfg.num_key_value_heads * cfg.head_dim),
                ("v_proj", cfg.num_key_value_heads * cfg.head_dim)],
        "router_shared": [("gate", E), ("shared_expert.gate_proj", Is), ("shared_expert.up_proj", Is),
                          ("shared_expert_gate", 1)],
    }


def _row_slices(t, parts):
    out, start = {}, 0
    for name, n in parts:
        out[name] = t[start:start + n]
        start += n
    assert start == t.shape[0]
    return out


def hf_targets(w: ModelWeights) -> dict:
    """transformers' text-model names (without `model.` / `model.language_model.` prefix for layer
    tensors: `layers.N.…`, `embed_tokens.weight`, `norm.weight`; and `lm_head.weight`) → the view of
    our storage that holds that tensor. Experts under their fused names."""
    cfg = w.cfg
    sp = split_sizes(cfg)
    t = {"embed_tokens.weight": w.embed, "norm.weight": w.final_norm}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = w.lm_head
    for i, L in enumerate(w.layers):
        p = f"layers.{i}."
        t[p + "input_layernorm.weight"] = L.input_norm
        t[p + "post_attention_layernorm.weight"] = L.post_norm
        m = L.mixer
        if L.kind == LINEAR:
            q = p + "linear_attn."
            for name, view in _row_slices(m.in_proj, sp["in_proj"]).items():
                t[q + name + ".weight"] = view
            t[q + "conv1d.weight"] = m.conv.unsqueeze(1)  # [C, 1, W]
            t[q + "A_log"] = m.A_log
            t[q + "dt_bias"] = m.dt_bias
            t[q + "norm.weight"] = m.norm
            t[q + "out_proj.weight"] = m.out_proj
        else:
            q = p + "self_attn."
            for name, view in _row_slices(m.qkv, sp["qkv"]).items():
                t[q + name + ".weight"] = view
            t[q + "q_norm.weight"] = m.q_norm
            t[q + "k_norm.weight"] = m.k_norm
            t[q + "o_proj.weight"] = m.o_proj
        q = p + "mlp."
        for name, view in _row_slices(L.moe.router_shared, sp["router_shared"]).items():
            t[q + name + ".weight"] = view
        t[q + "shared_expert.down_proj.weight"] = L.moe.shared_down
        t[q + "experts.gate_up_proj"] = L.moe.gate_up_proj
        t[q + "experts.down_proj"] = L.moe.down_proj
    return t


def hf_state_dict(w: ModelWeights) -> dict:
    """State dict for transformers' `Qwen3_5MoeForCausalLM` (names `model.…`, `lm_head.weight`)."""
    sd = {}
    for name, view in hf_targets(w).items():
        sd[name if name.startswith("lm_head") else "model." + name] = view
    if w.cfg.tie_word_embeddings:
        sd["lm_head.weight"] = w.embed
    return sd
