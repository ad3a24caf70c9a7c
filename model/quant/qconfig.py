"""`quantization_config` in config.json: what an int4 checkpoint holds, and which tensors are int4.

    "quantization_config": {"quant_method": "cugraph_rt_int4", "method": "hqq", "bits": 4,
                            "group_size": 128, "lm_head": "bf16", "scale_dtype": "bfloat16",
                            "packing": "int32_k8_low_nibble_first"}

`lm_head`: "int4", or "bf16" for kept unquantized in the model dtype (whatever that dtype is).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from ..config_checks import ConfigError
from .format import BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES, SCALE_DTYPES
from .quantizers import METHODS

QUANT_METHOD = "cugraph_rt_int4"
PACKING = "int32_k8_low_nibble_first"
LM_HEAD_CHOICES = ("bf16", "int4")
SCALE_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in SCALE_DTYPES}

# Canonical (prefix-free, see model.checkpoint._text_name) names of the linear layers stored int4:
# attention and gated-delta projections, router, shared expert and its gate, routed experts in
# either layout. Embeddings, norms, conv1d, A_log and dt_bias stay in the model dtype.
_LINEAR_RE = re.compile(
    r"^layers\.\d+\.("
    r"linear_attn\.(in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj)\.weight"
    r"|self_attn\.[qkvo]_proj\.weight"
    r"|mlp\.(gate|shared_expert_gate|shared_expert\.(gate|up|down)_proj)\.weight"
    r"|mlp\.experts\.(\d+\.(gate|up|down)_proj\.weight|gate_up_proj|down_proj)"
    r")$")
_FUSED_EXPERTS_RE = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
QSUFFIXES = ("qweight", "scales", "zeros")


@dataclass(frozen=True)
class QuantizationConfig:
    method: str = "hqq"
    group_size: int = DEFAULT_GROUP_SIZE
    lm_head: str = "bf16"
    scale_dtype: str = "bfloat16"
    bits: int = BITS
    quant_method: str = QUANT_METHOD
    packing: str = PACKING

    def __post_init__(self):
        w = "quantization_config"
        if self.quant_method != QUANT_METHOD:
            raise ConfigError(f"{w}.quant_method is {self.quant_method!r}; this decoder reads only {QUANT_METHOD!r}")
        if self.method not in METHODS:
            raise ConfigError(f"{w}.method is {self.method!r}; expected one of {list(METHODS)}")
        if self.bits != BITS or isinstance(self.bits, bool):
            raise ConfigError(f"{w}.bits is {self.bits!r}; only {BITS} is supported")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ConfigError(f"{w}.group_size is {self.group_size!r}; expected one of {list(GROUP_SIZES)}")
        if self.lm_head not in LM_HEAD_CHOICES:
            raise ConfigError(f"{w}.lm_head is {self.lm_head!r}; expected one of {list(LM_HEAD_CHOICES)}")
        if self.scale_dtype not in SCALE_DTYPE_NAMES:
            raise ConfigError(f"{w}.scale_dtype is {self.scale_dtype!r}; expected one of {list(SCALE_DTYPE_NAMES)}")
        if self.packing != PACKING:
            raise ConfigError(f"{w}.packing is {self.packing!r}; this decoder reads only {PACKING!r}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPE_NAMES[self.scale_dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "config.json") -> "QuantizationConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: quantization_config must be an object, got {type(d).__name__}")
        qm = d.get("quant_method")
        if qm != QUANT_METHOD:   # first: a foreign quantized checkpoint (gptq, fp8, ...) says so plainly
            raise ConfigError(f"{where}: quantization_config.quant_method is {qm!r}; this decoder reads only its "
                              f"own int4 format ({QUANT_METHOD!r}): start from the bf16 checkpoint and run "
                              f"python -m model.quantize")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown quantization_config field(s) {unknown}; known: {sorted(known)}")
        missing = sorted(k for k in ("quant_method", "method", "group_size", "lm_head", "scale_dtype", "bits")
                         if k not in d)
        if missing:
            raise ConfigError(f"{where}: quantization_config lacks {missing}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def is_int4(self, canon: str) -> bool:
        """Whether the tensor of this canonical name is stored int4 under this config."""
        return is_linear(canon) or (canon == "lm_head.weight" and self.lm_head == "int4")


def is_linear(canon: str) -> bool:
    """A decoder-layer linear weight (always int4 in an int4 checkpoint)."""
    return _LINEAR_RE.match(canon) is not None


def qbase(name: str) -> str:
    """The stem an int4 tensor's three parts hang from: `X.weight` -> `X`; fused experts keep their name."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def weight_name(base: str) -> str:
    """The inverse of qbase: the name the unquantized weight has."""
    return base if _FUSED_EXPERTS_RE.search(base) else base + ".weight"
