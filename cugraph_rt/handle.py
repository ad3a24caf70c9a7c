"""GraphHandle: the three-phase handle around a step function.

WARMUP  the first ``warmup`` calls run the step eagerly on the handle's stream, on the static
        buffers (Triton JIT, autotuning, library workspaces happen here);
CAPTURE the next call captures the step (every bucket, largest first, one shared pool),
        instantiates with AutoFreeOnLaunch, uploads, and launches it once;
REPLAY  later calls copy inputs into the static buffers (cudaMemcpyAsync) and launch the graph.
EAGER   with ``capture=False`` every call copies its inputs into the static buffers and runs the
        step eagerly on the handle's stream: never captured (debugging, or a step that cannot be).
Outputs stay on the device (the same static arrays every replay) unless host copies are asked
for. A rejected call changes nothing. close(): sync -> outputs -> exec -> graph -> buffers -> pools
-> stream (a stream the handle borrowed goes back to the per-device pool: see stream_pool.py).

Every framework touch goes through an adapter (cugraph_rt.framework) picked from the example
inputs (torch tensors, CuPy/numpy arrays) or named by ``framework=``.
"""
from __future__ import annotations

import contextlib
import time
import weakref

from cuda.bindings import runtime as _rt

from ._args import check_bool, check_int
from ._lifetime import _safe
from .buckets import _pick, capture_order, normalize_buckets
from .capture import capture, check_capture_args
from .device import require_cuda
from .errors import ClosedError, check
from .framework import active_adapters, pick_adapter
from .graph import GraphExec, graph_memory
from .handle_io import StaticInput, copy_inputs, map_outputs
from .handle_state import HandleStats, _Resources
from .replay import CallerOrder, ReplayPlan
from .stream import Event, Stream, stream_handle
from .stream_pool import borrow_stream
from .validation import as_spec, validate_call

__all__ = ["GraphHandle", "HandleStats"]

_launch = _rt.cudaGraphLaunch
_memcpy = _rt.cudaMemcpyAsync
_record = _rt.cudaEventRecord
_wait = _rt.cudaStreamWaitEvent
_KIND = _rt.cudaMemcpyKind.cudaMemcpyDefault


def _is_key(key, mapping) -> bool:
    try:
        return key in mapping
    except TypeError:   # unhashable
        return False


class GraphHandle:
    """Capture ``fn(**static_inputs)`` once, replay it with new inputs. See the module doc."""

    def __init__(self, fn, inputs: dict, *, warmup: int = 2, stream=None,
                 allocator: str = "pool", buckets=None, bucket_dim: int = 0, bucketed=None,
                 upload: bool = True, host_outputs: bool = False,
                 capture_mode: str = "thread_local", slice_outputs: bool = True,
                 capture: bool = True, framework=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
            raise TypeError("inputs must be a dict of name -> array or spec")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (capture=False never captures); "
                             f"got {warmup!r}")
        check_capture_args(capture_mode, allocator, "capture_mode")
        for value, name in ((upload, "upload"), (host_outputs, "host_outputs"),
                            (slice_outputs, "slice_outputs"), (capture, "capture")):
            check_bool(value, name)
        if stream is not None:
            stream_handle(stream, "stream", capturable=True)
        bucket_dim = check_int(bucket_dim, "bucket_dim", minimum=0)
        adapter = pick_adapter(inputs, framework)
        self._specs = {name: as_spec(name, v, adapter) for name, v in inputs.items()}
        self._buckets = normalize_buckets(buckets)
        self._bucket_dim = bucket_dim
        self._bucketed = self._check_bucketed(bucketed)
        if self._buckets is not None:
            for name, spec in self._specs.items():
                if self._is_bucketed(name) and bucket_dim >= len(spec.shape):
                    raise ValueError(f"bucket_dim {bucket_dim} is out of range for input "
                                     f"{name!r} of shape {spec.shape}")
        self.fn, self.warmup = fn, warmup
        self.capture_enabled = capture
        self.allocator, self.capture_mode = allocator, capture_mode
        self.upload, self.host_outputs, self.slice_outputs = upload, host_outputs, slice_outputs
        self._adapter = adapter
        require_cuda()
        if allocator == "async" and adapter.allocator_backend() != "cudaMallocAsync":
            raise ValueError(f"allocator='async' needs {adapter.name}'s stream-ordered allocator "
                             "(torch: PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync; CuPy: "
                             "MemoryAsyncPool); a caching allocator cannot make graph memory "
                             "nodes: use allocator='pool'")
        res = self._res = _Resources()
        self._finalizer = weakref.finalize(self, _safe, res.release)  # deferred inside a capture
        res.adapter = adapter
        if stream is None:   # borrowed: libraries' per-stream caches are reused across handles
            res.stream, res.pooled_stream = borrow_stream(), True
        else:
            res.stream = stream if isinstance(stream, Stream) else Stream.wrap(stream_handle(stream))
        res.device = res.stream.device
        for b in (self._buckets or (None,)):
            res.statics[b] = {}
            for name, spec in self._specs.items():
                shape = list(spec.shape)
                if b is not None and self._is_bucketed(name):
                    shape[self._bucket_dim] = b
                res.statics[b][name] = StaticInput(tuple(shape), spec.dtype, adapter)
                res.statics[b][name].buffer.fill_zero(stream=res.stream)
        res.stream.synchronize()
        self._ev_in, self._ev_out = Event(timing=False), Event(timing=False)
        res.events += [self._ev_in, self._ev_out]
        self._order = CallerOrder(res.stream, adapter.caller_stream_fn(), self._ev_in.handle,
                                  self._ev_out.handle)
        self._calls = 0
        self._captured = False
        self._warm = {b: 0 for b in res.statics}
        self._last_bucket = None
        self._fast: ReplayPlan | None = None
        self.stats = HandleStats()

    def _check_bucketed(self, bucketed):
        """None (every input is padded along bucket_dim) or the names of the inputs that are;
        the others (per-call scalars, say) keep their shape in every bucket."""
        if bucketed is None:
            return None
        if isinstance(bucketed, str) or not hasattr(bucketed, "__iter__"):
            raise TypeError(f"bucketed must be an iterable of input names; got {bucketed!r}")
        try:
            names = frozenset(bucketed)
        except TypeError:
            raise TypeError(f"bucketed must be an iterable of input names; got {bucketed!r}") \
                from None
        unknown = sorted(str(n) for n in names - self._specs.keys())
        if unknown:
            raise ValueError(f"bucketed names inputs {unknown} that the handle does not have; "
                             f"inputs are {sorted(self._specs)}")
        if not names:
            raise ValueError("bucketed must name at least one input (pass None for all)")
        if self._buckets is None:
            raise ValueError("bucketed is only meaningful with buckets")
        return names

    def _is_bucketed(self, name) -> bool:
        return self._bucketed is None or name in self._bucketed

    # -- properties ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check_open(self):
        if self.closed:
            raise ClosedError("GraphHandle is closed (used after close())")

    @property
    def phase(self) -> str:
        """"warmup", "capture" (the next call captures), "replay", or "eager" (capture=False:
        every call runs the step eagerly on the static buffers)."""
        if not self.capture_enabled:
            return "eager"
        if self._captured:
            return "replay"
        return "warmup" if self._calls < self.warmup else "capture"

    @property
    def stream(self) -> Stream:
        self._check_open()
        return self._res.stream

    @property
    def graph(self):
        """The Graph of the bucket used last (the largest one before any replay)."""
        self._check_open()
        if not self._res.graphs:
            return None
        b = self._last_bucket if self._last_bucket in self._res.graphs else max(
            self._res.graphs, key=lambda k: -1 if k is None else k)
        return self._res.graphs[b]

    @property
    def graphs(self) -> dict:
        self._check_open()
        return dict(self._res.graphs)

    def static_inputs(self, bucket=None) -> dict:
        self._check_open()
        if not _is_key(bucket, self._res.statics):
            raise ValueError(f"bucket must be one of {list(self._res.statics)}; got {bucket!r}")
        return {k: v.tensor for k, v in self._res.statics[bucket].items()}

    @property
    def framework(self) -> str:
        """The name of the framework adapter the handle uses ("torch" or "cupy")."""
        return self._adapter.name

    def replay_plan(self, bucket=None) -> ReplayPlan:
        """The ReplayPlan of a captured bucket (None without buckets): what each replay uses.
        ``plan.launch()`` launches the graph alone (static inputs as they are), for tools."""
        self._check_open()
        if not self._captured:
            raise RuntimeError(f"no graph captured yet (phase {self.phase!r})")
        if not _is_key(bucket, self._res.plans):
            raise ValueError(f"bucket must be one of {list(self._res.plans)}; got {bucket!r}")
        return self._res.plans[bucket]

    # -- calling --------------------------------------------------------------------------
    def __call__(self, **inputs):
        # The replay fast path (captured, no buckets): the adapter checks each input cheaply and
        # gives its copy; anything unusual takes the general path, which validates and explains.
        # Kept inline (no further Python calls) for its host cost: see tools/bench_launch.py.
        plan = self._fast
        if plan is not None and len(inputs) == plan.n_inputs and self._finalizer.alive:
            copies = plan.device_copies(plan.slots, inputs)
            if copies is not None:
                order = plan.order
                stream = order.stream_raw
                caller = order.caller_stream(order.device)
                foreign = caller != order.stream_handle
                if foreign:   # after work already queued on the caller's current stream
                    err = _record(order.ev_in, caller)[0] or _wait(stream, order.ev_in, 0)[0]
                    if err:
                        check((err,), "cudaStreamWaitEvent")
                for dst, src, nbytes in copies:
                    err = _memcpy(dst, src, nbytes, _KIND, stream)[0]
                    if err:
                        check((err,), "cudaMemcpyAsync")
                err = _launch(plan.exec_raw, stream)[0]
                if err:
                    check((err,), "cudaGraphLaunch")
                self.stats.replays += 1
                self._calls += 1
                if foreign:   # let the caller's stream consume the outputs
                    err = _record(order.ev_out, stream)[0] or _wait(caller, order.ev_out, 0)[0]
                    if err:
                        check((err,), "cudaStreamWaitEvent")
                return self._host(plan.outputs) if self.host_outputs else plan.outputs
        return self._call(inputs)

    def _call(self, inputs):
        """The general path: validate, order after the caller, copy (padding to a bucket), then
        warm up, capture, replay, or run eagerly above the largest bucket."""
        self._check_open()
        res, ad = self._res, self._adapter
        n = validate_call(self._specs, inputs, device_index=res.device,
                          buckets=self._buckets, bucket_dim=self._bucket_dim,
                          bucketed=self._bucketed, adapter=ad)
        bucket = None if self._buckets is None else _pick(self._buckets, n)
        caller = self._order.begin()
        if self._buckets is not None and bucket is None:
            out = self._eager_direct(inputs)
        else:
            copy_inputs(res.statics[bucket], inputs, n=n, bucket_dim=self._bucket_dim,
                        stream=res.stream.handle, staging=res.staging, adapter=ad,
                        bucketed=self._bucketed)
            out = self._step(bucket)
            if n is not None and self.slice_outputs and n != bucket:
                d = self._bucket_dim
                out = map_outputs(out, lambda t: ad.narrow(t, d, n)
                                  if len(t.shape) > d and t.shape[d] == bucket else t, ad.is_array)
        self._calls += 1
        self._order.end(caller)
        return self._host(out) if self.host_outputs else out

    def _plan(self, bucket) -> ReplayPlan:
        res = self._res
        slots = [(name, st.shape, st.dtype, res.device, st.ptr, st.nbytes)
                 for name, st in res.statics[bucket].items()]
        return ReplayPlan(bucket, res.execs[bucket], self._order, slots,
                          self._adapter.device_copies, res.outputs[bucket])

    def _step(self, bucket):
        res = self._res
        self._last_bucket = bucket
        if self._captured:
            res.plans[bucket].launch()
            self.stats.replays += 1
            return res.outputs[bucket]
        if not self.capture_enabled:
            return self._run_eager(bucket, warmup=False)
        if self._calls < self.warmup:
            return self._run_eager(bucket)
        self._capture_all()
        res.plans[bucket].launch()
        self.refresh_stats()
        return res.outputs[bucket]

    @contextlib.contextmanager
    def _on_stream(self):
        """The handle's stream as the current stream of every framework in use (the handle's
        first): their kernels (and Triton's, which follows torch's) launch there."""
        with contextlib.ExitStack() as stack:
            for ad in active_adapters(self._adapter):
                stack.enter_context(ad.stream_context(self._res.stream))
            yield

    def _run_eager(self, bucket, warmup: bool = True):
        t0 = time.perf_counter()
        with self._on_stream():
            out = self.fn(**self.static_inputs(bucket))
        if not warmup:
            self.stats.eager_calls += 1
            self._last_bucket = bucket
            return out
        self._warm[bucket] += 1
        self.stats.warmups += 1
        self.stats.warmup_s += time.perf_counter() - t0
        return out

    def _eager_direct(self, inputs):
        res, ad = self._res, self._adapter
        with self._on_stream():
            moved = {k: ad.to_device(v, res.device) for k, v in inputs.items()}
            out = self.fn(**moved)
        self.stats.eager_calls += 1
        return out

    def _capture_all(self):
        """Capture every bucket (largest first, one pool per framework), instantiate, upload.
        All or nothing: on failure the handle stays in the capture phase and the stream stays
        usable."""
        res, stats = self._res, self.stats
        for b in res.statics:  # buckets no call reached yet get their warmup now
            while self.warmup and self._warm[b] < self.warmup:
                self._run_eager(b)
        order = capture_order(self._buckets) if self._buckets else [None]
        res.stream.synchronize()
        mem0 = self._mem_now()
        frameworks = active_adapters(self._adapter)
        try:
            for b in order:
                t0 = time.perf_counter()
                with self._on_stream():
                    with capture(res.stream, mode=self.capture_mode, allocator=self.allocator,
                                 pool=res.pools, framework=frameworks) as cap:
                        res.outputs[b] = self.fn(**self.static_inputs(b))
                t1 = time.perf_counter()
                res.graphs[b] = cap.graph
                res.execs[b] = GraphExec(cap.graph, auto_free_on_launch=True)
                t2 = time.perf_counter()
                if self.upload:
                    res.execs[b].upload(res.stream.handle)
                    res.stream.synchronize()
                t3 = time.perf_counter()
                res.plans[b] = self._plan(b)
                stats.capture_s += t1 - t0
                stats.instantiate_s += t2 - t1
                stats.upload_s += t3 - t2
                stats.nodes_per_bucket[b] = cap.graph.num_nodes
        except BaseException:
            res.drop_graphs()
            raise
        stats.nodes = sum(stats.nodes_per_bucket.values())
        self._captured = True
        self._mem0 = mem0
        if self._buckets is None:
            self._fast = res.plans[None]

    def _mem_now(self) -> int:
        total = graph_memory(self._res.device)["used_current"]
        for ad in active_adapters(self._adapter):
            total += ad.memory_reserved(self._res.device)
        return total

    def _host(self, out):
        return self._res.host_outputs.copy(out, self._res.stream, self._adapter, self._on_stream)

    def outputs_to_host(self, outputs=None):
        """Pinned-host copies of the last outputs (views of pinned buffers reused next time)."""
        self._check_open()
        if outputs is None:
            if self._last_bucket not in self._res.outputs:
                raise RuntimeError(f"no captured outputs yet (phase {self.phase!r}): pass the "
                                   "outputs to copy, e.g. h.outputs_to_host(h(**inputs))")
            outputs = self._res.outputs[self._last_bucket]
        return self._host(outputs)

    def refresh_stats(self) -> HandleStats:
        """Update graph_mem_bytes (graph memory + torch pool growth since before capture)."""
        if self._captured:
            self._res.stream.synchronize()
            self.stats.graph_mem_bytes = max(0, self._mem_now() - self._mem0)
        return self.stats

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Release everything: sync -> outputs -> exec -> graph -> buffers -> pools -> stream. Idempotent."""
        self._fast = None
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<GraphHandle closed>"
        return (f"<GraphHandle phase={self.phase} inputs={list(self._specs)} "
                f"buckets={self._buckets} replays={self.stats.replays}>")
