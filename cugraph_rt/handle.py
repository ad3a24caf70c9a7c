"""GraphHandle: the three-phase handle around a step function.

WARMUP  the first ``warmup`` calls run the step eagerly on the handle's stream, on the static
        buffers (Triton JIT, autotuning, library workspaces happen here);
CAPTURE the next call captures the step (every bucket, largest first, one shared pool),
        instantiates with AutoFreeOnLaunch, uploads, and launches it once;
REPLAY  later calls copy inputs into the static buffers (cudaMemcpyAsync) and launch the graph.
EAGER   with ``capture=False`` every call copies its inputs into the static buffers and runs the
        step eagerly on the handle's stream: never captured (debugging, or a step that cannot be).
Outputs stay on the device (the same static tensors every replay) unless host copies are asked
for. A rejected call changes nothing. close(): sync -> exec -> graph -> pool -> buffers -> stream.
"""
from __future__ import annotations

import time
import weakref

from cuda.bindings import runtime as _rt

from ._lifetime import _safe
from .buckets import capture_order, normalize_buckets, pick_bucket
from .capture import capture, check_capture_args
from .device import require_cuda
from .errors import ClosedError, check
from .graph import GraphExec, graph_memory
from .handle_io import StaticInput, copy_inputs, map_outputs
from .handle_state import HandleStats, _Resources
from .stream import Event, Stream
from .validation import as_spec, validate_call

__all__ = ["GraphHandle", "HandleStats"]

_launch = _rt.cudaGraphLaunch
_memcpy = _rt.cudaMemcpyAsync
_KIND = _rt.cudaMemcpyKind.cudaMemcpyDefault


class GraphHandle:
    """Capture ``fn(**static_inputs)`` once, replay it with new inputs. See the module doc."""

    def __init__(self, fn, inputs: dict, *, warmup: int = 2, stream=None,
                 allocator: str = "pool", buckets=None, bucket_dim: int = 0, bucketed=None,
                 upload: bool = True, host_outputs: bool = False,
                 capture_mode: str = "thread_local", slice_outputs: bool = True,
                 capture: bool = True):
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
            raise TypeError("inputs must be a dict of name -> tensor or spec")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (capture=False never captures); "
                             f"got {warmup!r}")
        check_capture_args(capture_mode, allocator)
        self._specs = {name: as_spec(name, v) for name, v in inputs.items()}
        self._buckets = normalize_buckets(buckets)
        self._bucket_dim = int(bucket_dim)
        self._bucketed = self._check_bucketed(bucketed)
        if self._buckets is not None:
            for name, spec in self._specs.items():
                if not self._is_bucketed(name):
                    continue
                if not 0 <= self._bucket_dim < len(spec.shape):
                    raise ValueError(f"bucket_dim {bucket_dim} is out of range for input "
                                     f"{name!r} of shape {spec.shape}")
        self.fn, self.warmup = fn, int(warmup)
        self.capture_enabled = bool(capture)
        self.allocator, self.capture_mode = allocator, capture_mode
        self.upload, self.host_outputs, self.slice_outputs = upload, host_outputs, slice_outputs
        require_cuda()
        from . import torch_interop as ti
        if allocator == "async" and ti.allocator_backend() != "cudaMallocAsync":
            raise ValueError("allocator='async' needs torch's cudaMallocAsync backend "
                             "(PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync); torch's native "
                             "allocator cannot make graph memory nodes: use allocator='pool'")
        res = self._res = _Resources()
        self._finalizer = weakref.finalize(self, _safe, res.release)  # deferred inside a capture
        res.ti = ti
        if stream is None:
            res.stream, res.owns_stream = Stream(), True
        else:
            res.stream = stream if isinstance(stream, Stream) else Stream.wrap(
                int(getattr(stream, "cuda_stream", stream)))
        res.device = res.stream.device
        for b in (self._buckets or (None,)):
            res.statics[b] = {}
            for name, spec in self._specs.items():
                shape = list(spec.shape)
                if b is not None and self._is_bucketed(name):
                    shape[self._bucket_dim] = b
                res.statics[b][name] = StaticInput(tuple(shape), spec.dtype, ti)
                res.statics[b][name].buffer.fill_zero(stream=res.stream)
        res.stream.synchronize()
        self._ev_in, self._ev_out = Event(timing=False), Event(timing=False)
        res.events += [self._ev_in, self._ev_out]
        self._calls = 0
        self._captured = False
        self._warm = {b: 0 for b in res.statics}
        self._last_bucket = None
        self._fast = None
        self.stats = HandleStats()

    def _check_bucketed(self, bucketed):
        """None (every input is padded along bucket_dim) or the names of the inputs that are;
        the others (per-call scalars, say) keep their shape in every bucket."""
        if bucketed is None:
            return None
        if isinstance(bucketed, str) or not hasattr(bucketed, "__iter__"):
            raise TypeError(f"bucketed must be an iterable of input names; got {bucketed!r}")
        names = frozenset(bucketed)
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
        return {k: v.tensor for k, v in self._res.statics[bucket].items()}

    # -- calling --------------------------------------------------------------------------
    def __call__(self, **inputs):
        fast = self._fast
        if fast is not None and len(inputs) == len(fast[0]):
            out = self._replay_fast(fast, inputs)
            if out is not None:
                return out
        self._check_open()
        res = self._res
        n = validate_call(self._specs, inputs, device_index=res.device,
                          buckets=self._buckets, bucket_dim=self._bucket_dim,
                          bucketed=self._bucketed)
        bucket = None if self._buckets is None else pick_bucket(self._buckets, n)
        stream = res.stream.handle
        torch_stream = res.ti.current_raw_stream(res.device)
        foreign = torch_stream != stream
        if foreign:  # order after work already queued on torch's current stream
            self._ev_in.record(torch_stream)
            res.stream.wait(self._ev_in)
        if self._buckets is not None and bucket is None:
            out = self._eager_direct(inputs)
        else:
            copy_inputs(res.statics[bucket], inputs, n=n, bucket_dim=self._bucket_dim,
                        stream=stream, staging=res.staging, bucketed=self._bucketed)
            out = self._step(bucket)
            if n is not None and self.slice_outputs and n != bucket:
                d = self._bucket_dim
                out = map_outputs(out, lambda t: t.narrow(d, 0, n)
                                  if t.dim() > d and t.shape[d] == bucket else t)
        self._calls += 1
        if foreign:  # let torch's current stream consume the outputs
            self._ev_out.record(stream)
            check(_rt.cudaStreamWaitEvent(torch_stream, self._ev_out.handle, 0),
                  "cudaStreamWaitEvent")
        return self._host(out) if self.host_outputs else out

    def _replay_fast(self, fast, inputs):
        """The replay path without buckets: a cheap check of every input (anything unusual
        returns None and takes the general path, which validates and explains), one
        cudaMemcpyAsync per input, one cudaGraphLaunch."""
        checks, exec_obj, stream_obj, stream, dev, current = fast
        copies = []
        for name, shape, dtype, ptr, nbytes in checks:
            t = inputs.get(name)
            if getattr(t, "dtype", None) is not dtype or t.shape != shape or not t.is_cuda \
                    or t.get_device() != dev or not t.is_contiguous():
                return None
            copies.append((ptr, t.data_ptr(), nbytes))
        if self._finalizer.alive is False:
            return None
        torch_stream = current(dev)
        foreign = torch_stream != stream
        if foreign:
            self._ev_in.record(torch_stream)
            self._res.stream.wait(self._ev_in)
        for dst, src, nbytes in copies:
            err = _memcpy(dst, src, nbytes, _KIND, stream_obj)[0]
            if err:
                check((err,), "cudaMemcpyAsync")
        err = _launch(exec_obj, stream_obj)[0]
        if err:
            check((err,), "cudaGraphLaunch")
        self.stats.replays += 1
        self._calls += 1
        if foreign:
            self._ev_out.record(stream)
            check(_rt.cudaStreamWaitEvent(torch_stream, self._ev_out.handle, 0),
                  "cudaStreamWaitEvent")
        out = self._res.outputs[None]
        return self._host(out) if self.host_outputs else out

    def _arm_fast_path(self) -> None:
        """After capture, without buckets: precompute what a replay needs."""
        res = self._res
        if self._buckets is not None:
            return
        checks = [(name, tuple(st.tensor.shape), st.tensor.dtype, st.ptr, st.nbytes)
                  for name, st in res.statics[None].items()]
        self._fast = (checks, res.execs[None]._box[0], res.stream._raw, res.stream.handle,
                      res.device, res.ti.current_raw_stream)

    def _step(self, bucket):
        res = self._res
        self._last_bucket = bucket
        if self._captured:
            err = _launch(res.execs[bucket]._box[0], res.stream._raw)[0]
            if err:
                check((err,), "cudaGraphLaunch")
            self.stats.replays += 1
            return res.outputs[bucket]
        if not self.capture_enabled:
            return self._run_eager(bucket, warmup=False)
        if self._calls < self.warmup:
            return self._run_eager(bucket)
        self._capture_all()
        res.execs[bucket].launch(res.stream.handle)
        self.refresh_stats()
        return res.outputs[bucket]

    def _run_eager(self, bucket, warmup: bool = True):
        t0 = time.perf_counter()
        with self._res.ti.stream_context(self._res.stream):
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
        res = self._res
        dev = f"cuda:{res.device}"
        with res.ti.stream_context(res.stream):
            moved = {k: v.to(dev, non_blocking=False) for k, v in inputs.items()}
            out = self.fn(**moved)
        self.stats.eager_calls += 1
        return out

    def _capture_all(self):
        """Capture every bucket (largest first, one pool), instantiate, upload. All or nothing:
        on failure the handle stays in the capture phase and the stream stays usable."""
        res, stats = self._res, self.stats
        for b in res.statics:  # buckets no call reached yet get their warmup now
            while self.warmup and self._warm[b] < self.warmup:
                self._run_eager(b)
        order = capture_order(self._buckets) if self._buckets else [None]
        if res.pool is None:
            res.pool = res.ti.new_pool()
        res.stream.synchronize()
        mem0 = self._mem_now()
        try:
            for b in order:
                t0 = time.perf_counter()
                with res.ti.stream_context(res.stream):
                    with capture(res.stream, mode=self.capture_mode, allocator=self.allocator,
                                 pool=res.pool) as cap:
                        res.outputs[b] = self.fn(**self.static_inputs(b))
                t1 = time.perf_counter()
                res.graphs[b] = cap.graph
                res.execs[b] = GraphExec(cap.graph, auto_free_on_launch=True)
                t2 = time.perf_counter()
                if self.upload:
                    res.execs[b].upload(res.stream.handle)
                    res.stream.synchronize()
                t3 = time.perf_counter()
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
        self._arm_fast_path()

    def _mem_now(self) -> int:
        import torch
        total = graph_memory(self._res.device)["used_current"]
        try:
            total += torch.cuda.memory_reserved(self._res.device)
        except Exception:  # noqa: BLE001 - not every allocator backend reports it
            pass
        return total

    def _host(self, out):
        return self._res.host_outputs.copy(out, self._res.stream)

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
        """Release everything: sync -> exec -> graph -> pool -> buffers -> stream. Idempotent."""
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
