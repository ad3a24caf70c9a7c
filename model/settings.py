"""Process settings, read once from the environment when the model package is first imported
(the README lists them). Code reads ``SETTINGS``, never ``os.environ``, so a setting means the
same everywhere for the life of the process.

TRITON_INTERPRET  1 / true / on / yes: Triton kernels run on CPU tensors under Triton's
                  interpreter (the CPU tests set it); launch configurations then skip the
                  fill-the-GPU shrinking and PDL is off. Triton reads the same variable.
MODEL_PDL         1 (default) / 0: programmatic dependent launch for the decode kernels on
                  sm_90+ GPUs; 0 turns it off (e.g. for exclusive per-kernel times in a trace).
MODEL_PREFILL_PDL 0 (default) / 1: PDL for the kernels of a prefill step too. Off by default:
                  prefill kernels run many waves, and the next kernel's programs, scheduled early
                  by PDL, hold SM slots that the running kernel's later waves need
                  (docs/benchmarks.md has the measurement).
MODEL_INT4_ROWS   1 (default) / 0: the batch-1 int4 GEMVs (K <= 4096) run the whole-row kernel
                  (blocks of rows over a fixed number of programs, the next block's words
                  loaded while the current one is dequantized); 0 gives the per-block kernel
                  (int4 decode at batch 1 on an H100: 2.473 ms with it, 2.761 ms without).
MODEL_INT4_MOE_ROWS 0 (default) / 1: the batch-1 int4 expert kernels (gate/up and down) run
                  over blocks of whole rows as well (model/ops/moe/int4_rows.py); off: slower on
                  an H100 (int4 decode at batch 1 2.830 against 2.471 ms).
MODEL_FUSED_ROUTER 0 (default) / 1: the router top-k runs in the epilogue of the batch-1 router
                  GEMV (model/ops/moe/route.py) instead of as a kernel of its own; off: slower on
                  an H100 (int4 decode at batch 1 2.658 against 2.471 ms).
MODEL_FUSED_CONV  0 (default) / 1: the GDN decode step's conv1d runs inside the gated-delta kernel
                  (model/ops/gated_delta/step.py ConvIn) instead of as a kernel of its own; off:
                  no gain on an H100 (int4 decode at batch 1 2.469 against 2.471 ms).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

__all__ = ["Settings", "SETTINGS", "overridden", "parse_variant"]

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no", "")


def _flag(env, name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of {_TRUE + _FALSE[:-1]}")


@dataclass(frozen=True)
class Settings:
    interpret: bool = False    # TRITON_INTERPRET
    pdl: bool = True           # MODEL_PDL
    prefill_pdl: bool = False  # MODEL_PREFILL_PDL
    int4_rows: bool = True     # MODEL_INT4_ROWS
    int4_moe_rows: bool = False  # MODEL_INT4_MOE_ROWS
    fused_router: bool = False   # MODEL_FUSED_ROUTER
    fused_conv: bool = False     # MODEL_FUSED_CONV

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        return cls(interpret=_flag(env, "TRITON_INTERPRET", False), pdl=_flag(env, "MODEL_PDL", True),
                   prefill_pdl=_flag(env, "MODEL_PREFILL_PDL", False), int4_rows=_flag(env, "MODEL_INT4_ROWS", True),
                   int4_moe_rows=_flag(env, "MODEL_INT4_MOE_ROWS", False),
                   fused_router=_flag(env, "MODEL_FUSED_ROUTER", False),
                   fused_conv=_flag(env, "MODEL_FUSED_CONV", False))


SETTINGS = Settings.from_env()


def _overridable() -> set:
    """Every setting but interpret (Triton reads that one itself, at import)."""
    return {f.name for f in dataclasses.fields(Settings)} - {"interpret"}


@contextlib.contextmanager
def overridden(**changes: bool):
    """Within the block, SETTINGS (the one object every module reads) holds `changes`; restored on
    exit, also after an exception. For benchmarks that compare settings in one process (same GPU,
    same weights, same clocks): a graph captured inside keeps the kernels it captured. Unknown
    names or non-bool values raise ValueError naming them, and nothing is changed."""
    fields = _overridable()
    bad = sorted(set(changes) - fields)
    if bad:
        raise ValueError(f"unknown setting(s) {bad}; known: {sorted(fields)}")
    wrong = {k: v for k, v in changes.items() if not isinstance(v, bool)}
    if wrong:
        raise ValueError(f"settings must be bool, got {wrong}")
    saved = {k: getattr(SETTINGS, k) for k in changes}
    try:
        for k, v in changes.items():
            object.__setattr__(SETTINGS, k, v)
        yield SETTINGS
    finally:
        for k, v in saved.items():
            object.__setattr__(SETTINGS, k, v)


def parse_variant(text: str) -> dict:
    """'default' -> {}; 'fused_router+int4_moe_rows=0' -> {'fused_router': True, 'int4_moe_rows':
    False} (a bare name means on). ValueError naming the bad part."""
    text = text.strip()
    if text == "default":
        return {}
    fields = _overridable()
    out = {}
    for part in text.split("+"):
        name, eq, raw = part.strip().partition("=")
        if name not in fields:
            raise ValueError(f"variant {text!r}: unknown setting {name!r}; known: {sorted(fields)}")
        value = raw.strip().lower() if eq else "1"
        if value not in _TRUE + _FALSE[:-1]:
            raise ValueError(f"variant {text!r}: {part!r} needs a value in {_TRUE + _FALSE[:-1]}")
        out[name] = value in _TRUE
    return out
