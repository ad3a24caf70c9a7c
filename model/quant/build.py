"""int4 layouts built in place: empty ones (a loader fills them; on "meta" they plan memory and
launches) and seeded random ones built one tensor at a time, so that the bf16 model never exists
whole (35b-a3b: 70 GB in bf16, under 20 GB in int4).

- empty_int4_weights(cfg, device, dtype, group_size, lm_head=, scale_dtype=)
- random_int4_weights(cfg, device, dtype, seed, group_size, method, lm_head=, scale_dtype=)
    == quantize_weights(random_weights(cfg, device, dtype, seed), ...), tensor for tensor, with at
    most one bf16 tensor alive at a time
- int4_weight_bytes(cfg, dtype_bytes, group_size, lm_head, scale_bytes): nbytes() of such a
  layout, from the shapes alone; build_transient_bytes: what building one adds on top, at most
- quantize_into(w, out, method): quantize a weight into preallocated int4 tensors (or views)
- quantize_chunked(w, group_size, method): quantize a weight in row chunks on its own device
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..weights import ModelWeights, empty_weights, random_inits
from .format import CODES_PER_WORD, SCALE_DTYPES, QuantizedLinear, check_group_size, check_groupable
from .layout import _check_lm_head, is_int4_field, map_weights
from .quantizers import quantize

# weights a quantizer takes at once while building: its temporaries (fp32 copies, int64 packing;
# QUANT_TEMP_BYTES a weight, an allowance) stay near 0.2 GB beside the one bf16 tensor being quantized
BUILD_CHUNK_ELEMS = 1 << 22
QUANT_TEMP_BYTES = 48


def _scale_dtype(dtype, scale_dtype):
    sdt = scale_dtype or dtype
    if sdt not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be one of {[str(d) for d in SCALE_DTYPES]}, got {sdt!r}")
    return sdt


def check_int4_fields(cfg: ModelConfig, group_size: int, lm_head: str) -> None:
    """Every int4 field's K a whole number of groups, checked on the shapes before any work."""
    check_group_size(group_size)
    _check_lm_head(cfg, lm_head)
    for n, t in empty_weights(cfg, "meta", torch.float32).tensors():
        if is_int4_field(n, lm_head):
            check_groupable(tuple(t.shape), group_size, n)


def empty_int4_weights(cfg: ModelConfig, device, dtype: torch.dtype, group_size: int = 128, *,
                       lm_head: str = "bf16", scale_dtype: torch.dtype | None = None) -> ModelWeights:
    """An uninitialised int4 layout on `device`: QuantizedLinear fields (int32 words, scales and
    zeros in scale_dtype, default dtype) where is_int4_field says, dtype tensors elsewhere."""
    check_int4_fields(cfg, group_size, lm_head)
    device, sdt = torch.device(device), _scale_dtype(dtype, scale_dtype)

    def alloc(n, t):
        if not is_int4_field(n, lm_head):
            return torch.empty(t.shape, device=device, dtype=dtype)
        return _empty_q(tuple(t.shape), group_size, device, sdt, n)

    return map_weights(empty_weights(cfg, "meta", dtype), alloc)


@torch.no_grad()
def quantize_into(w: torch.Tensor, out: QuantizedLinear, method: str, *,
                  chunk_elems: int = BUILD_CHUNK_ELEMS) -> QuantizedLinear:
    """quantize(w) written into `out`'s preallocated tensors (views are fine: rows of a fused
    weight), row chunk by row chunk on out's device, so no second int4 copy and no temporaries
    beyond one chunk's. Equal to quantizing w whole (groups lie within rows)."""
    if tuple(w.shape) != out.shape:
        raise ValueError(f"{out.name}: weight of shape {list(w.shape)} into an int4 tensor of shape {list(out.shape)}")
    K, G = out.shape[-1], out.group_size
    rows = w.reshape(-1, K)
    dst = [t.view(-1, t.shape[-1]) for t in (out.qweight, out.scales, out.zeros)]
    step = max(1, chunk_elems // K)
    for i in range(0, rows.shape[0], step):
        q = quantize(rows[i:i + step].to(out.device), G, method, scale_dtype=out.scale_dtype, name=out.name)
        for d, part in zip(dst, (q.qweight, q.scales, q.zeros)):
            d[i:i + step].copy_(part)
    return out


def quantize_chunked(w: torch.Tensor, group_size: int, method: str, *, name: str = "weight",
                     scale_dtype: torch.dtype | None = None, chunk_elems: int = BUILD_CHUNK_ELEMS) -> QuantizedLinear:
    """quantize(w, group_size, method) on w's device in row chunks of chunk_elems weights (the
    quantizer's temporaries stay one chunk's), into new int4 tensors; scales in w's dtype by default."""
    sdt = scale_dtype or w.dtype
    return quantize_into(w, _empty_q(tuple(w.shape), group_size, w.device, sdt, name), method, chunk_elems=chunk_elems)


def _empty_q(shape, group_size, device, sdt, name) -> QuantizedLinear:
    *lead, K = shape
    return QuantizedLinear(torch.empty(*lead, K // CODES_PER_WORD, device=device, dtype=torch.int32),
                           torch.empty(*lead, K // group_size, device=device, dtype=sdt),
                           torch.empty(*lead, K // group_size, device=device, dtype=sdt),
                           group_size, tuple(shape), name)


def int4_weight_bytes(cfg: ModelConfig, dtype_bytes: int, group_size: int, lm_head: str = "bf16",
                      scale_bytes: int | None = None) -> int:
    """Bytes of the int4 layout (model.quant.layout.nbytes of it) from the shapes: half a byte a
    weight plus a scale and a zero per group on int4 fields, dtype_bytes a value elsewhere."""
    check_int4_fields(cfg, group_size, lm_head)
    sb = dtype_bytes if scale_bytes is None else scale_bytes
    total = 0
    for n, t in empty_weights(cfg, "meta", torch.float32).tensors():
        numel = t.numel()
        total += numel // 2 + 2 * (numel // group_size) * sb if is_int4_field(n, lm_head) else numel * dtype_bytes
    return total


@torch.no_grad()
def random_int4_weights(cfg: ModelConfig, device="cuda", dtype=torch.bfloat16, seed: int = 0,
                        group_size: int = 128, method: str = "hqq", *, lm_head: str = "bf16",
                        scale_dtype: torch.dtype | None = None,
                        chunk_elems: int = BUILD_CHUNK_ELEMS) -> ModelWeights:
    """quantize_weights(random_weights(cfg, device, dtype, seed), group_size, method, ...) built one
    tensor at a time on `device`: each tensor is drawn (random_weights' order and generator, so the
    same values) and, where int4, quantized at once in row chunks of chunk_elems weights; its bf16
    values are dropped before the next is drawn. Peak memory: the int4 model plus one bf16 tensor
    plus the quantizer's temporaries of one chunk (build_transient_bytes)."""
    check_int4_fields(cfg, group_size, lm_head)
    device, sdt = torch.device(device), _scale_dtype(dtype, scale_dtype)
    shapes = dict(empty_weights(cfg, "meta", dtype).tensors())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    built = {}
    for name, init in random_inits(cfg):
        t = torch.empty(shapes[name].shape, device=device, dtype=dtype)
        init(t, gen)
        if is_int4_field(name, lm_head):   # the bf16 values go as t is rebound
            t = quantize_chunked(t, group_size, method, name=name, scale_dtype=sdt, chunk_elems=chunk_elems)
        built[name] = t
    return map_weights(empty_weights(cfg, "meta", dtype), lambda n, _: built.pop(n))


def build_transient_bytes(cfg: ModelConfig, dtype_bytes: int, lm_head: str = "bf16",
                          chunk_elems: int = BUILD_CHUNK_ELEMS) -> int:
    """The most that building an int4 layout tensor by tensor (random_int4_weights, or a checkpoint
    quantized on load) holds beside the int4 tensors: the largest int4 field in the model dtype
    (a fused checkpoint's expert stack is no larger) plus one chunk's quantizer temporaries."""
    largest = max(t.numel() for n, t in empty_weights(cfg, "meta", torch.float32).tensors()
                  if is_int4_field(n, lm_head))
    return largest * dtype_bytes + chunk_elems * QUANT_TEMP_BYTES
