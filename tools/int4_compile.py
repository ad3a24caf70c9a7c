"""Compile the int4 decode kernels offline for a GPU that need not be here, at a preset's shapes.

Every 2-D int4 linear of the preset's layout (one linear-attention and one full-attention layer,
and the lm_head) goes through gemv_int4_triton and norm_gemv_int4_triton, and the preset's experts
through moe_experts_int4_triton, on meta tensors at each batch, under the device profile given; each distinct launch is checked (tools/launch_audit's rules)
and compiled by the installed Triton for the profile's architecture, twice: as launch_audit does
(no alignment assumed) and with the runtime's divisibility-by-16 specialisation (the build the
device runs: vectorised word loads), with the shared memory of each.

    python -m tools.int4_compile --profile h200 --preset 35b-a3b --batch 1,3,8,16 [--group-size 128]
    python -m tools.int4_compile --profile h200 --prefill 16,300,2048 [--group-size 128]

--prefill T,... audits the chunked prefill step instead: the preset's model with every linear and
the lm_head int4 (meta tensors) through PrefillStep.forward at each chunk size, so the dispatch
itself is exercised; the int4 kernels it launches (GEMM, grouped experts, lm_head GEMV) are
checked and compiled as above, the others are launch_audit --prefill's.

Run without TRITON_INTERPRET (the kernels must be defined for the compiler). Exit status 1 when a
launch breaks a rule or fails to compile.
"""
from __future__ import annotations

import argparse
import sys


def _linear_shapes(preset: str) -> dict:
    """name -> (N, K) of every 2-D int4 field of one layer of each kind and the lm_head."""
    import torch

    from model.config import ModelConfig
    from model.quant.layout import is_int4_field
    from model.weights import empty_weights

    cfg = ModelConfig.preset(preset)
    w = empty_weights(cfg, torch.device("meta"), torch.bfloat16)
    shapes, kinds = {}, set()
    for name, t in w.tensors():
        parts = name.split(".")
        if name == "lm_head" or is_int4_field(name, "bf16"):
            if name != "lm_head":
                kind = w.layers[int(parts[1])].kind
                if (kind, parts[3]) in kinds:
                    continue
                kinds.add((kind, parts[3]))
            if t.dim() == 2:
                shapes[name] = tuple(t.shape)
    return shapes


def record(profile, preset: str, batches, group_size: int):
    import torch

    from model.ops.hardware import use_profile
    from model.ops.linear import int4
    from model.quant.format import QuantizedLinear
    from tools.launch_audit import recording

    dev = torch.device("meta")
    with use_profile(profile), recording(("model.ops.linear.int4", "model.ops.moe.int4", "model.ops.norm")) as log:
        for name, (n, k) in _linear_shapes(preset).items():
            if k % group_size:
                continue
            w = QuantizedLinear(torch.empty(n, k // 8, dtype=torch.int32, device=dev),
                                torch.empty(n, k // group_size, dtype=torch.bfloat16, device=dev),
                                torch.empty(n, k // group_size, dtype=torch.bfloat16, device=dev),
                                group_size, (n, k), name)
            for b in batches:
                def e(*shape):
                    return torch.empty(shape, dtype=torch.bfloat16, device=dev)
                # the default; at batch 1 (the whole-row kernel) also the per-block kernel (MODEL_INT4_ROWS=0)
                for rows in (None, False) if b == 1 else (None,):
                    la = {} if rows is None else {"launch": int4.gemv_int4_config(b, n, k, group_size, rows=False)}
                    int4.gemv_int4_triton(e(b, k), w, e(b, n), **la)
                    if rows is not None:
                        la = {"launch": int4.gemv_int4_config(b, n, k, group_size, norm=True, rows=False)}
                    int4.norm_gemv_int4_triton(e(b, k), e(b, k), e(k), 1e-6, w, e(b, n), residual_out=e(b, k),
                                               normed_out=e(b, k), **la)
        _record_moe(preset, batches, group_size)
    return log


PREFILL_INT4_MODULES = ("model.ops.linear.int4_gemm", "model.ops.moe.grouped_int4", "model.ops.linear.int4")


def meta_int4_weights(cfg, group_size: int, lm_head: str = "int4"):
    """The int4 layout of cfg's model on meta tensors (shapes only): every int4 field of
    model.quant.layout a QuantizedLinear, bf16 scales and zeros."""
    import torch

    from model.quant.format import QuantizedLinear
    from model.quant.layout import is_int4_field, map_weights
    from model.weights import empty_weights

    dev = torch.device("meta")

    def fn(name, t):
        if not is_int4_field(name, lm_head):
            return t
        *lead, n, k = t.shape
        parts = (torch.empty(*lead, n, k // 8, dtype=torch.int32, device=dev),
                 torch.empty(*lead, n, k // group_size, dtype=torch.bfloat16, device=dev),
                 torch.empty(*lead, n, k // group_size, dtype=torch.bfloat16, device=dev))
        return QuantizedLinear(*parts, group_size, tuple(t.shape), name)

    return map_weights(empty_weights(cfg, dev, torch.bfloat16), fn)


def record_prefill(profile, preset: str, chunks, group_size: int):
    """The launches of the prefill step over the preset's int4 model at these chunk sizes."""
    import torch

    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.ops.hardware import use_profile
    from tools.launch_audit import PREFILL_MODULES, recording

    cfg = ModelConfig.preset(preset)
    weights = meta_int4_weights(cfg, group_size)
    dev = torch.device("meta")
    with use_profile(profile), recording(PREFILL_MODULES + PREFILL_INT4_MODULES) as log:
        for t in chunks:
            dec = Decoder(cfg, weights, max_batch=1, max_seq=max(t, 16), backend="triton")
            dec.prefill_step(t).forward(torch.zeros(t, dtype=torch.int64, device=dev),
                                        torch.zeros(3, dtype=torch.int64, device=dev))
    return log


def _record_moe(preset: str, batches, group_size: int) -> None:
    """The int4 expert kernels at the preset's expert shapes."""
    import torch

    from model.config import ModelConfig
    from model.ops.moe import int4 as moe4
    from model.quant.format import QuantizedLinear

    cfg = ModelConfig.preset(preset)
    H, I, IS = cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    dev, G = torch.device("meta"), group_size

    def q(*shape):
        return QuantizedLinear(torch.empty(*shape[:-1], shape[-1] // 8, dtype=torch.int32, device=dev),
                               torch.empty(*shape[:-1], shape[-1] // G, dtype=torch.bfloat16, device=dev),
                               torch.empty(*shape[:-1], shape[-1] // G, dtype=torch.bfloat16, device=dev),
                               G, shape)

    gu, dn, sd = q(E, 2 * I, H), q(E, H, I), q(H, IS)
    for b in batches:
        def e(*shape, dt=torch.bfloat16):
            return torch.empty(shape, dtype=dt, device=dev)
        # the default (tensor-core kernels up to moe4.TC_MAX_BATCH rows), then the CUDA-core kernels
        # (fp32 rows, larger batches), and at batch 1 the whole-row kernels (MODEL_INT4_MOE_ROWS=1)
        launches = [None, moe4.moe_int4_launch_config(b, H, I, K, IS, G, tc=False, rows=False)]
        if b == 1:
            launches.append(moe4.moe_int4_launch_config(b, H, I, K, IS, G, rows=True))
        for launch in launches:
            moe4.moe_experts_int4_triton(e(b, H), gu, dn, e(b, K, dt=torch.int32), e(b, K), e(b, 2 * IS), sd,
                                         e(b, 1), e(b * K * I), e(b, H), launch=launch)


def compile_aligned(launch, profile) -> dict:
    """launch_audit.compile_launch with Triton's runtime specialisation applied: pointers and the
    integer arguments that are multiples of 16 marked divisible by 16 (as the launcher marks them),
    so the word loads vectorise as they will on the device. Shared memory and load widths."""
    import inspect
    import re

    import triton
    from triton.backends.compiler import GPUTarget

    from tools.launch_audit import _sig

    names = list(inspect.signature(launch.jit.fn).parameters)
    sig = {k: ("constexpr" if k in launch.constexprs else _sig(launch.args[k])) for k in names}
    attrs = {}
    for i, k in enumerate(names):
        v = launch.args.get(k)
        if hasattr(v, "dtype") or (isinstance(v, int) and not isinstance(v, bool) and v and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=launch.jit, signature=sig, constexprs=dict(launch.constexprs), attrs=attrs)
    cc = profile.capability[0] * 10 + profile.capability[1]
    opts = {k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages")}
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    ptx = kernel.asm["ptx"]
    return {"shared": int(kernel.metadata.shared), "v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
            "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca")}


def _kernel_names(modules) -> set[str]:
    import importlib

    return {k for m in modules for k, v in vars(importlib.import_module(m)).items()
            if k.endswith("_kernel") and hasattr(v, "fn")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--preset", default="35b-a3b")
    ap.add_argument("--batch", default="1,3,8,16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prefill", default=None, help="audit the int4 prefill step at these chunk sizes instead")
    args = ap.parse_args(argv)
    from model.ops.hardware import DeviceProfile
    from tools.launch_audit import compile_launch, problems, unique

    profile = DeviceProfile.preset(args.profile)
    if args.prefill is not None:
        try:
            chunks = tuple(int(t) for t in args.prefill.split(","))
        except ValueError:
            chunks = ()
        if not chunks or min(chunks) < 1:
            ap.error(f"--prefill needs comma-separated positive ints; got {args.prefill!r}")
        int4_kernels = _kernel_names(PREFILL_INT4_MODULES)
        log = [L for L in record_prefill(profile, args.preset, chunks, args.group_size) if L.kernel in int4_kernels]
        missing = {"_gemm_int4_kernel", "_moe_gate_up_int4_gemm_kernel", "_moe_down_int4_gemm_kernel",
                   "_moe_shared_combine_int4_kernel"} - {L.kernel for L in log}
        if missing:
            print(f"never launched by the int4 prefill step: {sorted(missing)}")
            return 1
    else:
        log = record(profile, args.preset, tuple(int(b) for b in args.batch.split(",")), args.group_size)
    bad = 0
    for L in unique(log):
        try:
            aligned = compile_aligned(L, profile)
            compile_launch(L, profile)
        except Exception as exc:  # noqa: BLE001 - report every failing launch, then fail
            L.compiled = None
            print(f"{L.kernel} {L.constexprs} COMPILE ERROR: {type(exc).__name__}: {exc}")
            bad += 1
            continue
        p = problems(L, profile)
        bad += bool(p)
        cx = {k: v for k, v in L.constexprs.items() if k.startswith(("BLOCK", "GROUP", "NORM", "ONE"))}
        print(f"{L.kernel} grid={L.grid} {cx} warps={L.options.get('num_warps')} "
              f"shared={L.compiled['shared']} B (aligned: {aligned['shared']} B, {aligned['v4_loads']} v4 loads, "
              f"{aligned['cp_async']} cp.async) {'; '.join(p) or 'ok'}")
        if aligned["shared"] > profile.smem_per_block:
            print(f"  aligned build: shared memory {aligned['shared']} B > {profile.smem_per_block} B per block")
            bad += 1
    print(f"{len(unique(log))} distinct launches, {bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
