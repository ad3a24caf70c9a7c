"""A torch CUDA graph of a step that must allocate nothing while captured (the ops' contract)."""
import torch


def capture_without_allocation(step, what: str = "an op") -> torch.cuda.CUDAGraph:
    """Capture step() on a side stream into a torch.cuda.CUDAGraph and assert that nothing was
    allocated during the capture (counted inside it: capture_begin itself registers generator
    state tensors). Returns the graph; the caller replays it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        step()
        after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert after == before, f"{what} allocated during capture"
    return graph
