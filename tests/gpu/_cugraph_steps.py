"""Step functions shared by the cugraph_rt GPU tests: torch ops plus a Triton kernel."""
import torch
import triton
import triton.language as tl


@triton.jit
def _sin_axpy_kernel(x_ptr, y_ptr, out_ptr, n, a, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, tl.sin(x) * a + y * y, mask=mask)


def sin_axpy(x, y, a=0.5, out=None):
    out = torch.empty_like(x) if out is None else out
    n = x.numel()
    _sin_axpy_kernel[(triton.cdiv(n, 256),)](x, y, out, n, a, BLOCK=256)
    return out


def make_async_step(tmp):
    """A torch + Triton step for the cudaMallocAsync backend. Triton refuses pointers to graph
    memory that a capture allocated (its launcher's cuPointerGetAttribute check fails on them:
    "Pointer argument cannot be accessed from Triton"), so the Triton kernel works on memory
    allocated before the capture (``tmp``, the static inputs) and the torch ops allocate."""

    def step(x, w):
        sin_axpy(x, x, out=tmp)
        h = torch.tanh(tmp @ w) + 1.0   # allocations: graph MemAlloc nodes
        return h, h.sum(dim=-1)

    return step


def mixed_step(x, w):
    """torch matmul + elementwise, a Triton kernel, a reduction: returns (out, rowsum)."""
    h = torch.tanh(x @ w) + 1.0
    out = sin_axpy(h, x)
    return out, out.sum(dim=-1)


def elementwise_step(x):
    """No library workspaces (no cuBLAS): torch elementwise + Triton."""
    h = torch.cos(x) * 3.0 - x
    return sin_axpy(h, x)


def rowwise_step(x):
    """Row-independent (padding rows cannot change real rows): torch + Triton."""
    h = torch.exp(-x * x) + x
    return {"y": sin_axpy(h, x), "norm": (h * h).sum(dim=-1)}
