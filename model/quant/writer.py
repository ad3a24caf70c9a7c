"""Quantize a bf16 Hugging Face checkpoint into an int4 one, tensor by tensor.

The input is checked whole first (the bf16 loader's plan: names, shapes, both expert layouts,
coverage; and every int4 tensor's K against the group size), so a bad checkpoint fails before
anything is written. Then each tensor is read, quantized on `device` in row chunks (bounded device
memory), and appended to the current output shard; a shard is written once it passes
`shard_bytes` (bounded host memory). Skipped groups (vision tower, MTP) are left out; config.json
gets `quantization_config`; every other top-level file (tokenizer, generation config, chat
template) is copied as is.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch

from ..checkpoint import CheckpointError, _files, _OpenFiles, _plan, _text_name
from ..config import ModelConfig
from ..config_checks import load_json_object
from .format import QuantizedLinear, check_groupable
from .qconfig import SCALE_DTYPE_NAMES, QuantizationConfig, qbase
from .quantizers import quantize
from .reader import read_quantization_config

CHUNK_ELEMS = 1 << 26   # weights quantized at once (fp32 temporaries are a few times this)


def quantize_rows(w: torch.Tensor, group_size: int, method: str, scale_dtype, name: str, device,
                  chunk_elems: int = CHUNK_ELEMS, out_device="cpu") -> QuantizedLinear:
    """quantize() over row chunks of w [..., N, K] on `device`; results on `out_device`. Groups lie
    within rows, so this equals quantizing the whole tensor at once."""
    K = w.shape[-1]
    check_groupable(tuple(w.shape), group_size, name)
    rows = w.reshape(-1, K)
    step = max(1, chunk_elems // K)
    parts = [quantize(rows[i:i + step].to(device), group_size, method, scale_dtype=scale_dtype, name=name)
             for i in range(0, rows.shape[0], step)]
    lead = tuple(w.shape[:-1])
    cat = [torch.cat([getattr(p, a).to(out_device) for p in parts]).reshape(*lead, -1) for a in ("qweight", "scales", "zeros")]
    return QuantizedLinear(*cat, group_size, tuple(w.shape), name)


class _ShardWriter:
    def __init__(self, out_dir, shard_bytes):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.pending, self.size, self.files, self.weight_map = {}, 0, [], {}

    def add(self, name, t):
        self.pending[name] = t.contiguous()
        self.size += t.numel() * t.element_size()
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self):
        from safetensors.torch import save_file

        if not self.pending:
            return
        fname = f"model-{len(self.files) + 1:05d}.safetensors.part"
        save_file(self.pending, os.path.join(self.out_dir, fname), metadata={"format": "pt"})
        self.files.append((fname, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self):
        """Name the shards (model.safetensors, or model-0000i-of-0000n with an index)."""
        self.flush()
        n = len(self.files)
        for i, (tmp, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            self.weight_map.update({k: final for k in names})
        if n > 1:
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}, f, indent=1)


@torch.no_grad()
def quantize_checkpoint(src, dst, *, method: str = "hqq", group_size: int = 128, lm_head: str = "bf16",
                        scale_dtype: str | None = None, device="cpu", shard_bytes: int = 4 << 30,
                        progress: bool = True, strict_config: bool = True) -> QuantizationConfig:
    """Write an int4 copy of the bf16 checkpoint `src` into the new directory `dst`; returns the
    quantization_config written. scale_dtype: a name in SCALE_DTYPE_NAMES, default the model dtype
    (the embedding's)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"checkpoint directory {src} does not exist")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"--out {dst} is the input checkpoint; write the int4 one elsewhere")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise FileExistsError(f"output {dst} exists and is not an empty directory; refusing to overwrite it")
    if read_quantization_config(src) is not None:
        raise CheckpointError(f"{src} is already quantized (config.json has quantization_config)")
    cfg = ModelConfig.from_hf(src, strict=strict_config)
    if lm_head == "int4" and cfg.tie_word_embeddings:
        raise ValueError("lm_head='int4' with tied embeddings: the lm_head is the embedding, which stays in "
                         "the model dtype; use lm_head='bf16'")
    h = _OpenFiles()
    plan = _plan(cfg, _files(src), cfg.tie_word_embeddings, h.meta)
    model_dtype = next(d for _, _, c, _, _, d in plan.assign if c == "embed_tokens.weight")
    if scale_dtype is None:
        scale_dtype = str(model_dtype).replace("torch.", "")
    if scale_dtype not in SCALE_DTYPE_NAMES:
        raise ValueError(f"scale_dtype {scale_dtype!r} is not one of {list(SCALE_DTYPE_NAMES)}")
    qcfg = QuantizationConfig(method=method, group_size=group_size, lm_head=lm_head, scale_dtype=scale_dtype)
    todo = []
    for name, path, *_ in plan.assign:
        int4 = qcfg.is_int4(_text_name(name, False))
        if int4:
            check_groupable(h.meta(name, path)[0], group_size, name)
        todo.append((name, path, int4))

    from tqdm import tqdm

    os.makedirs(dst, exist_ok=True)
    out = _ShardWriter(dst, shard_bytes)
    for name, path, int4 in tqdm(todo, desc=f"int4 {method} g{group_size}", unit="tensor", file=sys.stderr,
                                 disable=not progress):
        t = h.handle(path).get_tensor(name)
        if int4:
            ql = quantize_rows(t, group_size, method, qcfg.torch_scale_dtype, name, device)
            stem = qbase(name)
            for part in ("qweight", "scales", "zeros"):
                out.add(f"{stem}.{part}", getattr(ql, part))
        else:
            out.add(name, t)
        del t
    out.close()
    _write_side_files(src, dst, qcfg)
    if progress and plan.skipped:
        print(f"quantize: left out {dict(plan.skipped)}", file=sys.stderr)
    return qcfg


def _write_side_files(src, dst, qcfg):
    config = load_json_object(os.path.join(src, "config.json"), "config")
    config["quantization_config"] = qcfg.to_dict()
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for fname in sorted(os.listdir(src)):
        p = os.path.join(src, fname)
        if (os.path.isfile(p) and fname != "config.json" and not fname.endswith(".safetensors")
                and fname != "model.safetensors.index.json"):
            shutil.copyfile(p, os.path.join(dst, fname))
