"""Stream (owned, non-blocking, with a torch view) and Event (timing)."""
from __future__ import annotations

from cuda.bindings import runtime as _rt

from ._lifetime import Owned
from .device import require_cuda
from .errors import call, check

__all__ = ["Stream", "Event"]


def _destroy_stream(handle: int) -> None:
    _rt.cudaStreamDestroy(handle)


def _destroy_event(handle: int) -> None:
    _rt.cudaEventDestroy(handle)


class Stream(Owned):
    """An owned non-blocking CUDA stream (capture is illegal on the legacy default stream).

    ``Stream.wrap(handle)`` views a stream someone else owns (close() then releases nothing).
    """

    def __init__(self, *, priority: int = 0, device: int | None = None):
        require_cuda()
        if device is not None:
            call(_rt.cudaSetDevice, int(device))
        self.device = int(call(_rt.cudaGetDevice))
        flags = int(_rt.cudaStreamNonBlocking)
        raw = call(_rt.cudaStreamCreateWithPriority, flags, int(priority))
        self.handle = int(raw)
        self._raw = raw
        self._torch = None
        self.owned = True
        self._own(_destroy_stream, self.handle)

    @classmethod
    def wrap(cls, handle: int, device: int | None = None) -> "Stream":
        s = cls.__new__(cls)
        s.handle = int(handle)
        s._raw = _rt.cudaStream_t(s.handle)
        s.device = int(call(_rt.cudaGetDevice)) if device is None else int(device)
        s._torch = None
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
        require_cuda()
        flags = _rt.cudaEventDefault if timing else _rt.cudaEventDisableTiming
        self.handle = int(call(_rt.cudaEventCreateWithFlags, int(flags)))
        self.timing = timing
        self._own(_destroy_event, self.handle)

    def record(self, stream: "Stream | int") -> "Event":
        self._check_open()
        call(_rt.cudaEventRecord, self.handle, int(stream))
        return self

    def synchronize(self) -> None:
        self._check_open()
        call(_rt.cudaEventSynchronize, self.handle)

    def elapsed_ms(self, end: "Event") -> float:
        """Milliseconds from this event to ``end`` (both recorded and complete)."""
        self._check_open()
        return float(call(_rt.cudaEventElapsedTime, self.handle, end.handle))
