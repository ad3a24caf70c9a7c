"""The replay path's two small objects: ``CallerOrder`` (run after the work the caller already
queued on its framework's current stream, and let that stream consume the outputs) and
``ReplayPlan`` (everything one replay of one captured graph needs, fixed at capture). Every
launch site reads them: GraphHandle's fast path (inline, for its host cost), its bucketed
replays and first launch, and tools (``GraphHandle.replay_plan()``)."""
from __future__ import annotations

from cuda.bindings import runtime as _rt

from .errors import ClosedError, check

__all__ = ["CallerOrder", "ReplayPlan"]

_launch = _rt.cudaGraphLaunch
_record = _rt.cudaEventRecord
_wait = _rt.cudaStreamWaitEvent


class CallerOrder:
    """Orders the handle's stream after the caller's current stream (the framework's current
    stream on the handle's device), and that stream after the handle's outputs."""

    __slots__ = ("stream_handle", "stream_raw", "device", "caller_stream", "ev_in", "ev_out")

    def __init__(self, stream, caller_stream, ev_in: int, ev_out: int):
        self.stream_handle = stream.handle
        self.stream_raw = stream._raw         # a cudaStream_t: cheaper to pass than an int
        self.device = stream.device
        self.caller_stream = caller_stream    # device -> handle of the framework's current stream
        self.ev_in = ev_in                    # raw event handles (the handle owns the Events)
        self.ev_out = ev_out

    def begin(self) -> int:
        """Make the handle's stream wait for work queued on the caller's stream; returns the
        caller's stream handle (for end())."""
        caller = self.caller_stream(self.device)
        if caller != self.stream_handle:
            check(_record(self.ev_in, caller), "cudaEventRecord")
            check(_wait(self.stream_raw, self.ev_in, 0), "cudaStreamWaitEvent")
        return caller

    def end(self, caller: int) -> None:
        """Make the caller's stream wait for what the handle queued since begin()."""
        if caller != self.stream_handle:
            check(_record(self.ev_out, self.stream_raw), "cudaEventRecord")
            check(_wait(caller, self.ev_out, 0), "cudaStreamWaitEvent")


class ReplayPlan:
    """One captured graph, ready to replay: ``graph_exec`` (the GraphExec) and ``exec_raw`` (its
    cudaGraphExec_t), ``order`` (a CallerOrder: the stream, and ordering after the caller's),
    ``slots`` (name, shape, dtype, device, static address, bytes per input), ``device_copies``
    (the adapter's check of a call's inputs: their (dst, src, nbytes) copies, or None for
    anything the general path must see) and ``outputs`` (the static outputs).

    ``launch()`` launches the graph once on the handle's stream with the static inputs as they
    are (no copies, no ordering): the graph's own host cost, for tools and benchmarks."""

    __slots__ = ("bucket", "graph_exec", "exec_raw", "order", "slots", "device_copies",
                 "outputs", "n_inputs")

    def __init__(self, bucket, graph_exec, order: CallerOrder, slots, device_copies, outputs):
        self.bucket = bucket
        self.graph_exec = graph_exec
        self.exec_raw = graph_exec._box[0]
        self.order = order
        self.slots = tuple(slots)
        self.n_inputs = len(self.slots)
        self.device_copies = device_copies
        self.outputs = outputs

    def launch(self) -> None:
        exec_raw = self.graph_exec._box[0]
        if exec_raw is None:
            raise ClosedError("ReplayPlan: its graph is closed (the handle was closed)")
        err = _launch(exec_raw, self.order.stream_raw)[0]
        if err:
            check((err,), "cudaGraphLaunch")

    def __repr__(self) -> str:
        return (f"<ReplayPlan bucket={self.bucket} inputs={[s[0] for s in self.slots]} "
                f"stream=0x{self.order.stream_handle:x}>")
