"""Model configuration: one dataclass holding the Qwen3.5-MoE text-decoder shapes, with presets
and conversion from/to a Hugging Face `config.json` / `Qwen3_5MoeTextConfig`."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from .config_checks import ConfigError, FieldReader, describe, load_json_object  # noqa: F401 (ConfigError re-exported)

LINEAR = "linear_attention"
FULL = "full_attention"

# HF config fields that do not affect the text decoder's decode math (training knobs, multimodal
# or bookkeeping fields). Everything else that we do not read is an error naming it (strict=False:
# a warning), since a field we do not know may change the math.
_IGNORED_HF_FIELDS = frozenset({
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "use_cache", "attention_dropout", "output_router_logits",
    "router_aux_loss_coef", "output_attentions", "output_hidden_states", "return_dict",
    "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward", "pruned_heads",
    "problem_type", "id2label", "label2id", "task_specific_params", "finetuning_task",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "_name_or_path",
    "_attn_implementation_autoset", "_experts_implementation", "_attn_implementation",
    "base_config_key", "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings",
    "full_attention_interval", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
    "layer_norm_epsilon", "add_cross_attention", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "torchscript", "max_window_layers", "use_sliding_window",
    "sliding_window", "quantization_config", "head_dim_original",
})
# Fields of a multimodal top-level config besides `text_config`.
_IGNORED_TOP_LEVEL_FIELDS = frozenset({
    "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "vision_token_id", "audio_config",
})


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Qwen3.5-MoE text decoder (names follow transformers' config)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple  # "linear_attention" | "full_attention", one per layer (a longer tuple is cut
    #                   to num_layers, so dataclasses.replace(cfg, num_layers=n) keeps the first n layers)
    # full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    rope_theta: float
    # Gated DeltaNet (linear attention)
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MoE
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    # misc
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        lt = tuple(self.layer_types)
        if self.num_layers < 1 or len(lt) < self.num_layers:
            raise ValueError(f"layer_types has {len(lt)} entries, num_layers is {self.num_layers}")
        lt = lt[:self.num_layers]
        object.__setattr__(self, "layer_types", lt)
        bad = [t for t in lt if t not in (LINEAR, FULL)]
        if bad:
            raise ValueError(f"unknown layer type {bad[0]!r} (expected {LINEAR!r} or {FULL!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                             f"linear_num_key_heads={self.linear_num_key_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary dim {self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor "
                             f"{self.partial_rotary_factor}) must be even and in (0, head_dim]")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} not in [1, num_experts={self.num_experts}]")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN depthwise conv: q | k | v."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def gdn_in_proj_rows(self) -> int:
        """Rows of the fused GDN input projection: qkv | z | b | a."""
        return self.conv_dim + self.linear_value_dim + 2 * self.linear_num_value_heads

    @property
    def attn_qkv_rows(self) -> int:
        """Rows of the fused attention projection: q (query+gate, 2D per head) | k | v."""
        return (2 * self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def router_shared_rows(self) -> int:
        """Rows of the fused router + shared expert projection: router | shared gate | shared up | shared gate logit."""
        return self.num_experts + 2 * self.shared_expert_intermediate_size + 1

    # ---- presets --------------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "ModelConfig":
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}")
        return _PRESETS[name]()

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    # ---- Hugging Face ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source, *, strict: bool = True) -> "ModelConfig":
        """From a config.json path, a checkpoint directory holding one, a dict, or a transformers
        config object. A multimodal config's `text_config` is used when present. Every field read
        is type- and range-checked: a bad one is a ConfigError naming the file and the field.
        Fields known not to affect the decoder are ignored; any other unknown field raises
        ConfigError naming it (strict=False: a warning instead)."""
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            d, where = load_json_object(path, "config"), path
        elif isinstance(source, dict):
            d, where = dict(source), "config"
        elif hasattr(source, "to_dict"):
            d, where = source.to_dict(), f"{type(source).__name__}"
        else:
            raise TypeError(f"from_hf takes a path, dict or transformers config, got {type(source).__name__}")
        prefix = ""
        if d.get("text_config") is not None:
            top = d
            if not isinstance(top["text_config"], dict):
                raise ConfigError(f"{where}: field 'text_config' must be an object {{...}}, got "
                                  f"{describe(top['text_config'])}")
            d = dict(top["text_config"])
            prefix = "text_config."
            for k in ("tie_word_embeddings",):  # top-level value wins where the text config lacks it
                if k not in d and k in top:
                    d[k] = top[k]
        return cls._from_text_dict(d, strict, where, prefix)

    @classmethod
    def _from_text_dict(cls, d: dict, strict: bool = True, where: str = "config",
                        prefix: str = "") -> "ModelConfig":
        f = FieldReader(dict(d), where, prefix)
        mt = f.str("model_type", None)
        if mt is not None and mt not in ("qwen3_5_moe_text", "qwen3_5_moe"):
            warnings.warn(f"{where}: model_type is {mt!r}, expected 'qwen3_5_moe_text'; reading it anyway",
                          stacklevel=3)
        if f.str("hidden_act", "silu") != "silu":
            raise f.unsupported("hidden_act", d["hidden_act"], "only 'silu'")
        if f.bool("attention_bias", False):
            raise f.unsupported("attention_bias", True, "Qwen3.5 attention has no biases")
        if not f.bool("attn_output_gate", True):
            raise f.unsupported("attn_output_gate", False, "Qwen3.5 attention has the output gate")

        # rope: rope_parameters (transformers 5) or rope_scaling, else the top-level fields
        rope = f.object("rope_parameters") or f.object("rope_scaling")
        f.used.update({"rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor"})

        def rope_field(key):    # the rope object's value where it has one, else the top level's
            return rope if rope is not None and rope.data.get(key) is not None else f

        rope_type = "default"
        if rope is not None:
            rope_type = rope.str("type" if "rope_type" not in rope.data else "rope_type", "default")
        if rope_type != "default":
            raise rope.unsupported("rope_type", rope_type, "only 'default'")
        rope_theta = rope_field("rope_theta").number("rope_theta", lo=0, lo_open=True)
        prf = rope_field("partial_rotary_factor").number("partial_rotary_factor", 0.25, lo=0, hi=1, lo_open=True)

        n_layers = f.int("num_hidden_layers")
        layer_types = f.string_list("layer_types", (LINEAR, FULL), n_layers)
        interval = f.int("full_attention_interval", 4)
        if layer_types is None:
            layer_types = [LINEAR if (i + 1) % interval else FULL for i in range(n_layers)]
        vocab = f.int("vocab_size")
        hidden = f.int("hidden_size")
        heads = f.int("num_attention_heads")
        head_dim = f.int("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise f.error("head_dim", f"is missing and hidden_size={hidden} is not a multiple of "
                                          f"num_attention_heads={heads}; give head_dim")
            head_dim = hidden // heads
        name = d.get("_name_or_path")
        kwargs = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=n_layers,
            layer_types=tuple(layer_types),
            num_attention_heads=heads,
            num_key_value_heads=f.int("num_key_value_heads"),
            head_dim=head_dim,
            partial_rotary_factor=prf,
            rope_theta=rope_theta,
            linear_num_key_heads=f.int("linear_num_key_heads"),
            linear_num_value_heads=f.int("linear_num_value_heads"),
            linear_key_head_dim=f.int("linear_key_head_dim"),
            linear_value_head_dim=f.int("linear_value_head_dim"),
            linear_conv_kernel_dim=f.int("linear_conv_kernel_dim", 4),
            num_experts=f.int("num_experts"),
            num_experts_per_tok=f.int("num_experts_per_tok"),
            moe_intermediate_size=f.int("moe_intermediate_size"),
            shared_expert_intermediate_size=f.int("shared_expert_intermediate_size"),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6, lo=0, hi=1, lo_open=True, hi_open=True),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            max_position_embeddings=f.int("max_position_embeddings", 262144),
            bos_token_id=f.token_ids("bos_token_id", vocab),
            eos_token_id=f.token_ids("eos_token_id", vocab),
            pad_token_id=f.token_ids("pad_token_id", vocab),
            name=name if isinstance(name, str) and name else "hf",
        )
        try:
            cfg = cls(**kwargs)
        except ValueError as e:     # the relations between fields (heads, experts, rotary dim)
            raise ConfigError(f"{where}: {prefix and f'(in {prefix[:-1]}) '}{e}") from e
        used = f.used
        unknown = sorted(k for k in d if k not in used and k not in _IGNORED_HF_FIELDS
                         and k not in _IGNORED_TOP_LEVEL_FIELDS)
        if unknown:
            shown = ", ".join(f"{k}={d[k]!r}"[:80] for k in unknown)
            if strict:
                raise ConfigError(f"{where}: unknown config field(s) {shown}: not read by this decoder and "
                                  f"not known to be irrelevant to its math; remove them, or pass strict=False "
                                  f"(load_checkpoint: strict_config=False) to ignore them with a warning")
            warnings.warn(f"{where}: config fields not used by the decoder (ignored): {shown}", stacklevel=3)
        return cfg

    def to_hf_dict(self) -> dict:
        """The text config as a config.json dict (model_type qwen3_5_moe_text)."""
        return {
            "model_type": "qwen3_5_moe_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "layer_types": list(self.layer_types),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor},
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def to_hf(self):
        """A transformers `Qwen3_5MoeTextConfig` with the same math (rope_parameters set explicitly)."""
        from transformers import Qwen3_5MoeTextConfig

        d = self.to_hf_dict()
        d.pop("model_type")
        return Qwen3_5MoeTextConfig(**d)

    # ---- cost model -----------------------------------------------------------------------------
    def weight_counts(self, batch: int = 1) -> dict:
        """Parameter counts by group: total stored, and active (read) per decode step of `batch`
        rows (experts: the expected number of distinct experts hit by batch x top_k uniform picks)."""
        H, E, I, Is = self.hidden_size, self.num_experts, self.moe_intermediate_size, self.shared_expert_intermediate_size
        n_lin, n_att = len(self.linear_layers), len(self.attn_layers)
        gdn = (self.gdn_in_proj_rows * H + H * self.linear_value_dim + self.conv_dim * self.linear_conv_kernel_dim
               + 2 * self.linear_num_value_heads + self.linear_value_head_dim)
        attn = self.attn_qkv_rows * H + H * self.num_attention_heads * self.head_dim + 2 * self.head_dim
        router_shared = self.router_shared_rows * H + H * Is
        expert = 3 * I * H
        norms = 2 * H
        embed = self.vocab_size * H
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * H
        total = (embed + lm_head + H + n_lin * gdn + n_att * attn
                 + self.num_layers * (router_shared + E * expert + norms))
        active = {
            "lm_head": self.vocab_size * H,
            "embedding_row": H * batch,
            "gdn": n_lin * gdn,
            "attention": n_att * attn,
            "experts": round(self.num_layers * expert * E * (1 - (1 - self.num_experts_per_tok / E) ** batch)),
            "router_shared": self.num_layers * router_shared,
            "norms": self.num_layers * norms + H,
        }
        return {"total": total, "active": active, "active_total": sum(active.values())}

    def bytes_per_token(self, dtype_bytes: float = 2, batch: int = 1) -> float:
        """Weight bytes one decode step of `batch` rows reads (each active weight once; KV cache and
        recurrent state excluded). batch=1: the per-token floor."""
        return self.weight_counts(batch)["active_total"] * dtype_bytes

    def total_weight_bytes(self, dtype_bytes: float = 2) -> float:
        return self.weight_counts()["total"] * dtype_bytes


def _every_fourth_full(n):
    return tuple(FULL if (i + 1) % 4 == 0 else LINEAR for i in range(n))


def _tiny():
    # Every feature present: both layer types, GQA (4 heads / 2 KV), partial rope (8 of 16 dims),
    # GDN key-head sharing (2 key heads, 4 value heads), top-2 of 8 experts, a shared expert.
    # Kept small in every dimension: the Triton path runs it under the CPU interpreter in CI.
    return ModelConfig(
        vocab_size=256, hidden_size=32, num_layers=4, layer_types=_every_fourth_full(4),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
        rope_theta=10000.0,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, rms_norm_eps=1e-6, max_position_embeddings=4096,
        eos_token_id=1, name="tiny",
    )


def _35b_a3b():
    return ModelConfig(
        vocab_size=248320, hidden_size=2048, num_layers=40, layer_types=_every_fourth_full(40),
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, partial_rotary_factor=0.25,
        rope_theta=1e7,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, rms_norm_eps=1e-6, max_position_embeddings=262144,
        eos_token_id=248046, name="35b-a3b",
    )


def _122b_a10b():
    return ModelConfig(
        vocab_size=248320, hidden_size=3072, num_layers=48, layer_types=_every_fourth_full(48),
        num_attention_heads=32, num_key_value_heads=2, head_dim=256, partial_rotary_factor=0.25,
        rope_theta=1e7,
        linear_num_key_heads=16, linear_num_value_heads=64, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024, rms_norm_eps=1e-6, max_position_embeddings=262144,
        eos_token_id=248046, name="122b-a10b",
    )


_PRESETS = {"tiny": _tiny, "35b-a3b": _35b_a3b, "122b-a10b": _122b_a10b}
