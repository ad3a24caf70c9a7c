"""A stand-in for the few `cupy` names the CuPy adapter's array logic uses (ndarray: shape, dtype,
device.id, flags, strides, data.ptr, nbytes, slicing), over numpy, so that logic can be tested on
a machine without CuPy. GPU tests use the real CuPy."""
import sys
import types
from contextlib import contextmanager

import numpy as np


class ndarray:   # noqa: N801 - the name the adapter looks for
    def __init__(self, arr, device=0):
        self._a = np.asarray(arr)
        self._dev = device

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    strides = property(lambda self: self._a.strides)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    device = property(lambda self: types.SimpleNamespace(id=self._dev))
    data = property(lambda self: types.SimpleNamespace(ptr=int(self._a.ctypes.data)))

    def __getitem__(self, idx):
        return ndarray(self._a[idx], self._dev)


ndarray.__module__ = "cupy"


@contextmanager
def installed(monkeypatch):
    """`cupy` in sys.modules for the test's duration (and no cached adapter before or after)."""
    from cugraph_rt import framework

    mod = types.ModuleType("cupy")
    mod.ndarray = ndarray
    mod.asarray = lambda x: ndarray(x)
    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.delitem(sys.modules, "cugraph_rt.cupy_interop", raising=False)
    monkeypatch.delitem(framework._adapters, "cupy", raising=False)
    try:
        yield mod
    finally:
        framework._adapters.pop("cupy", None)
        sys.modules.pop("cugraph_rt.cupy_interop", None)
