"""Load a local Hugging Face safetensors checkpoint of Qwen3.5-MoE into our fused layout.

Accepted: one or more `*.safetensors` files (sharded with `model.safetensors.index.json` or not);
names with or without the `model.language_model.` prefix (multimodal checkpoints); experts per
expert (`mlp.experts.E.{gate,up,down}_proj.weight`) or fused (`mlp.experts.gate_up_proj [E,2I,H]`,
`mlp.experts.down_proj [E,H,I]`). Known extra groups (`model.visual.`, `mtp.`) are skipped and
reported. Every name, shape and dtype is checked from the file headers before anything is
allocated; then tensors are streamed one at a time into the preallocated device weights.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter

import torch

from .config import ModelConfig
from .config_checks import FieldReader, load_json_object
from .weights import empty_weights, hf_targets


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: missing, unexpected, mis-shaped or mis-typed tensor."""


SKIPPED_PREFIXES = ("model.visual.", "visual.", "mtp.", "model.mtp.")
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_EXPERT_RE = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _files(ckpt_dir: str) -> dict:
    """tensor name -> file, from the index when there is one, else from every *.safetensors header."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from e
        out = {}
        for name, fname in weight_map.items():
            path = os.path.join(ckpt_dir, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index} maps {name} to {fname}, which is not in {ckpt_dir}")
            out[name] = path
        return out
    files = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {ckpt_dir}")
    out = {}
    for fname in files:
        path = os.path.join(ckpt_dir, fname)
        with _open(path) as f:
            for name in f.keys():
                if name in out:
                    raise CheckpointError(f"tensor {name} is in both {out[name]} and {path}")
                out[name] = path
    return out


def _open(path: str):
    """safe_open, with an unreadable file (truncated, corrupt, not safetensors) as a
    CheckpointError naming it."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        size = os.path.getsize(path) if os.path.exists(path) else None
        raise CheckpointError(f"cannot read {path} ({size} bytes) as safetensors: {e} (truncated or "
                              f"corrupt download?)") from e


def _text_name(name: str, tied: bool):
    """Our canonical name for a checkpoint name, or None when it belongs to a skipped group."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    if name == "lm_head.weight" or name == "model.lm_head.weight":
        return "lm_head.weight"
    for p in _TEXT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


class _Plan:
    """Where each checkpoint tensor goes, checked against headers before loading."""

    def __init__(self, cfg: ModelConfig, targets_shapes: dict):
        self.cfg = cfg
        self.shapes = targets_shapes        # canonical name -> expected shape
        self.assign = []                    # (ckpt name, file, canonical name, expert idx, part)
        self.filled = set()
        self.expert_filled = {}             # (experts prefix, part) -> set of expert ids
        self.skipped = Counter()

    def expected_expert_shape(self, part):
        H, I = self.cfg.hidden_size, self.cfg.moe_intermediate_size
        return (H, I) if part == "down_proj" else (I, H)


class _OpenFiles:
    """safetensors files opened once each, read lazily: headers (meta) or slices and tensors (handle)."""

    def __init__(self):
        self.handles = {}

    def handle(self, path):
        if path not in self.handles:
            self.handles[path] = _open(path)
        return self.handles[path]

    def meta(self, name, path):
        """(shape, torch dtype or the stored dtype name) from the header alone."""
        sl = self.handle(path).get_slice(name)
        st = sl.get_dtype()
        return tuple(sl.get_shape()), _ST_DTYPES.get(st, st)


def _plan(cfg: ModelConfig, names: dict, tied: bool, get_meta) -> _Plan:
    shapes = {k: tuple(v.shape) for k, v in hf_targets(empty_weights(cfg, "meta", torch.float32)).items()}
    plan = _Plan(cfg, shapes)
    E = cfg.num_experts
    for name, path in names.items():
        canon = _text_name(name, tied)
        if canon is None:
            plan.skipped[next(p for p in SKIPPED_PREFIXES if name.startswith(p))] += 1
            continue
        if canon == "lm_head.weight" and tied:
            plan.skipped["lm_head.weight (tied to the embedding)"] += 1
            continue
        shape, dtype = get_meta(name, path)
        m = _EXPERT_RE.match(canon)
        if m:
            prefix, e, part = m.group(1), int(m.group(2)), m.group(3)
            if prefix.replace(".mlp.experts", ".mlp.experts.down_proj") not in shapes or e >= E:
                raise CheckpointError(f"unexpected tensor {name} {list(shape)} (no such expert/layer in the "
                                      f"config: {cfg.num_layers} layers, {E} experts)")
            want = plan.expected_expert_shape(part)
            if tuple(shape) != want:
                raise CheckpointError(f"tensor {name} has shape {list(shape)}, the config expects {list(want)}")
            plan.assign.append((name, path, prefix, e, part, dtype))
            plan.expert_filled.setdefault((prefix, part), set()).add(e)
            continue
        if canon not in shapes:
            raise CheckpointError(f"unexpected tensor {name} {list(shape)} (not part of a Qwen3.5-MoE text "
                                  f"decoder with this config, nor a known extra group {list(SKIPPED_PREFIXES)})")
        if tuple(shape) != shapes[canon]:
            raise CheckpointError(f"tensor {name} has shape {list(shape)}, the config expects {list(shapes[canon])}")
        if canon in plan.filled:
            raise CheckpointError(f"tensor {canon} appears twice in the checkpoint (last as {name})")
        plan.filled.add(canon)
        plan.assign.append((name, path, canon, None, None, dtype))
    # coverage
    missing = []
    for canon, shape in shapes.items():
        if canon in plan.filled:
            continue
        if canon.endswith(".mlp.experts.gate_up_proj") or canon.endswith(".mlp.experts.down_proj"):
            prefix = canon.rsplit(".", 1)[0]
            parts = ("gate_proj", "up_proj") if canon.endswith("gate_up_proj") else ("down_proj",)
            for part in parts:
                got = plan.expert_filled.get((prefix, part), set())
                lacking = [e for e in range(E) if e not in got]
                if lacking:
                    missing.append(f"{prefix}.{lacking[0]}.{part}.weight {list(plan.expected_expert_shape(part))}"
                                   + (f" (and {len(lacking) - 1} more experts)" if len(lacking) > 1 else "")
                                   + (f" (or fused {canon} {list(shape)})" if not got else ""))
            continue
        missing.append(f"{canon} {list(shape)}")
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the config needs: {missing[0]}"
                              + (f"; also {', '.join(missing[1:4])}" if len(missing) > 1 else "")
                              + (" ..." if len(missing) > 4 else ""))
    return plan


@torch.no_grad()
def load_checkpoint(ckpt_dir, device="cuda", dtype=None, *, verbose: bool = True,
                    strict_config: bool = True, quantize=None):
    """(cfg, weights) from a local Hugging Face safetensors checkpoint directory.

    dtype=None keeps the checkpoint's dtype (the embedding's) and requires every tensor to have
    it; a dtype converts every tensor on the way to the device. An unknown config field is a
    ConfigError unless strict_config=False. A file that is not valid safetensors (truncated,
    corrupt) is a CheckpointError naming it.

    quantize=model.quant.QuantizationConfig(...) gives the int4 layout instead (QuantizedLinear
    linears, docs/int4.md): each tensor is quantized on `device` as it is read (model/quant/on_load.py),
    so the bf16 model never exists whole; equal to quantize_weights of the bf16 load."""
    ckpt_dir = os.fspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    cfg = ModelConfig.from_hf(ckpt_dir, strict=strict_config)
    from .quant.reader import read_quantization_config  # here: model.quant imports this module

    if read_quantization_config(ckpt_dir) is not None:
        raise CheckpointError(f"{ckpt_dir} is an int4 checkpoint (config.json has quantization_config): "
                              f"load it with model.quant.load_int4_weights (int4 layout) or "
                              f"load_int4_checkpoint (dequantized)")
    names = _files(ckpt_dir)

    files = _OpenFiles()
    handle, handles = files.handle, files.handles

    try:
        plan = _plan(cfg, names, cfg.tie_word_embeddings, files.meta)
        ckpt_dtype = next((d for n, _, c, _, _, d in plan.assign if c == "embed_tokens.weight"), None)
        if dtype is None:
            for name, _, _, _, _, d in plan.assign:
                if d != ckpt_dtype:
                    raise CheckpointError(
                        f"tensor {name} is {_dtype_name(d)} but the checkpoint's embedding is "
                        f"{_dtype_name(ckpt_dtype)}; pass dtype=... to convert every tensor to one dtype")
            dtype = ckpt_dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = torch.device(device)
        if quantize is not None:
            from .quant.on_load import QuantizingTargets

            sink = QuantizingTargets(cfg, device, dtype, quantize)   # K vs group size checked first
            put, w = sink.put, sink.weights()
        else:
            w = empty_weights(cfg, device, dtype)
            targets = hf_targets(w)
            I = cfg.moe_intermediate_size

            def put(name, canon, e, part, t):
                if e is None:
                    dst = targets[canon]
                elif part == "down_proj":
                    dst = targets[canon + ".down_proj"][e]
                else:
                    gu = targets[canon + ".gate_up_proj"][e]
                    dst = gu[:I] if part == "gate_proj" else gu[I:]
                dst.copy_(t)
        for name, path, canon, e, part, _ in plan.assign:
            t = handle(path).get_tensor(name)
            put(name, canon, e, part, t)
            del t
    finally:
        handles.clear()
    if verbose and plan.skipped:
        groups = ", ".join(f"{k} ({v})" for k, v in sorted(plan.skipped.items()))
        print(f"load_checkpoint: skipped tensors of known extra groups: {groups}", file=sys.stderr)
    return cfg, w


# ---- the text side of a checkpoint: tokenizer and generation defaults -----------------------------
def load_tokenizer(ckpt_dir):
    """The checkpoint's `tokenizers.Tokenizer` (from tokenizer.json), or None where it has none.
    A file that does not parse as a tokenizer is a CheckpointError naming it."""
    path = os.path.join(os.fspath(ckpt_dir), "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise CheckpointError(f"cannot read {path} ({os.path.getsize(path)} bytes) as a tokenizer: {e} "
                              f"(corrupt or incomplete download?)") from e


def eos_token_ids(cfg: ModelConfig, ckpt_dir=None) -> tuple:
    """The ids that end a sequence: generation_config.json's `eos_token_id` where the checkpoint
    has that file and field (Qwen lists several there), else config.json's. A malformed file or
    field is a ConfigError naming it."""
    ids = None
    if ckpt_dir is not None:
        path = os.path.join(os.fspath(ckpt_dir), "generation_config.json")
        if os.path.isfile(path):
            ids = FieldReader(load_json_object(path, "generation config"), path).token_ids(
                "eos_token_id", cfg.vocab_size)
    if ids is None:
        ids = cfg.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (tuple, list)) else (ids,)
