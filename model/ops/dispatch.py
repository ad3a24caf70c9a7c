"""The ops that read a weight, for both backends, choosing the kernel by the weight's type: a
QuantizedLinear goes to the int4 op (model/ops/linear/int4.py, model/ops/moe/int4.py), a tensor
to the bf16 one. The backends export these under the contract's names (`gemv`, `norm_gemv`,
`moe_experts`), so the decoder calls one name whatever its weights hold. The choice is a Python
isinstance on the host: no device work, nothing that a graph capture would notice.

moe_experts takes the int4 op when any of its three weights is int4; that op then refuses a
plain tensor among them (TypeError naming it), so a half-quantized MoE never runs silently.
"""
from __future__ import annotations

from ..quant.format import QuantizedLinear
from .linear import gemv as _dense
from .linear import int4 as _lin4
from .moe import decode as _moe
from .moe import int4 as _moe4


def _int4(*weights) -> bool:
    return any(isinstance(w, QuantizedLinear) for w in weights)


def gemv_triton(x, w, out, **kw) -> None:
    """gemv_int4_triton for a QuantizedLinear `w`, else gemv_triton (same contract)."""
    (_lin4.gemv_int4_triton if _int4(w) else _dense.gemv_triton)(x, w, out, **kw)


def gemv_reference(x, w, out) -> None:
    """gemv_int4_reference for a QuantizedLinear `w`, else gemv_reference."""
    (_lin4.gemv_int4_reference if _int4(w) else _dense.gemv_reference)(x, w, out)


def norm_gemv_triton(x, residual, norm_weight, eps, w, out, **kw) -> None:
    """norm_gemv_int4_triton for a QuantizedLinear `w`, else norm_gemv_triton."""
    fn = _lin4.norm_gemv_int4_triton if _int4(w) else _dense.norm_gemv_triton
    fn(x, residual, norm_weight, eps, w, out, **kw)


def norm_gemv_reference(x, residual, norm_weight, eps, w, out, **kw) -> None:
    """norm_gemv_int4_reference for a QuantizedLinear `w`, else norm_gemv_reference."""
    fn = _lin4.norm_gemv_int4_reference if _int4(w) else _dense.norm_gemv_reference
    fn(x, residual, norm_weight, eps, w, out, **kw)


def moe_experts_triton(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                       shared_gate_logit, act_ws, out, **kw) -> None:
    """moe_experts_int4_triton when a weight is a QuantizedLinear, else moe_experts_triton."""
    fn = _moe4.moe_experts_int4_triton if _int4(gate_up_proj, down_proj, shared_down) else _moe.moe_experts_triton
    fn(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit, act_ws, out, **kw)


def moe_experts_reference(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                          shared_gate_logit, act_ws, out) -> None:
    """moe_experts_int4_reference when a weight is a QuantizedLinear, else moe_experts_reference."""
    fn = (_moe4.moe_experts_int4_reference if _int4(gate_up_proj, down_proj, shared_down)
          else _moe.moe_experts_reference)
    fn(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit, act_ws, out)
