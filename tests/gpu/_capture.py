"""A torch CUDA graph of a step that must allocate nothing while captured (the ops' contract)."""
import torch


def _set_up_cublas(stream: torch.cuda.Stream) -> None:
    """cuBLAS sets up a workspace for each stream at its first GEMM there, an allocation a capture
    may not make; one small GEMM on the capture stream does it beforehand. Stateless: the step
    itself is not run again (many callers' steps advance caches or recurrent state)."""
    with torch.cuda.stream(stream):
        for dtype in (torch.bfloat16, torch.float32):
            a = torch.ones(16, 16, device="cuda", dtype=dtype)
            torch.mm(a, a.t())
    stream.synchronize()


def capture_without_allocation(step, what: str = "an op") -> torch.cuda.CUDAGraph:
    """Capture step() on a side stream into a torch.cuda.CUDAGraph and assert that nothing was
    allocated during the capture (counted inside it: capture_begin itself registers generator
    state tensors). The caller has run step() once eagerly (the JIT); cuBLAS is set up on the
    side stream here. Returns the graph; the caller replays it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    _set_up_cublas(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        step()
        after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert after == before, f"{what} allocated during capture"
    return graph
