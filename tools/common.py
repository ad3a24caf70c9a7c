"""Pieces the decode tools share: building a decoder from CLI arguments, the memory-bandwidth floor,
and timing steps with CUDA events."""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

from model.cli_args import (PRESETS, add_quant_args, finite_float, nonnegative_int,  # noqa: F401 (tools use them)
                            positive_int, positive_int_list, seed)


def add_model_args(p: argparse.ArgumentParser, default_preset: str = "tiny", *, quant: bool = False) -> None:
    """--preset/--checkpoint/--layers/--dtype/--seed, and with quant=True the int4 flags
    (--quant none|int4|int4-dequant, --group-size, --lm-head: model/quant/cli.py)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, default=None, help=f"random weights (default {default_preset})")
    src.add_argument("--checkpoint", type=Path, help="Hugging Face safetensors checkpoint directory")
    p.add_argument("--layers", type=positive_int, default=None, help="keep only the first N layers (memory)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=seed, default=0)
    if quant:
        add_quant_args(p)
    # build_model reads the int4 flags only where they were added here (a tool may define its own)
    p.set_defaults(default_preset=default_preset, model_quant_flags=quant)


def fail(message: str, code: int = 2):
    """End the tool with a message on stderr and exit code 2 (a usage problem; no traceback)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(code)


def check_batch(p: argparse.ArgumentParser, flag: str, batch: int) -> None:
    """An argparse error where `batch` rows exceed what the Triton GEMV decodes together."""
    from model.ops.linear import MAX_BATCH

    if batch > MAX_BATCH:
        p.error(f"{flag} {batch}: the Triton GEMV decodes at most {MAX_BATCH} rows together")


def check_memory(parts: dict, what: str, suggestion: str, device="cuda") -> None:
    """fail() naming both figures when `parts` ({name: bytes}) does not fit in free device memory."""
    from model.memory_plan import NotEnoughMemoryError, check_fits

    try:
        check_fits(parts, device, what=what, suggestion=suggestion)
    except NotEnoughMemoryError as e:
        fail(f"not enough memory: {e}; nothing was allocated")


def require_gpu(tool: str):
    """Exit with a clear message where no CUDA GPU is usable; return torch otherwise."""
    import torch

    if not torch.cuda.is_available():
        print(f"{tool}: no CUDA GPU found. CUDA graphs (and this tool) need an NVIDIA GPU with its "
              "driver; nothing was measured.", file=sys.stderr)
        sys.exit(2)
    return torch


def build_model(args, device="cuda", *, batch: int | None = None, max_seq: int | None = None):
    """(cfg, weights) from --checkpoint or --preset (optionally cut to --layers), int4 where --quant
    (or an int4 checkpoint) says. With batch and max_seq, the memory a decoder of that size needs
    is checked against what is free first."""
    import dataclasses

    import torch

    from model.config import ModelConfig

    dtype = getattr(torch, args.dtype)
    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            fail(f"--checkpoint {args.checkpoint}: no such directory")
        if args.layers is not None:
            fail("--layers applies to --preset (random weights); a checkpoint is loaded whole")
        try:
            cfg = ModelConfig.from_hf(args.checkpoint)
        except (ValueError, OSError) as e:
            fail(f"--checkpoint {args.checkpoint}: {e}")
    else:
        cfg = ModelConfig.preset(args.preset or args.default_preset)
        if args.layers is not None:
            if not 1 <= args.layers <= cfg.num_layers:
                fail(f"--layers {args.layers}: must be in [1, {cfg.num_layers}]")
            cfg = dataclasses.replace(cfg, num_layers=args.layers)
    from model.quant import read_quantization_config
    from model.quant.cli import build_weights, plan_quant

    flags = args if getattr(args, "model_quant_flags", False) else \
        argparse.Namespace(quant="none", group_size=None, lm_head=None)   # a tool without them: as stored
    try:
        qcfg = read_quantization_config(args.checkpoint) if args.checkpoint is not None else None
        quant = plan_quant(flags, cfg, dtype, qcfg)
    except ValueError as e:   # ConfigError of an int4 checkpoint's quantization_config included
        fail(f"--quant {flags.quant}: {e}" if flags.quant != "none" else str(e))
    if batch is not None and max_seq is not None:
        from model.memory_plan import decode_memory, free_memory, max_layers_that_fit

        plan = dict(batch=batch, max_seq=max_seq, dtype_bytes=dtype.itemsize, quant=quant.memory_spec)
        hints = ["a smaller --context or batch"]
        if args.checkpoint is None:
            n = max_layers_that_fit(cfg, free_memory(device)[0], **plan)
            if 0 < n < cfg.num_layers:
                hints.insert(0, f"--layers {n} (the first {n} of {cfg.num_layers} layers fit)")
        check_memory(decode_memory(cfg, **plan), f"{cfg.name} ({cfg.num_layers} layers, batch {batch}, "
                     f"{max_seq} positions)", "try " + ", or ".join(hints), device)
    try:
        return build_weights(quant, cfg, device, dtype, checkpoint=args.checkpoint, seed=args.seed)
    except (ValueError, OSError) as e:
        fail(f"--checkpoint {args.checkpoint}: {e}" if args.checkpoint is not None else str(e))


def weights_format(weights) -> str:
    """'bf16' or e.g. 'int4 g128, lm_head bf16': what the decoder reads, for tables and JSON."""
    from model.quant.format import QuantizedLinear
    from model.quant.layout import int4_fields

    fields = int4_fields(weights)
    if not fields:
        return str(weights.dtype).replace("torch.", "")
    groups = sorted({q.group_size for q in fields.values()})
    head = "int4" if isinstance(weights.lm_head, QuantizedLinear) else str(weights.dtype).replace("torch.", "")
    return f"int4 g{'/'.join(map(str, groups))}, lm_head {head}"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def copy_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (median)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = time_cuda(lambda: dst.copy_(src), reps=reps, warmup=3)
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def time_cuda(fn, reps: int, warmup: int = 3, stream=None) -> list[float]:
    """Per-call device time in ms of fn() with CUDA events on the current (or given) stream."""
    import torch

    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        for _ in range(warmup):
            fn()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        events[0].record()
        for i in range(reps):
            fn()
            events[i + 1].record()
        events[-1].synchronize()
    return [events[i].elapsed_time(events[i + 1]) for i in range(reps)]


def time_graph_us(step, reps: int, calls: int) -> float:
    """Median device time per call, in µs, of a torch CUDA graph holding `calls` calls made by
    step() (warmed up eagerly on a side stream first, so compilation stays out of the capture)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = time_cuda(graph.replay, reps=reps)
    del graph
    return statistics.median(ms) * 1e3 / calls


def kv_bytes_per_token(cfg, context: int, dtype_bytes: int, batch: int = 1) -> int:
    """KV-cache bytes one decode step reads at this context (attention layers only)."""
    attn_layers = sum(1 for t in cfg.layer_types if t == "full_attention")
    return 2 * attn_layers * cfg.num_key_value_heads * cfg.head_dim * context * dtype_bytes * batch
