"""The int4 flags the command lines share (model.generate, model.demo, tools/bench_decode.py,
tools/capture_trace.py; defined in model/cli_args.py, parsed before anything heavy is imported)
and the weights they build.

    --quant none          the checkpoint's weights as stored (an int4 checkpoint stays int4), or
                          a preset's bf16 random weights
    --quant int4          int4 weights run by the int4 kernels: a bf16 checkpoint quantized while
                          it loads (load_checkpoint(quantize=...)), a preset built int4 tensor by
                          tensor (random_int4_weights), an int4 checkpoint as stored
    --quant int4-dequant  the int4 model's math through the bf16 kernels (its weights quantized,
                          then dequantized to the model dtype: the reference, at bf16 memory)
    --group-size G        32, 64 or 128 (default 128) when quantizing
    --lm-head bf16|int4   the lm_head's format when quantizing (default bf16)

Quantizing uses HQQ (docs/int4.md), scales and zeros in the model dtype.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..cli_args import DEFAULT_GROUP_SIZE

METHOD = "hqq"


@dataclass(frozen=True)
class QuantPlan:
    """What to build: mode "none" (as stored / bf16), "int4" or "int4-dequant"; spec the
    QuantizationConfig of the int4 weights (None for a bf16 model); from_checkpoint when the
    checkpoint itself is int4 (spec is then its own)."""
    mode: str
    spec: object = None
    from_checkpoint: bool = False

    @property
    def int4_kernels(self) -> bool:
        return self.mode == "int4"

    @property
    def memory_spec(self):
        """The spec the memory plan counts: the int4 layout lives on the device only in mode int4."""
        return self.spec if self.int4_kernels else None

    def describe(self) -> str:
        if self.spec is None:
            return "bf16"
        s = self.spec
        what = f"int4 ({s.method}, group {s.group_size}, lm_head {s.lm_head})"
        return what + (" dequantized (bf16 kernels)" if self.mode == "int4-dequant" else "")


def plan_quant(args, cfg, dtype, checkpoint_qcfg=None) -> QuantPlan:
    """The QuantPlan of --quant/--group-size/--lm-head/--quant-method for a model of `cfg` in
    `dtype`, given the checkpoint's quantization_config (None: bf16 checkpoint or preset).
    ValueError naming the flag for a combination that cannot be: a group size that does not divide
    every int4 weight, an int4 lm_head on tied embeddings, flags that contradict an int4 checkpoint.
    A tool that defines its own int4 flags may lack --quant-method."""
    from . import QuantizationConfig
    from .build import check_int4_fields

    method = getattr(args, "quant_method", None)
    if checkpoint_qcfg is not None:
        q = checkpoint_qcfg
        for flag, given, stored in (("--group-size", args.group_size, q.group_size),
                                    ("--lm-head", args.lm_head, q.lm_head),
                                    ("--quant-method", method, q.method)):
            if given is not None and given != stored:
                raise ValueError(f"{flag} {given}: the checkpoint is int4 already, with {flag[2:]} {stored} "
                                 f"(its quantization_config); leave {flag} out")
        return QuantPlan("int4-dequant" if args.quant == "int4-dequant" else "int4", q, True)
    if args.quant == "none":
        for flag, given in (("--group-size", args.group_size), ("--lm-head", args.lm_head),
                            ("--quant-method", method)):
            if given is not None:
                raise ValueError(f"{flag} applies when quantizing: add --quant int4 (or int4-dequant)")
        return QuantPlan("none")
    G = args.group_size or DEFAULT_GROUP_SIZE
    lm_head = args.lm_head or "bf16"
    check_int4_fields(cfg, G, lm_head)      # every int4 weight's K against G, tied lm_head: before any work
    spec = QuantizationConfig(method=method or METHOD, group_size=G, lm_head=lm_head,
                              scale_dtype=str(dtype).replace("torch.", ""))
    return QuantPlan(args.quant, spec)


def build_weights(plan: QuantPlan, cfg, device, dtype, *, checkpoint=None, seed: int = 0):
    """(cfg, weights) as the plan says, from `checkpoint` (a directory) or seeded random weights
    of `cfg`; a note on stderr says what runs. Errors of the loaders pass through."""
    from . import dequantize_weights, load_int4_checkpoint, load_int4_weights, quantize_weights
    from .build import random_int4_weights

    s = plan.spec
    if plan.from_checkpoint:
        if plan.mode == "int4":
            cfg, _, w = load_int4_weights(checkpoint, device=device, dtype=dtype)
        else:
            cfg, _, w = load_int4_checkpoint(checkpoint, device=device, dtype=dtype)
    elif checkpoint is not None:
        from ..checkpoint import load_checkpoint

        if plan.mode == "int4":
            cfg, w = load_checkpoint(checkpoint, device=device, dtype=dtype, quantize=s)
        else:
            cfg, w = load_checkpoint(checkpoint, device=device, dtype=dtype)
            if plan.mode == "int4-dequant":
                w = dequantize_weights(quantize_weights(w, s.group_size, s.method, lm_head=s.lm_head,
                                                        scale_dtype=s.torch_scale_dtype))
    elif plan.mode == "int4":
        w = random_int4_weights(cfg, device, dtype, seed, s.group_size, s.method, lm_head=s.lm_head,
                                scale_dtype=s.torch_scale_dtype)
    else:
        from ..weights import random_weights

        w = random_weights(cfg, device=device, dtype=dtype, seed=seed)
        if plan.mode == "int4-dequant":
            w = dequantize_weights(quantize_weights(w, s.group_size, s.method, lm_head=s.lm_head,
                                                    scale_dtype=s.torch_scale_dtype))
    if s is not None:
        how = ("the int4 kernels" if plan.mode == "int4" else
               f"the bf16 kernels on its dequantized weights (the int4 reference math, at {dtype} size)")
        src = "int4 checkpoint" if plan.from_checkpoint else f"--quant {plan.mode}"
        print(f"note: {src}: {plan.describe().replace(' dequantized (bf16 kernels)', '')} through {how}",
              file=sys.stderr)
    return cfg, w
