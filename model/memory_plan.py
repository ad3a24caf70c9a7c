"""What a decoder will allocate, estimated from the config before anything is allocated, and
compared with the memory that is free where it will live (host memory for the CPU path, device
memory on a GPU), so that a model too large for the machine is refused with both figures instead of
an out-of-memory kill minutes later.

    parts = decode_memory(cfg, batch=1, max_seq=4096, dtype_bytes=2, backend="triton")
    check_fits(parts, "cuda", suggestion="try --layers 8")   # NotEnoughMemoryError if it cannot fit

`parts` is an ordered {name: bytes}; callers add their own entries (e.g. prefill workspaces) with
`extra=` before checking. The figures match what `Decoder` + `Generator` allocate (tests compare
them on the tiny preset), plus, for the reference backend, an allowance for the temporaries its
plain-torch ops create.
"""
from __future__ import annotations

import os

GiB = 1 << 30
RESERVE_FRACTION = 0.05     # of the free memory, kept back: allocator rounding, the runtime itself
RESERVE_MIN = 256 << 20


class NotEnoughMemoryError(MemoryError):
    """The planned allocation does not fit in the free memory. `need` and `free` are in bytes."""

    def __init__(self, message: str, need: int, free: int):
        super().__init__(message)
        self.need, self.free = need, free


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def _prefill_bytes(cfg, max_seq, dtype_bytes, backend, chunk) -> int:
    import torch

    from .prefill import DEFAULT_CHUNK, PrefillStep

    dtype = {2: torch.bfloat16, 4: torch.float32}.get(dtype_bytes, torch.bfloat16)
    chunk = min(DEFAULT_CHUNK if chunk is None else chunk, max_seq)
    return PrefillStep.workspace_bytes(cfg, chunk, dtype, backend)


def weight_bytes(cfg, dtype_bytes: int, quant=None) -> int:
    """Bytes of the decoder's weights: the model dtype throughout, or with `quant` (a
    model.quant.QuantizationConfig: group_size, lm_head, scale_dtype) the int4 layout
    (model.quant.layout.nbytes of it, from the shapes)."""
    if quant is None:
        return int(cfg.total_weight_bytes(dtype_bytes))
    from .quant.build import int4_weight_bytes

    return int4_weight_bytes(cfg, dtype_bytes, quant.group_size, quant.lm_head, quant.torch_scale_dtype.itemsize)


def decode_memory(cfg, *, batch: int, max_seq: int, dtype_bytes: int, backend: str = "triton",
                  extra: dict | None = None, prefill_chunk: int | None = None, quant=None) -> dict:
    """Bytes by part for a decoder of `batch` rows and `max_seq` cache positions in a dtype of
    `dtype_bytes` bytes: weights (int4 where `quant`, a QuantizationConfig, says: weight_bytes),
    KV cache, GDN states, step workspaces, the chunked prefill step's workspaces (`prefill_chunk`
    tokens, default model.prefill.DEFAULT_CHUNK, at most max_seq), sampler, and (backend
    "reference") the temporaries of the plain-torch ops; then `extra` (name -> bytes)."""
    for name, v in (("batch", batch), ("max_seq", max_seq), ("dtype_bytes", dtype_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    from .ops.attention import attention_workspace_numel
    from .ops.moe import moe_workspace_numel
    from .ops.sampling import sample_workspace_numel

    B, S, db = batch, max_seq, dtype_bytes
    H, V = cfg.hidden_size, cfg.vocab_size
    NH, NKV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    NV, k = cfg.linear_num_value_heads, cfg.num_experts_per_tok
    n_att, n_lin = len(cfg.attn_layers), len(cfg.linear_layers)
    # per-row activation buffers of one step, in the model dtype (Decoder._alloc_workspaces)
    row_elems = (5 * H + V + cfg.gdn_in_proj_rows + cfg.conv_dim + cfg.linear_value_dim
                 + cfg.attn_qkv_rows + 2 * NH * D + cfg.router_shared_rows + k)
    workspaces = (B * row_elems * db
                  + B * k * 4                                        # top-k ids, int32
                  + B * NV * 4                                       # GDN arrival counters, int32
                  + B * cfg.linear_num_key_heads * 4 + 4             # fused conv and router counters, int32
                  + cfg.rotary_dim // 2 * 4 + 4                      # inv_freq, kv error flag
                  + attention_workspace_numel(B, NH, D, S) * 4
                  + moe_workspace_numel(B, k, cfg.moe_intermediate_size) * db)
    parts = {
        "weights": weight_bytes(cfg, db, quant),
        "KV cache": n_att * 2 * B * NKV * S * D * db,
        "GDN states": n_lin * B * (cfg.conv_dim * cfg.linear_conv_kernel_dim * db
                                   + NV * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4),
        "step workspaces": workspaces,
        "prefill workspaces": _prefill_bytes(cfg, max_seq, dtype_bytes, backend, prefill_chunk),
        "sampler": B * 8 + B * 3 * 4 + 16 + sample_workspace_numel(B, V) * 4,
    }
    if backend == "reference":
        # The plain-torch ops make temporaries: a few copies of the widest activation (fp32), and
        # per attention row its cache repeated over the query heads (K and V).
        widest = max(V, cfg.gdn_in_proj_rows, cfg.attn_qkv_rows, cfg.router_shared_rows)
        parts["temporaries (reference ops)"] = 4 * B * widest * 4 + 2 * NH * S * D * db
        if quant is not None:
            # the int4 references dequantize their weights per call: a layer's experts in the model
            # dtype, and the unpacking's fp32/int32 temporaries (about 16 bytes a weight) of the largest
            H, E, I, Is = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
            largest = max(E * 2 * I * H, V * H if quant.lm_head == "int4" else 0)
            parts["temporaries (int4 reference dequantization)"] = (3 * E * I * H + H * Is) * db + 16 * largest
    for name, nbytes in (extra or {}).items():
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"extra[{name!r}] must be a byte count (int >= 0), got {nbytes!r}")
        parts[name] = parts.get(name, 0) + nbytes
    return parts


def _host_free() -> tuple[int | None, str]:
    """Free host memory: MemAvailable, capped by a cgroup (container) limit; (None, why) if unknown."""
    free, label = None, "host memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None, label
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            if int(limit) - usage < free:
                free, label = max(0, int(limit) - usage), "host memory (container limit)"
        break
    return free, label


def free_memory(device) -> tuple[int | None, str]:
    """(free bytes, what they are) where `device` ("cpu", "cuda", "cuda:1") allocates: host memory
    on the CPU, cudaMemGetInfo on a GPU. (None, label) where it cannot be told."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free), f"GPU {index} memory ({torch.cuda.get_device_name(index)})"
    if dev.type == "meta":
        return None, "meta device"
    return _host_free()


def describe(parts: dict) -> str:
    """'weights 1.00 GiB, KV cache 12.0 MiB, ...' (parts of at least 1 MiB)."""
    shown = [f"{name} {fmt_bytes(n)}" for name, n in parts.items() if n >= (1 << 20)]
    return ", ".join(shown) if shown else "all parts under 1 MiB"


def fits(parts: dict, free: int | None) -> bool:
    if free is None:
        return True
    return sum(parts.values()) <= free - max(RESERVE_MIN, int(free * RESERVE_FRACTION))


def check_fits(parts: dict, device, *, what: str = "the model", suggestion: str = "",
               free: tuple | None = None) -> None:
    """Raise NotEnoughMemoryError, naming what is needed (by part) and what is free, when `parts`
    does not fit in the free memory of `device` (less a reserve). `free` = (bytes, label) as
    free_memory returns it, where the caller measured already; where the free memory cannot be
    measured, nothing is refused."""
    free, label = free if free is not None else free_memory(device)
    if fits(parts, free):
        return
    need = sum(parts.values())
    msg = (f"{what} needs {fmt_bytes(need)} ({describe(parts)}) but only {fmt_bytes(free)} of {label} "
           f"is free")
    if suggestion:
        msg += f"; {suggestion}"
    raise NotEnoughMemoryError(msg, need, free)


def max_layers_that_fit(cfg, free: int | None, **plan_kwargs) -> int:
    """The most leading layers of `cfg` whose plan fits in `free` bytes (0: not even one)."""
    import dataclasses

    for n in range(cfg.num_layers, 0, -1):
        if fits(decode_memory(dataclasses.replace(cfg, num_layers=n), **plan_kwargs), free):
            return n
    return 0


def peak_memory(cfg, *, batch: int = 1, max_seq: int = 4096, dtype_bytes: int = 2, quant=None,
                backend: str = "triton", prefill_chunk: int | None = None) -> dict:
    """The peak of building the weights then the decoder (and capturing its step, which allocates
    nothing): {"steady": decode_memory's total, "build": what the weights' build holds at most,
    "peak": the larger}. In bf16 the weights are built in place (build = weights); in int4 tensor
    by tensor (random_int4_weights, load_checkpoint(quantize=)): the int4 weights plus one tensor
    in the model dtype and one chunk's quantizer temporaries (model.quant.build)."""
    parts = decode_memory(cfg, batch=batch, max_seq=max_seq, dtype_bytes=dtype_bytes, backend=backend,
                          prefill_chunk=prefill_chunk, quant=quant)
    build = parts["weights"]
    if quant is not None:
        from .quant.build import build_transient_bytes

        build += build_transient_bytes(cfg, dtype_bytes, quant.lm_head)
    steady = sum(parts.values())
    return {"steady": steady, "build": build, "peak": max(steady, build), "parts": parts}


def main(argv=None) -> int:
    """python -m model.memory_plan --preset 35b-a3b --quant int4 --max-seq 4096: the plan by part
    and the peak, for a GPU that need not be here."""
    import argparse

    from .cli_args import PRESETS, positive_int

    p = argparse.ArgumentParser(prog="python -m model.memory_plan", description=main.__doc__.split(":")[0])
    p.add_argument("--preset", choices=PRESETS, default="35b-a3b")
    p.add_argument("--layers", type=positive_int, default=None)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--max-seq", type=positive_int, default=4096)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--quant", choices=("none", "int4"), default="none")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128)
    p.add_argument("--lm-head", choices=("bf16", "int4"), default="bf16")
    p.add_argument("--backend", choices=("triton", "reference"), default="triton")
    args = p.parse_args(argv)
    import dataclasses

    from .config import ModelConfig

    cfg = ModelConfig.preset(args.preset)
    if args.layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=min(args.layers, cfg.num_layers))
    db = 2 if args.dtype == "bfloat16" else 4
    quant = None
    if args.quant == "int4":
        from .quant import QuantizationConfig

        quant = QuantizationConfig(group_size=args.group_size, lm_head=args.lm_head, scale_dtype=args.dtype)
    try:
        plan = peak_memory(cfg, batch=args.batch, max_seq=args.max_seq, dtype_bytes=db, quant=quant,
                           backend=args.backend)
    except ValueError as e:
        p.error(str(e))
    what = f"{cfg.name} ({cfg.num_layers} layers), {args.quant if quant is None else f'int4 g{args.group_size} lm_head {args.lm_head}'}"
    print(f"{what}, {args.dtype}, batch {args.batch}, {args.max_seq} positions, backend {args.backend}")
    for name, n in plan["parts"].items():
        print(f"  {name:<44} {n / 1e9:9.3f} GB")
    print(f"  {'decoder (weights, state, workspaces)':<44} {plan['steady'] / 1e9:9.3f} GB")
    print(f"  {'building the weights (at most)':<44} {plan['build'] / 1e9:9.3f} GB")
    print(f"peak device memory {plan['peak'] / 1e9:.2f} GB ({fmt_bytes(plan['peak'])})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
