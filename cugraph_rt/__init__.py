"""cugraph_rt: a CUDA-runtime-level CUDA graph manager for Python, built on cuda-python.

The core (errors, streams, memory, capture, graphs) imports no framework; torch interop lives in
``cugraph_rt.torch_interop`` and is imported only when torch tensors or streams are used.
"""
from .buckets import normalize_buckets, pick_bucket
from .capture import capture
from .device import device_info, is_available, mem_get_info
from .errors import (CaptureError, ClosedError, CudaError, CudaUnavailableError, CugraphRtError,
                     InputError, InputTypeError, check)
from .graph import Graph, GraphExec, graph_memory
from .handle import GraphHandle, HandleStats
from .memory import DeviceBuffer, HostBuffer, copy_async, live_allocations, memset_async
from .nodes import NodeRecord
from .stream import Event, Stream
from .validation import InputSpec

__version__ = "0.1.0"

__all__ = [
    "check", "CudaError", "CudaUnavailableError", "CaptureError", "ClosedError",
    "CugraphRtError", "InputError", "InputTypeError", "is_available", "device_info", "mem_get_info", "Stream", "Event",
    "DeviceBuffer", "HostBuffer", "copy_async", "live_allocations", "memset_async", "capture", "Graph", "GraphExec",
    "graph_memory", "NodeRecord", "GraphHandle", "HandleStats", "InputSpec",
    "normalize_buckets", "pick_bucket",
]
