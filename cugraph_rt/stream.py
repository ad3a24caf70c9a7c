"""Stream (owned, non-blocking, with a torch view) and Event (timing)."""
from __future__ import annotations

from cuda.bindings import runtime as _rt

from ._args import check_bool, check_int
from ._lifetime import Owned
from .device import require_cuda
from .errors import call, check

__all__ = ["Stream", "Event", "stream_handle"]

_LEGACY_STREAMS = (0, 1, 2)  # 0 = legacy default, 1/2 = cudaStreamLegacy / cudaStreamPerThread


def stream_handle(stream, name: str = "stream", *, capturable: bool = False) -> int:
    """The raw handle of a stream given as a cugraph_rt.Stream, an int handle, or another
    library's stream object (``.cuda_stream``: torch; ``.ptr``: CuPy). TypeError / ValueError /
    ClosedError naming ``name`` otherwise; ``capturable`` also refuses the legacy streams."""
    if isinstance(stream, Stream):
        stream._check_open()
        handle = stream.handle
    elif isinstance(stream, bool) or stream is None:
        raise TypeError(f"{name} must be a cugraph_rt.Stream, a stream handle (int), or a torch / "
                        f"CuPy stream; got {stream!r}")
    elif hasattr(stream, "__index__"):
        handle = stream.__index__()
    else:
        raw = getattr(stream, "cuda_stream", None)
        raw = getattr(stream, "ptr", None) if raw is None else raw
        if raw is None or isinstance(raw, bool) or not hasattr(raw, "__index__"):
            raise TypeError(f"{name} must be a cugraph_rt.Stream, a stream handle (int), or a "
                            f"torch / CuPy stream; got {type(stream).__name__}")
        handle = raw.__index__()
    if handle < 0:
        raise ValueError(f"{name} handle must be >= 0; got {handle}")
    if capturable and handle in _LEGACY_STREAMS:
        raise ValueError(f"{name}: capture needs a created stream (e.g. cugraph_rt.Stream()); "
                         "capture on the legacy default stream is illegal")
    return handle


def _destroy_stream(handle: int) -> None:
    _rt.cudaStreamDestroy(handle)


def _destroy_event(handle: int) -> None:
    _rt.cudaEventDestroy(handle)


class Stream(Owned):
    """An owned non-blocking CUDA stream (capture is illegal on the legacy default stream).

    ``Stream.wrap(handle)`` views a stream someone else owns (close() then releases nothing).
    """

    def __init__(self, *, priority: int = 0, device: int | None = None):
        priority = check_int(priority, "priority")
        if device is not None:
            device = check_int(device, "device", minimum=0)
        require_cuda()
        if device is not None:
            count = int(call(_rt.cudaGetDeviceCount))
            if device >= count:
                raise ValueError(f"device must be < {count} (the devices here); got {device}")
            call(_rt.cudaSetDevice, device)
        self.device = int(call(_rt.cudaGetDevice))
        flags = int(_rt.cudaStreamNonBlocking)
        raw = call(_rt.cudaStreamCreateWithPriority, flags, int(priority))
        self.handle = int(raw)
        self._raw = raw
        self._torch = None
        self._views: dict = {}   # other frameworks' views of this stream, made once
        self.owned = True
        self._own(_destroy_stream, self.handle)

    @classmethod
    def wrap(cls, handle: int, device: int | None = None) -> "Stream":
        handle = check_int(handle, "handle", minimum=0)
        if device is not None:
            device = check_int(device, "device", minimum=0)
        s = cls.__new__(cls)
        s.handle = handle
        s._raw = _rt.cudaStream_t(s.handle)
        s.device = int(call(_rt.cudaGetDevice)) if device is None else device
        s._torch = None
        s._views = {}
        s.owned = False
        s._own(lambda: None)
        return s

    def __int__(self) -> int:
        return self.handle

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"0x{self.handle:x}"
        return f"<Stream {state} device={self.device} owned={self.owned}>"

    @property
    def torch(self):
        """This stream as a ``torch.cuda.ExternalStream`` (torch and Triton launch on it inside
        ``with torch.cuda.stream(s.torch)``)."""
        self._check_open()
        if self._torch is None:
            from .torch_interop import external_stream
            self._torch = external_stream(self.handle, self.device)
        return self._torch

    def synchronize(self) -> None:
        self._check_open()
        call(_rt.cudaStreamSynchronize, self.handle)

    def query(self) -> bool:
        """True when all work on the stream has finished."""
        self._check_open()
        err = _rt.cudaStreamQuery(self.handle)[0]
        if err == _rt.cudaError_t.cudaErrorNotReady:
            return False
        check((err,), "cudaStreamQuery")
        return True

    def wait(self, event: "Event") -> None:
        """Make later work on this stream wait for ``event``."""
        self._check_open()
        if not isinstance(event, Event):
            raise TypeError(f"event must be a cugraph_rt.Event; got {type(event).__name__}")
        call(_rt.cudaStreamWaitEvent, self.handle, event.handle, 0)

    def record(self, event: "Event | None" = None) -> "Event":
        event = event if event is not None else Event(timing=False)
        event.record(self)
        return event

    def is_capturing(self) -> bool:
        self._check_open()
        status = call(_rt.cudaStreamIsCapturing, self.handle)
        return status != _rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone


class Event(Owned):
    """A CUDA event; ``timing=True`` (default) allows ``elapsed_ms``."""

    def __init__(self, *, timing: bool = True):
        check_bool(timing, "timing")
        require_cuda()
        flags = _rt.cudaEventDefault if timing else _rt.cudaEventDisableTiming
        self.handle = int(call(_rt.cudaEventCreateWithFlags, int(flags)))
        self.timing = timing
        self._own(_destroy_event, self.handle)

    def record(self, stream: "Stream | int") -> "Event":
        self._check_open()
        call(_rt.cudaEventRecord, self.handle, stream_handle(stream))
        return self

    def synchronize(self) -> None:
        self._check_open()
        call(_rt.cudaEventSynchronize, self.handle)

    def elapsed_ms(self, end: "Event") -> float:
        """Milliseconds from this event to ``end`` (both recorded and complete)."""
        self._check_open()
        if not isinstance(end, Event):
            raise TypeError(f"end must be a cugraph_rt.Event; got {type(end).__name__}")
        return float(call(_rt.cudaEventElapsedTime, self.handle, end.handle))
