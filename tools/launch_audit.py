"""Launch configurations of every decode kernel for a GPU that need not be here: the decode step
runs on meta tensors (shapes only) with each Triton kernel replaced by a recorder, under the
device profile given (model/ops/hardware.py); each launch is checked (grid, warps, power-of-two
blocks, PDL only where the profile has it), and with --compile also compiled offline by Triton for
the profile's architecture, its shared memory checked against the profile's limit. --prefill T,...
audits the chunked prefill step's kernels at those chunk sizes instead.

    python -m tools.launch_audit --profile l4 --preset 35b-a3b --batch 1,8 [--compile] [--json out.json]
    python -m tools.launch_audit --profile h200 --quant int4 --compile      (the int4 decode step only)
    python -m tools.launch_audit --profile h200 --prefill 16,4096 --compile

Compiling offline with the Triton version of the GPU machine catches its front-end errors and
shared-memory overflows before any device time is spent.

Exit status 1 when any launch breaks a rule. tests/test_ops_launch_profiles.py runs the same.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import sys
from dataclasses import dataclass, field

# every module holding a decode kernel (the prefill kernels live beside them in other files); the
# int4 ones run where the weights are int4 (a second decode step, with int4 weights, covers them)
DECODE_MODULES = ("model.ops.norm", "model.ops.conv", "model.ops.sampling",
                  "model.ops.attention.decode", "model.ops.gated_delta.step",
                  "model.ops.linear.gemv", "model.ops.moe.decode",
                  "model.ops.linear.int4", "model.ops.moe.int4")
INT4_GROUP_SIZE = 128   # every int4 tensor of the presets groups at 128 (docs/int4.md)
# modules holding only prefill kernels; the prefill step also launches the norms, the router, the
# lm_head GEMV and the conv module's prefill kernel
PREFILL_ONLY_MODULES = ("model.ops.gated_delta.chunk", "model.ops.attention.prefill",
                        "model.ops.moe.grouped", "model.ops.moe.grouping")
PREFILL_MODULES = ("model.ops.norm", "model.ops.conv", "model.ops.moe.decode",
                   "model.ops.linear.gemv") + PREFILL_ONLY_MODULES
_WARPS = (1, 2, 4, 8, 16, 32)
_OPTIONS = ("num_warps", "num_stages", "launch_pdl", "num_ctas", "maxnreg")


@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: dict             # runtime arguments by name
    constexprs: dict       # tl.constexpr arguments by name
    options: dict          # num_warps, num_stages, launch_pdl
    jit: object = field(repr=False, default=None)
    compiled: dict | None = None
    pdl_allowed: bool = True   # launched where PDL may be used (not inside a prefill step by default)


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, name, jit, log):
        from model.ops._util import pdl_allowed_here

        self.name, self.jit, self.log = name, jit, log
        self.pdl_allowed_here = pdl_allowed_here
        params = inspect.signature(jit.fn).parameters
        self.names = list(params)
        self.constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(self.names, args))
            opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS}
            bound.update(kwargs)
            unknown = set(bound) - set(self.names)
            if unknown:
                raise TypeError(f"{self.name}: unknown arguments {sorted(unknown)}")
            cx = {k: v for k, v in bound.items() if k in self.constexpr}
            rt = {k: v for k, v in bound.items() if k not in self.constexpr}
            g = grid(cx) if callable(grid) else grid
            self.log.append(Launch(self.name, tuple(g), rt, cx, opts, self.jit,
                                   pdl_allowed=self.pdl_allowed_here()))
        return launch


def decode_kernel_names() -> set[str]:
    names = set()
    for mod_name in DECODE_MODULES:
        mod = importlib.import_module(mod_name)
        names |= {k for k, v in vars(mod).items() if k.endswith("_kernel") and "prefill" not in k and hasattr(v, "fn")}
    return names


def prefill_kernel_names() -> set[str]:
    names = set()
    for mod_name in PREFILL_ONLY_MODULES:
        mod = importlib.import_module(mod_name)
        names |= {k for k, v in vars(mod).items() if k.endswith("_kernel") and hasattr(v, "fn")}
    return names | {"_conv1d_prefill_kernel"}


@contextlib.contextmanager
def recording(modules=DECODE_MODULES):
    """Every kernel of these modules replaced by a recorder; yields the list the launches go to."""
    log, saved = [], []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        for k, v in list(vars(mod).items()):
            if k.endswith("_kernel") and hasattr(v, "fn"):
                saved.append((mod, k, v))
                setattr(mod, k, _Recorder(k, v, log))
    try:
        yield log
    finally:
        for mod, k, v in saved:
            setattr(mod, k, v)


def run_decode_step(preset: str, batch: int, dtype, max_seq: int = 4096, int4: bool = False) -> None:
    """One decode step of ``preset`` at batch ``batch`` on meta tensors (with int4: every linear,
    the lm_head too, int4 at group INT4_GROUP_SIZE), plus the ops the step does not reach at that
    config (the unfused norms, the unfused gated delta, sampling)."""
    import torch

    from model import ops
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.quant.build import empty_int4_weights
    from model.weights import empty_weights

    cfg = ModelConfig.preset(preset)
    dev = torch.device("meta")
    weights = (empty_int4_weights(cfg, dev, dtype, INT4_GROUP_SIZE, lm_head="int4") if int4
               else empty_weights(cfg, dev, dtype))
    dec = Decoder(cfg, weights, max_batch=batch, max_seq=max_seq, backend="triton")
    tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
    dec.forward(tokens, tokens.clone())
    t = ops.backend("triton")
    H, NV, V, eps = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_head_dim, cfg.rms_norm_eps

    def e(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=dev)

    t.rmsnorm(e(batch, H), e(H), eps, e(batch, H))
    t.gated_rmsnorm(e(batch, NV * V), e(batch, NV * V), e(V), eps, e(batch, NV * V))
    C = cfg.conv_dim
    t.gated_delta_step(e(batch, C), e(batch, NV), e(batch, NV), e(NV), e(NV),
                       e(batch, NV, cfg.linear_key_head_dim, V, dt=torch.float32), e(batch, NV * V),
                       cfg.linear_num_key_heads, cfg.linear_key_head_dim, V)
    vocab = cfg.vocab_size
    t.sample(e(batch, vocab), e(batch, 3, dt=torch.float32), e(2, dt=torch.int64),
             e(batch, dt=torch.int64), e(t.sample_workspace_numel(batch, vocab), dt=torch.float32))
    if int4:   # the CUDA-core expert kernels, which fp32 rows and batches past the tensor-core ones take
        from model.ops import moe
        from model.ops.moe import int4 as moe4

        m, K, I, Is = dec.weights.layers[0].moe, cfg.num_experts_per_tok, cfg.moe_intermediate_size, \
            cfg.shared_expert_intermediate_size
        # at batch 1 also the whole-row kernels (MODEL_INT4_MOE_ROWS=1)
        for rows in (False, True) if batch == 1 else (False,):
            launch = moe4.moe_int4_launch_config(batch, H, I, K, Is, INT4_GROUP_SIZE, tc=False, rows=rows)
            moe4.moe_experts_int4_triton(e(batch, H), m.gate_up_proj, m.down_proj, e(batch, K, dt=torch.int32),
                                         e(batch, K), e(batch, 2 * Is), m.shared_down, e(batch, 1),
                                         moe.moe_workspace(batch, K, I, dtype, dev), e(batch, H), launch=launch)
        if batch == 1:   # the per-block GEMV (MODEL_INT4_ROWS=0) at the in_proj (norm) and out_proj shapes
            from model.ops.hardware import current_profile
            from model.ops.linear import int4 as lin4

            gdn = next(layer.mixer for layer in dec.weights.layers if layer.kind == "linear_attention")
            n_in, k_out = gdn.in_proj.shape[0], gdn.out_proj.shape[1]
            per_block = lin4.gemv_int4_config(1, n_in, H, INT4_GROUP_SIZE, norm=True, profile=current_profile(),
                                              rows=False)
            lin4.norm_gemv_int4_triton(e(1, H), e(1, H), e(H), eps, gdn.in_proj, e(1, n_in),
                                       residual_out=e(1, H), normed_out=e(1, H), launch=per_block)
            lin4.gemv_int4_triton(e(1, k_out), gdn.out_proj, e(1, H),
                                  launch=lin4.gemv_int4_config(1, H, k_out, INT4_GROUP_SIZE,
                                                               profile=current_profile(), rows=False))


def run_prefill_step(preset: str, tokens: int, dtype) -> None:
    """One chunk of `tokens` tokens through the prefill step of ``preset`` on meta tensors."""
    import torch

    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.weights import empty_weights

    cfg = ModelConfig.preset(preset)
    dev = torch.device("meta")
    dec = Decoder(cfg, empty_weights(cfg, dev, dtype), max_batch=1, max_seq=max(tokens, 16), backend="triton")
    step = dec.prefill_step(tokens)
    step.forward(torch.zeros(tokens, dtype=torch.int64, device=dev), torch.zeros(3, dtype=torch.int64, device=dev))


def record_prefill(profile, preset: str = "35b-a3b", chunks=(16, 4096), dtype=None) -> list[Launch]:
    """The launches of the prefill step at these chunk sizes under ``profile``."""
    import torch

    from model.ops.hardware import use_profile
    dtype = torch.bfloat16 if dtype is None else dtype
    with use_profile(profile), recording(PREFILL_MODULES) as log:
        for t in chunks:
            run_prefill_step(preset, t, dtype)
    return log


def record(profile, preset: str = "35b-a3b", batches=(1, 8), dtype=None, quants=("bf16", "int4")) -> list[Launch]:
    """The launches of the decode step (and the extra ops) under ``profile``, with bf16 and with
    int4 weights (``quants``)."""
    import torch

    from model.ops.hardware import use_profile
    dtype = torch.bfloat16 if dtype is None else dtype
    with use_profile(profile), recording() as log:
        for b in batches:
            for q in quants:
                run_decode_step(preset, b, dtype, int4=q == "int4")
    return log


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def problems(launch: Launch, profile, *, pdl_enabled: bool = True) -> list[str]:
    """The rules a launch breaks on a device of ``profile`` (empty: valid)."""
    out = []
    g = launch.grid
    if not 1 <= len(g) <= 3 or any(not isinstance(v, int) or v < 1 for v in g):
        out.append(f"grid {g}: 1-3 positive ints")
    elif g[0] > 2**31 - 1 or any(v > 65535 for v in g[1:]):
        out.append(f"grid {g} exceeds the CUDA limits (2^31-1, 65535, 65535)")
    warps = launch.options.get("num_warps", 4)
    if warps not in _WARPS:
        out.append(f"num_warps={warps}")
    stages = launch.options.get("num_stages", 3)
    if not isinstance(stages, int) or stages < 1:
        out.append(f"num_stages={stages}")
    for k, v in launch.constexprs.items():
        if k.startswith("BLOCK") and not (isinstance(v, int) and _pow2(v)):
            out.append(f"{k}={v} is not a power of two")
    want = pdl_enabled and profile.supports_pdl and launch.pdl_allowed
    if launch.constexprs.get("USE_GDC") is not want or bool(launch.options.get("launch_pdl")) != want:
        out.append(f"PDL: USE_GDC={launch.constexprs.get('USE_GDC')} launch_pdl="
                   f"{launch.options.get('launch_pdl')} on a device {'with' if profile.supports_pdl else 'without'} it")
    if launch.compiled is not None and launch.compiled["shared"] > profile.smem_per_block:
        out.append(f"shared memory {launch.compiled['shared']} B > {profile.smem_per_block} B per block")
    return out


_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64",
          "int8": "i8", "uint8": "u8", "bool": "i1"}


def _sig(v) -> str:
    if hasattr(v, "dtype") and hasattr(v, "shape"):
        return "*" + _TYPES[str(v.dtype).replace("torch.", "")]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {v!r}")


def compile_launch(launch: Launch, profile) -> dict:
    """Compile ``launch`` for ``profile``'s architecture (no GPU needed; needs TRITON_INTERPRET
    unset when the kernels were defined). Returns shared memory and register counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {k: ("constexpr" if k in launch.constexprs else _sig(launch.args[k]))
           for k in inspect.signature(launch.jit.fn).parameters}
    src = triton.compiler.ASTSource(fn=launch.jit, signature=sig, constexprs=dict(launch.constexprs))
    cc = profile.capability[0] * 10 + profile.capability[1]
    opts = {k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages")}
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    md = kernel.metadata
    launch.compiled = {"shared": int(md.shared), "registers": int(getattr(kernel, "n_regs", 0) or 0)}
    return launch.compiled


def unique(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct (kernel, constexprs, options) (compiling each once)."""
    seen, out = set(), []
    for L in launches:
        key = (L.kernel, tuple(sorted(L.constexprs.items())), tuple(sorted(L.options.items())),
               tuple(_sig(v) for v in L.args.values()))
        if key not in seen:
            seen.add(key)
            out.append(L)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h100", help="device preset: a100, l4, l40s, h100, h200")
    ap.add_argument("--preset", default="35b-a3b", help="model preset")
    ap.add_argument("--batch", default="1,8", help="batches, comma-separated")
    ap.add_argument("--compile", action="store_true", help="also compile each launch (offline)")
    ap.add_argument("--prefill", default=None, help="audit the prefill step at these chunk sizes (comma-separated)")
    ap.add_argument("--quant", choices=("all", "bf16", "int4"), default="all",
                    help="the decode step with bf16 weights, int4 ones (every linear and the lm_head), or both")
    ap.add_argument("--json", default=None, help="write the launches here")
    args = ap.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        ap.error(f"--batch needs comma-separated ints; got {args.batch!r}")
    if not batches or min(batches) < 1:
        ap.error(f"--batch needs positive ints; got {args.batch!r}")
    from model.ops.hardware import PRESETS
    if args.profile not in PRESETS:
        ap.error(f"--profile must be one of {sorted(PRESETS)}; got {args.profile!r}")
    from model.settings import SETTINGS
    if args.compile and SETTINGS.interpret:
        ap.error("--compile needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    profile = PRESETS[args.profile]
    if args.prefill is not None:
        try:
            chunks = tuple(int(t) for t in args.prefill.split(","))
        except ValueError:
            chunks = ()
        if not chunks or min(chunks) < 1:
            ap.error(f"--prefill needs comma-separated positive ints; got {args.prefill!r}")
        launches = unique(record_prefill(profile, args.preset, chunks))
        expected = prefill_kernel_names()
    else:
        quants = ("bf16", "int4") if args.quant == "all" else (args.quant,)
        launches = unique(record(profile, args.preset, batches, quants=quants))
        expected = decode_kernel_names() if args.quant == "all" else set()
    bad = 0
    print(f"{profile.name}: sm_{profile.capability[0]}{profile.capability[1]}, {profile.sm_count} SMs, "
          f"{profile.smem_per_block} B shared per block, PDL {'yes' if profile.supports_pdl else 'no'}")
    for L in launches:
        if args.compile:
            compile_launch(L, profile)
        issues = problems(L, profile, pdl_enabled=SETTINGS.pdl)
        bad += bool(issues)
        blocks = {k: v for k, v in L.constexprs.items() if k.startswith("BLOCK")}
        extra = f" shared={L.compiled['shared']}" if L.compiled else ""
        print(f"{'BAD ' if issues else 'ok  '}{L.kernel:28s} grid={L.grid} {L.options} {blocks}{extra}"
              + ("".join(f"\n      {p}" for p in issues)))
    missing = expected - {L.kernel for L in launches}
    if missing:
        print(f"never launched: {sorted(missing)}")
        bad += 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"kernel": L.kernel, "grid": L.grid, "options": L.options,
                        "constexprs": L.constexprs, "compiled": L.compiled} for L in launches], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
