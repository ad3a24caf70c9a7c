"""cugraph_rt without a GPU: import, the error funnel's mapping, and every public constructor
failing with a clear CudaUnavailableError (never a raw tuple, never a segfault)."""
import os
import subprocess
import sys

import pytest
from cuda.bindings import runtime as rt

import cugraph_rt as cg
from cugraph_rt.errors import CAPTURE_HINT, call

E = rt.cudaError_t


def test_public_names():
    for name in ["check", "CudaError", "CudaUnavailableError", "CaptureError", "ClosedError",
                 "is_available", "device_info", "Stream", "Event", "DeviceBuffer", "HostBuffer",
                 "capture", "Graph", "GraphExec", "GraphHandle"]:
        assert hasattr(cg, name), name


def test_core_imports_no_torch():
    code = ("import sys, cugraph_rt, cugraph_rt.capture, cugraph_rt.graph, cugraph_rt.memory;"
            "assert 'torch' not in sys.modules, 'core imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_success_values():
    assert cg.check((E.cudaSuccess,)) is None
    assert cg.check((E.cudaSuccess, 7)) == 7
    assert cg.check((E.cudaSuccess, 1, 2, 3)) == (1, 2, 3)


def test_check_rejects_non_tuples():
    with pytest.raises(TypeError, match="result tuple"):
        cg.check(E.cudaSuccess)
    with pytest.raises(TypeError):
        cg.check(())


def test_check_maps_error_with_call_name_and_text():
    with pytest.raises(cg.CudaError) as info:
        cg.check((E.cudaErrorInvalidValue, None), "cudaMalloc")
    err = info.value
    assert type(err) is cg.CudaError
    assert err.call == "cudaMalloc"
    assert err.name == "cudaErrorInvalidValue"
    assert err.text == "invalid argument"
    assert "cudaMalloc failed: cudaErrorInvalidValue (invalid argument)" in str(err)


@pytest.mark.parametrize("code", [E.cudaErrorStreamCaptureInvalidated,
                                  E.cudaErrorStreamCaptureUnsupported,
                                  E.cudaErrorStreamCaptureUnjoined])
def test_check_maps_capture_errors(code):
    with pytest.raises(cg.CaptureError) as info:
        cg.check((code,), "cudaStreamEndCapture")
    assert isinstance(info.value, cg.CudaError)
    assert CAPTURE_HINT in str(info.value)
    assert ".item()" in str(info.value) and "autotune" in str(info.value)


@pytest.mark.parametrize("code", [E.cudaErrorInsufficientDriver, E.cudaErrorNoDevice,
                                  E.cudaErrorCallRequiresNewerDriver])
def test_check_maps_unavailable(code):
    with pytest.raises(cg.CudaUnavailableError) as info:
        cg.check((code, None), "cudaStreamCreate")
    assert "driver" in str(info.value)


def test_call_names_the_function():
    def cudaFake(x):
        return (E.cudaErrorMemoryAllocation, None)
    with pytest.raises(cg.CudaError, match="cudaFake failed: cudaErrorMemoryAllocation"):
        call(cudaFake, 1)


def test_error_hierarchy():
    assert issubclass(cg.CudaUnavailableError, cg.CudaError)
    assert issubclass(cg.CaptureError, cg.CudaError)
    assert issubclass(cg.CudaError, RuntimeError)
    assert issubclass(cg.ClosedError, RuntimeError)


@pytest.fixture
def no_driver(monkeypatch):
    """The runtime as it answers with no NVIDIA driver installed (DESIGN: cudaDriverGetVersion gives
    (cudaSuccess, 0), other calls cudaErrorInsufficientDriver), on any machine."""
    monkeypatch.setattr(rt, "cudaDriverGetVersion", lambda: (E.cudaSuccess, 0))
    monkeypatch.setattr(rt, "cudaGetDeviceCount", lambda: (E.cudaErrorInsufficientDriver, None))


def _driver_with(monkeypatch, count):
    """A 13.0 driver reporting `count` devices (or count's error code)."""
    monkeypatch.setattr(rt, "cudaDriverGetVersion", lambda: (E.cudaSuccess, 13000))
    monkeypatch.setattr(rt, "cudaGetDeviceCount",
                        lambda: (count, None) if isinstance(count, E) else (E.cudaSuccess, count))


@pytest.mark.parametrize("make", [
    lambda: cg.Stream(), lambda: cg.Event(), lambda: cg.DeviceBuffer(64),
    lambda: cg.HostBuffer(64), lambda: cg.Graph(), lambda: cg.device_info(),
])
def test_constructors_without_driver(no_driver, make):
    with pytest.raises(cg.CudaUnavailableError) as info:
        make()
    msg = str(info.value)
    assert "no NVIDIA driver found" in msg and "CUDA graphs need an NVIDIA GPU and driver" in msg, msg


def test_graph_handle_without_driver(no_driver):
    import torch

    for capture in (True, False):
        with pytest.raises(cg.CudaUnavailableError, match="no NVIDIA driver found"):
            cg.GraphHandle(lambda x: x * 2, {"x": torch.zeros(4)}, capture=capture)


def test_is_available_follows_the_driver_and_device_count(no_driver, monkeypatch):
    assert cg.is_available() is False
    _driver_with(monkeypatch, 0)
    assert cg.is_available() is False
    _driver_with(monkeypatch, E.cudaErrorNoDevice)
    assert cg.is_available() is False
    with pytest.raises(cg.CudaUnavailableError, match="no CUDA device is visible"):
        cg.Stream()
    _driver_with(monkeypatch, 1)
    assert cg.is_available() is True


def test_is_available_false_with_no_visible_device():
    """Unpatched, in a process that sees no device (no driver here; CUDA_VISIBLE_DEVICES="" on a GPU
    machine); tests/gpu/test_cugraph_capture.py asserts True where a GPU is visible."""
    code = "import cugraph_rt as cg; print(cg.is_available())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_capture_refuses_legacy_stream_and_bad_args():
    with pytest.raises(ValueError, match="legacy default stream"):
        cg.capture(0)
    with pytest.raises(ValueError, match="capture mode"):
        cg.capture(1234, mode="sometimes")
    with pytest.raises(ValueError, match="allocator"):
        cg.capture(1234, allocator="malloc")
