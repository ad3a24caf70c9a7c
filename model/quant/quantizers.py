"""Quantizers for the int4 format (format.py): round-to-nearest and an HQQ-style zero optimizer.

Both work group by group on a float weight [..., N, K] and return a QuantizedLinear whose codes
are chosen against the *stored* (rounded to the scale dtype) scale and zero, so what is written is
exactly what the codes were fitted to.

RTN: s = (max - min) / 15 and z = -min / s per group (a float zero: min and max land on codes 0
and 15). A constant group c is stored exactly: s = |c| (1 when c = 0), z = 0 for c >= 0 and 1 for
c < 0, so its one code gives (q - z) * s = c.

HQQ (half-quadratic quantization, Badri & Shaji 2023): the scale stays at RTN's, and the zero is
fitted to a sparsity-promoting l_p error (p < 1) by half-quadratic splitting: an auxiliary error
e is split off, and the solver alternates
    e <- shrink_p(w/s - (q - z), beta)         (generalised soft threshold, closed form)
    z <- mean_group(q - w/s + e)                (closed form)
    q <- clamp(round(w/s + z), 0, 15),  beta <- kappa * beta.
Ours works in code units (errors divided by s), so the thresholds do not depend on the weight's
magnitude, and keeps, per group, the zero with the smallest squared reconstruction error seen
(RTN's included): HQQ is never worse than RTN in the L2 sense, group by group.
"""
from __future__ import annotations

import torch

from .format import QMAX, SCALE_DTYPES, QuantizedLinear, check_groupable, pack_int4

METHODS = ("hqq", "rtn")


def _check_weight(w, name, scale_dtype):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor weight, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating weight, got {w.dtype}")
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"{name}: scale_dtype must be one of {[str(d) for d in SCALE_DTYPES]}, got {scale_dtype!r}")
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: the weight has non-finite values; cannot quantize it")


def _store(x, dtype):
    """x rounded to the storage dtype, back in fp32 (what a reader of the checkpoint will see)."""
    return x.to(dtype).to(torch.float32)


def _codes(wg, s, z):
    return torch.clamp(torch.round(wg / s + z), 0, QMAX)


def _rtn_params(wg, scale_dtype):
    """Stored (fp32) scale and zero per group of wg [..., groups, G]."""
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    const = mx == mn
    s = torch.where(const, torch.where(mn == 0, torch.ones_like(mn), mn.abs()), (mx - mn) / QMAX)
    # a range too small for the scale dtype: the smallest normal step (coarser, still in range)
    s = _store(torch.clamp(s, min=torch.finfo(scale_dtype).tiny), scale_dtype)
    z = torch.where(const, (mn < 0).to(torch.float32), -mn / s)
    return s, _store(z, scale_dtype)


def _shrink(x, beta, p):
    """Generalised soft threshold: argmin_e |e|^p + beta/2 (e - x)^2, the closed form HQQ uses."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-8).pow(p - 1) / beta)


def _sq_err(wg, s, z):
    return ((wg - (_codes(wg, s, z) - z) * s) ** 2).sum(-1, keepdim=True)


def _hqq_zero(wg, s, z, scale_dtype, iters, p, beta, kappa):
    ws = wg / s
    best_z, best_err = z, _sq_err(wg, s, z)
    zf = z
    for _ in range(iters):
        q = _codes(wg, s, zf)
        e = _shrink(ws - (q - zf), beta, p)
        zf = (q - ws + e).mean(-1, keepdim=True)
        beta *= kappa
        zs = _store(zf, scale_dtype)
        err = _sq_err(wg, s, zs)
        better = err < best_err
        best_z = torch.where(better, zs, best_z)
        best_err = torch.where(better, err, best_err)
    return best_z


@torch.no_grad()
def quantize(w: torch.Tensor, group_size: int = 128, method: str = "hqq", *, scale_dtype=None,
             name: str = "weight", iters: int = 20, p: float = 0.7, beta: float = 10.0,
             kappa: float = 1.01) -> QuantizedLinear:
    """Quantize a float weight [..., N, K] to int4 with one scale and zero per `group_size` columns.

    method "rtn" (min/max) or "hqq" (RTN's scale, the zero refined as in the module doc; iters, p,
    beta, kappa are its solver settings). scale_dtype: the dtype of scales and zeros (default: the
    weight's dtype, fp32 weights included). Runs on the weight's device in fp32."""
    if method not in METHODS:
        raise ValueError(f"{name}: unknown quantization method {method!r}; use one of {list(METHODS)}")
    scale_dtype = scale_dtype or w.dtype
    _check_weight(w, name, scale_dtype)
    check_groupable(tuple(w.shape), group_size, name)
    if not (isinstance(iters, int) and iters >= 0 and 0 < p < 1 and beta > 0 and kappa >= 1):
        raise ValueError(f"{name}: HQQ settings out of range: iters={iters!r} (int >= 0), p={p} (0 < p < 1), "
                         f"beta={beta} (> 0), kappa={kappa} (>= 1)")
    shape = tuple(w.shape)
    wg = w.to(torch.float32).unflatten(-1, (-1, group_size))       # [..., N, groups, G]
    s, z = _rtn_params(wg, scale_dtype)
    if method == "hqq":
        z = _hqq_zero(wg, s, z, scale_dtype, iters, p, beta, kappa)
    q = _codes(wg, s, z).to(torch.uint8).flatten(-2)
    return QuantizedLinear(pack_int4(q), s.squeeze(-1).to(scale_dtype), z.squeeze(-1).to(scale_dtype),
                           group_size, shape, name)


def relative_error(w: torch.Tensor, qw: QuantizedLinear) -> float:
    """||w - dequant(qw)|| / ||w|| in fp32 (dequantized without rounding to the model dtype)."""
    d = qw.dequantize(torch.float32)
    return float(torch.linalg.vector_norm(w.float() - d) / torch.linalg.vector_norm(w.float()).clamp_min(1e-30))
