"""cugraph_rt: a CUDA-runtime-level CUDA graph manager for Python, built on cuda-python.

The core (errors, streams, memory, capture, graphs) imports no framework. Every framework touch is
behind one adapter interface (``cugraph_rt.framework``): torch in ``cugraph_rt.torch_interop``,
CuPy in ``cugraph_rt.cupy_interop``, each imported only when its arrays or streams are used.
"""
from .buckets import normalize_buckets, pick_bucket
from .capture import capture
from .conditional import (ConditionalHandle, conditional_handle, conditional_node, if_then,
                          set_condition, while_loop)
from .conditional_records import ConditionalRecord, node_tree
from .device import device_attributes, device_info, is_available, mem_get_info
from .errors import (CaptureError, ClosedError, CudaError, CudaUnavailableError, CugraphRtError,
                     InputError, InputTypeError, check)
from .graph import Graph, GraphExec, graph_memory
from .framework import Adapter, get_adapter
from .handle import GraphHandle, HandleStats
from .memory import DeviceBuffer, HostBuffer, copy_async, live_allocations, memset_async
from .nodes import NodeRecord
from .replay import ReplayPlan
from .stream import Event, Stream
from .stream_pool import idle_streams
from .validation import InputSpec

__version__ = "0.1.0"

__all__ = [
    "check", "CudaError", "CudaUnavailableError", "CaptureError", "ClosedError",
    "CugraphRtError", "InputError", "InputTypeError", "is_available", "device_info", "device_attributes", "mem_get_info", "Stream", "Event",
    "DeviceBuffer", "HostBuffer", "copy_async", "live_allocations", "memset_async", "capture", "Graph", "GraphExec",
    "graph_memory", "NodeRecord", "GraphHandle", "HandleStats", "InputSpec",
    "normalize_buckets", "pick_bucket", "ReplayPlan", "idle_streams", "Adapter", "get_adapter",
    "ConditionalHandle", "conditional_handle", "conditional_node", "if_then", "set_condition",
    "while_loop", "ConditionalRecord", "node_tree",
]
