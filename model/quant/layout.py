"""int4 weights in the decoder's fused layout: a ModelWeights whose linear fields hold
QuantizedLinear objects (everything else as in the bf16 layout).

Groups run along K, so a fused weight (rows of several linears, or a stack of experts) quantized
as a whole has exactly the codes, scales and zeros of its parts: quantizing our layout, and
reading an int4 checkpoint (either expert layout) into it, give identical tensors.

- quantize_weights(w, ...)      bf16 layout -> int4 layout (in memory; the quantize-on-load path)
- load_int4_weights(dir, ...)   int4 checkpoint -> int4 layout, never materialising bf16 linears
- dequantize_weights(wq)        int4 layout -> bf16 layout: the reference the int4 kernels match;
                                the existing decoder runs it unchanged (backend="reference" or not)
"""
from __future__ import annotations

import dataclasses

import torch

from ..weights import LayerWeights, ModelWeights, empty_weights, hf_targets
from .format import CODES_PER_WORD, QuantizedLinear, check_groupable
from .qconfig import LM_HEAD_CHOICES
from .reader import open_int4, target_view
from .writer import quantize_rows

# fields of our layout held int4 (all linears of a layer); `lm_head` too where the config says
LAYER_INT4_FIELDS = {"mixer": ("in_proj", "out_proj", "qkv", "o_proj"),
                     "moe": ("router_shared", "gate_up_proj", "down_proj", "shared_down")}


def is_int4_field(name: str, lm_head: str) -> bool:
    """Whether the tensor of this ModelWeights.tensors() name is int4 in the layout."""
    if name == "lm_head":
        return lm_head == "int4"
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "layers" and parts[3] in LAYER_INT4_FIELDS.get(parts[2], ())


def map_weights(w: ModelWeights, fn) -> ModelWeights:
    """A ModelWeights of the same structure with each tensor t named n (as in w.tensors()) replaced
    by fn(n, t); a tied lm_head stays the embedding."""
    embed = fn("embed", w.embed)
    lm_head = embed if w.lm_head is w.embed else fn("lm_head", w.lm_head)
    layers = []
    for i, L in enumerate(w.layers):
        parts = {p: dataclasses.replace(getattr(L, p), **{f: fn(f"layers.{i}.{p}.{f}", getattr(getattr(L, p), f))
                                                          for f in getattr(L, p).__dataclass_fields__})
                 for p in ("mixer", "moe")}
        layers.append(LayerWeights(L.kind, fn(f"layers.{i}.input_norm", L.input_norm),
                                   fn(f"layers.{i}.post_norm", L.post_norm), parts["mixer"], parts["moe"]))
    return ModelWeights(w.cfg, embed, lm_head, fn("final_norm", w.final_norm), layers)


def _check_lm_head(cfg, lm_head):
    if lm_head not in LM_HEAD_CHOICES:
        raise ValueError(f"lm_head must be one of {list(LM_HEAD_CHOICES)}, got {lm_head!r}")
    if lm_head == "int4" and cfg.tie_word_embeddings:
        raise ValueError("lm_head='int4' with tied embeddings: the lm_head is the embedding, which stays in "
                         "the model dtype")


@torch.no_grad()
def quantize_weights(w: ModelWeights, group_size: int = 128, method: str = "hqq", *, lm_head: str = "bf16",
                     scale_dtype: torch.dtype | None = None) -> ModelWeights:
    """The int4 layout of w (on w's device; the other tensors shared, not copied). Every int4
    field's K is checked against the group size before any work."""
    _check_lm_head(w.cfg, lm_head)
    for n, t in w.tensors():
        if is_int4_field(n, lm_head):
            check_groupable(tuple(t.shape), group_size, n)

    def fn(n, t):
        if not is_int4_field(n, lm_head):
            return t
        return quantize_rows(t, group_size, method, scale_dtype or t.dtype, n, t.device, out_device=t.device)

    return map_weights(w, fn)


def dequantize_weights(wq: ModelWeights, dtype: torch.dtype | None = None) -> ModelWeights:
    """The bf16 layout: each QuantizedLinear dequantized ((q - z) * s in fp32, rounded to dtype,
    default the embedding's dtype); other tensors shared."""
    dtype = dtype or wq.embed.dtype
    return map_weights(wq, lambda n, t: t.dequantize(dtype) if isinstance(t, QuantizedLinear) else t.to(dtype))


def int4_fields(wq: ModelWeights) -> dict:
    """name -> QuantizedLinear for the int4 fields of an int4 layout."""
    out = {}
    map_weights(wq, lambda n, t: out.setdefault(n, t) if isinstance(t, QuantizedLinear) else t)
    return out


def check_decoder_weights(w: ModelWeights) -> None:
    """What the decoder can run: every tensor of w shaped as its config says, a QuantizedLinear only
    in an int4 field (the linears the int4 kernels read: LAYER_INT4_FIELDS and lm_head) and of the
    field's logical shape, a layer's three expert weights all int4 with one group size or none,
    everything on one device. TypeError/ValueError naming the field otherwise."""
    want = dict(empty_weights(w.cfg, "meta", torch.float32).tensors())
    got = dict(w.tensors())
    if got.keys() != want.keys():
        odd = sorted(got.keys() ^ want.keys())
        raise ValueError(f"the weights' fields differ from the {w.cfg.name} config's layout: {odd[:4]}")
    for n, t in got.items():
        shape = tuple(want[n].shape)
        if isinstance(t, QuantizedLinear):
            if not is_int4_field(n, "int4"):
                raise TypeError(f"{n} is a QuantizedLinear, but the decoder reads {n} as a plain tensor: only "
                                f"the linear fields ({', '.join(f'{p}.{f}' for p, fs in LAYER_INT4_FIELDS.items() for f in fs)}, "
                                f"lm_head) can be int4")
            if t.shape != shape:
                raise ValueError(f"{n} is a QuantizedLinear of shape {list(t.shape)}; the config's {n} is {list(shape)}")
        elif isinstance(t, torch.Tensor):
            if tuple(t.shape) != shape:
                raise ValueError(f"{n} has shape {list(t.shape)}; the config's {n} is {list(shape)}")
        else:
            raise TypeError(f"{n} must be a torch.Tensor or a QuantizedLinear, got {type(t).__name__}")
        if t.device != w.device:
            raise ValueError(f"{n} is on {t.device}, the embedding on {w.device}: the weights must share a device")
    for i, L in enumerate(w.layers):
        experts = {f: getattr(L.moe, f) for f in ("gate_up_proj", "down_proj", "shared_down")}
        q = {f: t for f, t in experts.items() if isinstance(t, QuantizedLinear)}
        if q and len(q) != len(experts):
            plain = sorted(experts.keys() - q.keys())
            raise TypeError(f"layers.{i}.moe: {sorted(q)} are int4 but {plain} not; the expert kernels read "
                            f"gate_up_proj, down_proj and shared_down all int4 or all plain")
        if len({t.group_size for t in q.values()}) > 1:
            raise ValueError(f"layers.{i}.moe: the expert weights have group sizes "
                             f"{ {f: t.group_size for f, t in q.items()} }; the expert kernels take one")


def nbytes(wq: ModelWeights) -> int:
    """Bytes of an int4 (or bf16) layout, counting each tensor and int4 part once."""
    total = 0

    def fn(n, t):
        nonlocal total
        total += t.nbytes() if isinstance(t, QuantizedLinear) else t.numel() * t.element_size()
        return t

    map_weights(wq, fn)
    return total


@torch.no_grad()
def load_int4_weights(ckpt_dir, device="cpu", dtype=None, *, strict_config: bool = True):
    """(cfg, qcfg, int4 layout) from an int4 checkpoint: the three parts of each linear are
    allocated on `device` in our fused shapes and filled in place from the checkpoint's tensors
    (either expert layout), so no bf16 copy of a linear ever exists."""
    cfg, qcfg, _, model_dtype, items = open_int4(ckpt_dir, strict_config=strict_config)
    dtype = dtype or model_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device, G, sdt = torch.device(device), qcfg.group_size, qcfg.torch_scale_dtype
    meta = empty_weights(cfg, "meta", dtype)

    def alloc(last, dt, plain):
        def fn(n, t):
            if is_int4_field(n, qcfg.lm_head):
                return torch.empty((*t.shape[:-1], last(t.shape[-1])), device=device, dtype=dt)
            return torch.empty(t.shape, device=device, dtype=dtype) if plain else t
        return fn

    # three structures alike: the plain tensors with the qweights, the scales, the zeros
    wq = map_weights(meta, alloc(lambda K: K // CODES_PER_WORD, torch.int32, True))
    ws = map_weights(meta, alloc(lambda K: K // G, sdt, False))
    wz = map_weights(meta, alloc(lambda K: K // G, sdt, False))
    tq, ts, tz = hf_targets(wq), hf_targets(ws), hf_targets(wz)
    I = cfg.moe_intermediate_size
    for name, canon, e, part, t in items():
        if isinstance(t, QuantizedLinear):
            for targets, src in ((tq, t.qweight), (ts, t.scales), (tz, t.zeros)):
                target_view(targets, canon, e, part, I).copy_(src)
        else:
            target_view(tq, canon, e, part, I).copy_(t)
    s_of, z_of = dict(ws.tensors()), dict(wz.tensors())
    shapes = dict(meta.tensors())

    def assemble(n, t):
        if not is_int4_field(n, qcfg.lm_head):
            return t
        return QuantizedLinear(t, s_of[n], z_of[n], G, tuple(shapes[n].shape), n)

    return cfg, qcfg, map_weights(wq, assemble)
