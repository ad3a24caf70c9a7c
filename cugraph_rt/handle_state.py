"""GraphHandle's bookkeeping: its stats, and the resources it owns with their release order
(sync -> outputs -> exec -> graph -> buffers -> pools -> stream back to the pool)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .handle_io import HostOutputs, Staging
from .stream import Stream
from .stream_pool import give_back_stream

__all__ = ["HandleStats"]


@dataclass
class HandleStats:
    warmup_s: float = 0.0
    capture_s: float = 0.0
    instantiate_s: float = 0.0
    upload_s: float = 0.0
    warmups: int = 0
    replays: int = 0
    eager_calls: int = 0
    nodes: int = 0
    graph_mem_bytes: int = 0
    nodes_per_bucket: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class _Resources:
    """What the handle owns, released in order by close() or the finalizer. It never refers to
    the handle (or the finalizer would keep the handle alive)."""

    def __init__(self):
        self.stream: Stream | None = None
        self.pooled_stream = False    # borrowed from the stream pool: given back on release
        self.execs: dict = {}
        self.graphs: dict = {}
        self.plans: dict = {}         # bucket -> ReplayPlan
        self.pools: dict = {}         # framework name -> private pool shared by the buckets
        self.device = 0
        self.adapter = None
        self.statics: dict = {}       # bucket -> {name: StaticInput}
        self.outputs: dict = {}       # bucket -> static outputs
        self.staging = Staging()
        self.host_outputs = HostOutputs()
        self.events: list = []

    def drop_graphs(self) -> None:
        self.plans.clear()
        self.outputs.clear()    # first: see release()
        for ex in self.execs.values():
            ex.close()
        self.execs.clear()
        for g in self.graphs.values():
            g.close()
        self.graphs.clear()
        # no graph uses the private pools now: drop them (a failed capture keeps no memory; the
        # next capture makes new ones)
        self.pools.clear()

    def release(self) -> None:
        steps = [
            lambda: self.stream is not None and self.stream.synchronize(),
            self.plans.clear,
            # the outputs first, so their blocks are back in the private pools when the last graph
            # gives a pool back (CuPy's pool then frees only the blocks that are free). A CuPy
            # handle that dropped them last kept ~128 KiB a cycle on an H200, a bare capture that
            # drops them first keeps nothing (docs/reliability.md)
            self.outputs.clear,
            lambda: [ex.close() for ex in self.execs.values()],
            # each graph gives its use of the pools back when closed (capture.py)
            lambda: [g.close() for g in self.graphs.values()],
            self._release_buffers,
            # the last references to the private pools: torch's MemPool frees its cached memory
            # (that pool's only) when dropped
            self.pools.clear,
            lambda: self.pooled_stream and give_back_stream(self.stream),
        ]
        for step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - release everything we can
                pass
        self.execs.clear()
        self.graphs.clear()

    def _release_buffers(self) -> None:
        for per_bucket in self.statics.values():
            for st in per_bucket.values():
                st.close()
        self.statics.clear()
        self.staging.close()
        self.host_outputs.close()
        for ev in self.events:
            ev.close()
