"""Lifetime plumbing and small helpers that need no GPU: idempotent close, use after close,
a finalizer that runs on drop without keeping its owner alive, demangling, output mapping."""
import gc
import weakref

import pytest
import torch

import cugraph_rt as cg
from cugraph_rt._lifetime import Owned
from cugraph_rt.handle_io import map_outputs
from cugraph_rt.nodes import demangle


class Fake(Owned):
    def __init__(self, log, fail=False):
        def release(tag):
            log.append(tag)
            if fail:
                raise RuntimeError("release failed")
        self._own(release, "released")

    def use(self):
        self._check_open()
        return 1


def test_close_is_idempotent_and_use_after_close_raises():
    log = []
    f = Fake(log)
    assert f.use() == 1 and not f.closed
    f.close()
    f.close()
    assert log == ["released"] and f.closed
    with pytest.raises(cg.ClosedError, match="Fake is closed"):
        f.use()


def test_context_manager_closes():
    log = []
    with Fake(log) as f:
        f.use()
    assert log == ["released"]


def test_finalizer_runs_on_drop_and_does_not_keep_owner_alive():
    log = []
    f = Fake(log)
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None and log == ["released"]


def test_release_errors_are_swallowed():
    log = []
    f = Fake(log, fail=True)
    f.close()  # must not raise (finalizers also run at interpreter exit)
    assert log == ["released"]


def test_demangle():
    assert demangle("_ZN2at6native6kernelEv") == "at::native::kernel()"
    assert demangle("triton_poi_fused_add_0") == "triton_poi_fused_add_0"
    assert demangle("_Zbroken") == "_Zbroken"


def test_map_outputs_keeps_structure():
    a, b = torch.zeros(1), torch.ones(2)
    out = map_outputs({"a": a, "rest": (b, [a], 3)}, lambda t: t + 1)
    assert torch.equal(out["a"], a + 1) and torch.equal(out["rest"][0], b + 1)
    assert isinstance(out["rest"], tuple) and isinstance(out["rest"][1], list)
    assert out["rest"][2] == 3
