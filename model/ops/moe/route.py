"""The router top-k fused into the GEMV that computes the router logits.

At decode the MoE block's first projection is one norm+GEMV over the router rows, the shared
expert's gate/up rows and its gate (decoder.py), then router_topk runs as its own kernel: 40
launches a step, each waiting on the GEMV's completion and holding up the experts. With
norm_gemv(..., route=Route(...)) the GEMV's programs that store router rows arrive at a counter
when done, and the last of them computes the top-k (moe/decode.py's _topk_row) while the programs
of the shared expert's rows are still streaming. Where the GEMV cannot take it (the tensor-core
path at batch >= 2, the per-block int4 kernel, MODEL_FUSED_ROUTER=0, no counter), router_topk runs
after it, as before: either way norm_gemv(route=...) leaves the same weights and ids.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...settings import SETTINGS
from .._util import next_pow2
from .decode import _check_router, _topk_row, router_topk_reference, router_topk_triton


class Route(NamedTuple):
    """router_topk(out[:, :num_experts], top_k, weights_out, ids_out, local_experts=...) as part of
    a norm_gemv; `counter` (route_counter: one zeroed int32) lets the Triton GEMV fuse it."""
    num_experts: int
    top_k: int
    weights_out: torch.Tensor
    ids_out: torch.Tensor
    local_experts: tuple | None = None
    counter: torch.Tensor | None = None


def route_counter(device) -> torch.Tensor:
    """The fused router's arrival counter: zero between calls (the last arrival resets it)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def check_route(route: Route, out: torch.Tensor) -> torch.Tensor:
    """The router's checks on out's first num_experts columns (returned: the logits)."""
    if not isinstance(route, Route):
        raise TypeError(f"route must be a Route, got {type(route).__name__}")
    e = route.num_experts
    if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= out.shape[1]:
        raise ValueError(f"route.num_experts must be in [1, {out.shape[1]}] (the GEMV's rows), got {e!r}")
    logits = out[:, :e]
    _check_router(logits, route.top_k, route.weights_out, route.ids_out, route.local_experts)
    c = route.counter
    if c is not None and (not isinstance(c, torch.Tensor) or c.dtype != torch.int32 or c.numel() < 1
                          or c.device != out.device):
        raise ValueError(f"route.counter must be a zeroed int32 tensor on {out.device} (route_counter), got "
                         f"{getattr(c, 'dtype', type(c).__name__)} {getattr(c, 'numel', lambda: '')()} "
                         f"on {getattr(c, 'device', '?')}")
    return logits


def fusable(route: Route | None) -> bool:
    """Whether a GEMV kernel may take the route: a counter given and MODEL_FUSED_ROUTER on."""
    return route is not None and route.counter is not None and SETTINGS.fused_router


def route_kernel_args(route: Route | None, out: torch.Tensor, block_n: int, grid: int) -> dict:
    """The keyword arguments of a GEMV kernel's router epilogue (ROUTE=False and stand-ins without
    one), for a kernel of `grid` programs storing `block_n` rows a block (router_programs)."""
    if route is None:
        return dict(rw_ptr=out, rid_ptr=out, cnt_ptr=out, ROUTER_PROGRAMS=0, R_E=0, R_TOPK=0, R_START=0, R_LOCAL=0,
                    ROUTE=False, R_BLOCK_E=1, R_BLOCK_K=1, R_LOCAL_ON=False)
    start, count = route.local_experts if route.local_experts is not None else (0, route.num_experts)
    return dict(rw_ptr=route.weights_out, rid_ptr=route.ids_out, cnt_ptr=route.counter,
                ROUTER_PROGRAMS=router_programs(route.num_experts, block_n, grid), R_E=route.num_experts, R_TOPK=route.top_k, R_START=start,
                R_LOCAL=count, ROUTE=True, R_BLOCK_E=next_pow2(route.num_experts), R_BLOCK_K=next_pow2(route.top_k),
                R_LOCAL_ON=route.local_experts is not None)


def route_reference(route: Route, out: torch.Tensor) -> None:
    """The route's top-k, after the GEMV, by the reference op."""
    router_topk_reference(out[:, :route.num_experts], route.top_k, route.weights_out, route.ids_out,
                          local_experts=route.local_experts)


def route_triton(route: Route, logits: torch.Tensor) -> None:
    """The route's top-k as a kernel of its own (where the GEMV did not take it)."""
    router_topk_triton(logits, route.top_k, route.weights_out, route.ids_out, local_experts=route.local_experts)


def router_programs(num_experts: int, block_n: int, grid: int) -> int:
    """The programs of a GEMV whose program p stores rows p*block_n.. (or, striding, blocks p,
    p + grid, ...) that store some of the first num_experts rows."""
    return min(triton.cdiv(num_experts, block_n), grid)


@triton.jit
def route_after_gemv(logits_ptr, w_ptr, ids_ptr, cnt_ptr, ROUTER_PROGRAMS, B, E, TOPK, stride_l, E_START,
                     E_LOCAL, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, LOCAL: tl.constexpr):
    """The epilogue of a GEMV whose first E rows are the router logits (logits_ptr = its out): each
    of the ROUTER_PROGRAMS programs that stored some of them calls this after its stores; the last
    to arrive (it sees count = ROUTER_PROGRAMS - 1, every other program's stores released
    before) routes every row and resets the counter for the next call or graph replay. The split
    gated-delta norm (gated_delta/step.py) publishes its slices the same way."""
    tl.debug_barrier()   # every thread's stores before the (one-thread) release below
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if arrived == ROUTER_PROGRAMS - 1:
        tl.debug_barrier()
        for row in range(0, B):
            _topk_row(logits_ptr, w_ptr, ids_ptr, row, E, TOPK, stride_l, E_START, E_LOCAL, BLOCK_E, BLOCK_K,
                      LOCAL, True)
        tl.atomic_xchg(cnt_ptr, 0)
