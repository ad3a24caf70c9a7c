"""Read an int4 checkpoint (written by writer.py / `python -m model.quantize`), checked against its
`quantization_config` and the model config before anything is allocated.

Each int4 tensor is three safetensors entries `B.qweight`, `B.scales`, `B.zeros` where `B` is the
unquantized name without `.weight` (fused experts keep theirs: `...experts.gate_up_proj`). The
checks map each triple to the weight it stands for and reuse the bf16 loader's plan (names, shapes,
both expert layouts, coverage); on top: the three parts present, qweight int32, scales/zeros in the
config's dtype and shaped for its group size, and every tensor int4 exactly where the config says.
"""
from __future__ import annotations

import os
import sys

import torch

from ..checkpoint import SKIPPED_PREFIXES, CheckpointError, _files, _OpenFiles, _plan, _text_name
from ..config import ModelConfig
from ..config_checks import load_json_object
from ..weights import empty_weights, hf_targets
from .format import CODES_PER_WORD, QuantizedLinear
from .qconfig import QSUFFIXES, QuantizationConfig, qbase, weight_name


def read_quantization_config(ckpt_dir) -> QuantizationConfig | None:
    """The checkpoint's quantization_config (top level of config.json, or inside text_config), or None."""
    path = os.path.join(os.fspath(ckpt_dir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at {path}")
    d = load_json_object(path, "config")
    q = d.get("quantization_config")
    if q is None and isinstance(d.get("text_config"), dict):
        q = d["text_config"].get("quantization_config")
    return None if q is None else QuantizationConfig.from_dict(q, path)


def _int4_view(names: dict, meta, qcfg: QuantizationConfig):
    """(weight name -> path, weight name -> (shape, dtype), weight name -> int4 stem) from the file's
    names: each qweight/scales/zeros triple stands for one weight of its logical shape."""
    G, sdt = qcfg.group_size, qcfg.torch_scale_dtype
    parts, plain = {}, {}
    for name, path in names.items():
        stem, _, suffix = name.rpartition(".")
        if suffix in QSUFFIXES and stem:
            parts.setdefault(stem, {})[suffix] = path
        else:
            plain[name] = path
    view, metas, stems = {}, {}, {}
    for stem, got in sorted(parts.items()):
        lacking = [s for s in QSUFFIXES if s not in got]
        if lacking:
            raise CheckpointError(f"int4 tensor {stem} lacks {stem}.{lacking[0]} (an int4 weight is stored as "
                                  f"{', '.join(stem + '.' + s for s in QSUFFIXES)})")
        (qshape, qdt), (sshape, sdt_got), (zshape, zdt) = (meta(f"{stem}.{s}", got[s]) for s in QSUFFIXES)
        if qdt != torch.int32:
            raise CheckpointError(f"tensor {stem}.qweight is {qdt}, expected int32 (eight 4-bit codes per word)")
        for s, dt in (("scales", sdt_got), ("zeros", zdt)):
            if dt != sdt:
                raise CheckpointError(f"tensor {stem}.{s} is {dt}, but quantization_config.scale_dtype is "
                                      f"{qcfg.scale_dtype}")
        if len(qshape) < 2:
            raise CheckpointError(f"tensor {stem}.qweight has shape {list(qshape)}, expected [..., N, K/8]")
        shape = (*qshape[:-1], qshape[-1] * CODES_PER_WORD)
        K = shape[-1]
        if K % G:
            raise CheckpointError(f"tensor {stem}.qweight {list(qshape)} stands for K={K}, which is not a "
                                  f"multiple of quantization_config.group_size={G}")
        want = (*qshape[:-1], K // G)
        for s, sh in (("scales", sshape), ("zeros", zshape)):
            if tuple(sh) != want:
                raise CheckpointError(f"tensor {stem}.{s} has shape {list(sh)}, expected {list(want)} for "
                                      f"{stem}.qweight {list(qshape)} with quantization_config.group_size={G}")
        wname = weight_name(stem)
        if wname in plain:
            raise CheckpointError(f"tensor {wname} is stored both unquantized and as int4 ({stem}.qweight)")
        canon = _text_name(wname, False)
        if canon is not None and not qcfg.is_int4(canon):
            raise CheckpointError(f"tensor {stem}.qweight is int4, but quantization_config (lm_head="
                                  f"{qcfg.lm_head!r}) keeps {wname} in the model dtype")
        view[wname], metas[wname], stems[wname] = got["qweight"], (shape, sdt), stem
    for name, path in plain.items():
        canon = _text_name(name, False)
        if canon is not None and qcfg.is_int4(canon):
            raise CheckpointError(f"tensor {name} is stored unquantized, but quantization_config (lm_head="
                                  f"{qcfg.lm_head!r}) says it is int4 ({qbase(name)}.qweight/scales/zeros)")
        view[name] = path
    return view, metas, stems


def _plan_int4(cfg, qcfg, ckpt_dir, h: _OpenFiles):
    names = _files(ckpt_dir)
    view, metas, stems = _int4_view(names, h.meta, qcfg)

    def meta(name, path):
        return metas[name] if name in metas else h.meta(name, path)

    try:
        plan = _plan(cfg, view, cfg.tie_word_embeddings, meta)
    except CheckpointError as e:   # name the stored triple, not the weight it stands for
        msg = str(e)
        for wname, stem in stems.items():
            if f"tensor {wname} " in msg:
                msg = msg.replace(f"tensor {wname} ", f"tensor {wname} (stored int4 as {stem}.qweight) ", 1)
                break
        raise CheckpointError(msg) from None
    return plan, stems, names


def open_int4(ckpt_dir, *, strict_config: bool = True):
    """(cfg, qcfg, plan, model dtype, items) with every check run; items() yields
    (checkpoint name, canonical name, expert index or None, expert part or None, QuantizedLinear or
    tensor), one tensor read at a time."""
    ckpt_dir = os.fspath(ckpt_dir)
    cfg, qcfg = _configs(ckpt_dir, strict_config)
    h = _OpenFiles()
    plan, stems, names = _plan_int4(cfg, qcfg, ckpt_dir, h)
    model_dtype = next(d for _, _, c, _, _, d in plan.assign if c == "embed_tokens.weight")

    def items():
        for name, path, canon, e, part, _ in plan.assign:
            yield name, canon, e, part, _get(h, name, path, stems, names, qcfg)

    return cfg, qcfg, plan, model_dtype, items


def target_view(targets: dict, canon: str, e, part, moe_intermediate: int):
    """The view of our layout (hf_targets) that a checkpoint tensor fills; per-expert tensors land
    in the fused expert tensors (gate rows first)."""
    if e is None:
        return targets[canon]
    if part == "down_proj":
        return targets[canon + ".down_proj"][e]
    gu = targets[canon + ".gate_up_proj"][e]
    return gu[:moe_intermediate] if part == "gate_proj" else gu[moe_intermediate:]


@torch.no_grad()
def read_int4(ckpt_dir, *, strict_config: bool = True):
    """(cfg, qcfg, {checkpoint weight name: QuantizedLinear or tensor}) on the CPU, every check run
    first. Names are the checkpoint's (per-expert or fused), int4 ones under their weight name."""
    cfg, qcfg, _, _, items = open_int4(ckpt_dir, strict_config=strict_config)
    return cfg, qcfg, {name: t for name, _, _, _, t in items()}


def _configs(ckpt_dir, strict_config):
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    qcfg = read_quantization_config(ckpt_dir)
    if qcfg is None:
        raise CheckpointError(f"{ckpt_dir}/config.json has no quantization_config: not an int4 checkpoint "
                              f"(load it with model.checkpoint.load_checkpoint)")
    return ModelConfig.from_hf(ckpt_dir, strict=strict_config), qcfg


def _get(h, name, path, stems, names, qcfg):
    if name not in stems:
        return h.handle(path).get_tensor(name)
    stem = stems[name]      # the three parts may sit in different shards
    q, s, z = (h.handle(names[f"{stem}.{p}"]).get_tensor(f"{stem}.{p}") for p in QSUFFIXES)
    return QuantizedLinear(q, s, z, qcfg.group_size, (*q.shape[:-1], q.shape[-1] * CODES_PER_WORD), stem)


@torch.no_grad()
def load_int4_checkpoint(ckpt_dir, device="cpu", dtype=None, *, verbose: bool = True,
                         strict_config: bool = True):
    """(cfg, qcfg, weights): an int4 checkpoint dequantized into our bf16 layout (w = (q - z) * s,
    rounded to the model dtype) — the reference the int4 kernels are held to. dtype=None: the
    embedding's dtype."""
    cfg, qcfg, plan, model_dtype, items = open_int4(ckpt_dir, strict_config=strict_config)
    dtype = dtype or model_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    w = empty_weights(cfg, torch.device(device), dtype)
    targets = hf_targets(w)
    for _, canon, e, part, t in items():
        if isinstance(t, QuantizedLinear):
            t = t.dequantize(dtype)
        target_view(targets, canon, e, part, cfg.moe_intermediate_size).copy_(t)
    if verbose and plan.skipped:
        print(f"load_int4_checkpoint: skipped {dict(plan.skipped)} (known extra groups: {SKIPPED_PREFIXES})",
              file=sys.stderr)
    return cfg, qcfg, w
