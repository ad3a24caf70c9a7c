"""The per-device stream pool's bookkeeping, on the CPU with a stand-in for the stream and the
runtime queries (tests/gpu/test_cugraph_soak_libraries.py checks the real thing: handles reuse
streams and the libraries' per-stream memory stops growing)."""
import types

import pytest

import cugraph_rt as cg
from cugraph_rt import stream_pool


class FakeStream:
    made = 0

    def __init__(self, *, device=None):
        FakeStream.made += 1
        self.device = 0 if device is None else device
        self.handle = 0x1000 + FakeStream.made
        self.owned, self.closed = True, False
        self.busy = self.capturing = False

    def close(self):
        self.closed = True


@pytest.fixture
def pool(monkeypatch):
    from cuda.bindings import runtime as rt
    streams = {}
    ok, none = rt.cudaError_t.cudaSuccess, rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
    active = rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive
    fake_rt = types.SimpleNamespace(
        cudaGetDevice=lambda: (ok, 0), cudaSetDevice=lambda d: (ok,),
        cudaStreamQuery=lambda h: (rt.cudaError_t.cudaErrorNotReady if streams[h].busy else ok,),
        cudaStreamIsCapturing=lambda h: (ok, active if streams[h].capturing else none),
        cudaGetLastError=lambda: (ok,), cudaError_t=rt.cudaError_t,
        cudaStreamCaptureStatus=rt.cudaStreamCaptureStatus)

    class Tracked(FakeStream):
        def __init__(self, **kw):
            super().__init__(**kw)
            streams[self.handle] = self

    monkeypatch.setattr(stream_pool, "_rt", fake_rt)
    monkeypatch.setattr(stream_pool, "Stream", Tracked)
    monkeypatch.setattr(stream_pool, "_idle", {})
    monkeypatch.setattr(stream_pool, "call", lambda fn, *a: fn(*a)[1] if len(fn(*a)) > 1 else None)
    return stream_pool


def test_given_back_streams_are_lent_again_per_device(pool):
    a, b = pool.borrow_stream(), pool.borrow_stream()
    assert a is not b and pool.idle_streams() == 0            # two open handles: two streams
    pool.give_back_stream(a)
    assert pool.idle_streams() == 1 and pool.idle_streams(0) == 1 and pool.idle_streams(1) == 0
    assert pool.borrow_stream() is a                           # reused, not a new stream
    c = pool.borrow_stream(device=1)
    assert c.device == 1 and c is not b
    pool.give_back_stream(c)
    assert pool.borrow_stream(0) is not c and pool.borrow_stream(1) is c


def test_a_stream_that_is_busy_capturing_closed_or_not_ours_is_not_pooled(pool):
    busy, capturing, closed, borrowed = (pool.borrow_stream() for _ in range(4))
    busy.busy, capturing.capturing, closed.closed = True, True, True
    borrowed.owned = False
    for s in (busy, capturing, closed, borrowed):
        pool.give_back_stream(s)
    assert pool.idle_streams() == 0
    assert busy.closed and capturing.closed and not borrowed.closed   # ours are destroyed instead


def test_arguments_are_checked(pool):
    with pytest.raises(TypeError, match="stream must be a cugraph_rt.Stream"):
        pool.give_back_stream(5)
    with pytest.raises(ValueError, match="device must be >= 0"):
        pool.borrow_stream(-1)
    with pytest.raises(TypeError, match="device must be an int"):
        cg.idle_streams("0")
