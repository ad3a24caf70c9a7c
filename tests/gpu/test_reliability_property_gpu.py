"""Hypothesis property test on a real GraphHandle (with and without shape buckets; its fast replay
path included): random shapes, dtypes, layouts, devices and names; every call gives the eager
result bit for bit or raises our InputError and changes nothing (phase, static inputs), and the
next valid call is right. The owner of this property on a real handle; tests/test_reliability_property.py
checks validate_call's acceptance on the CPU."""
import pytest
import torch

from tests.needs import need_module

need_module("hypothesis", "the property tests (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cugraph_rt as cg  # noqa: E402
from tests.reliability_cases import SPEC, _acceptable, calls, rowwise  # noqa: E402

pytestmark = pytest.mark.gpu


def _eager(h, fn, **inputs):
    with torch.cuda.stream(h.stream.torch):
        out = fn(**{k: v.cuda() for k, v in inputs.items()})
    h.stream.synchronize()
    return out


# ---- the property test on a real handle --------------------------------------------------------
_HANDLES = {}


def _handle(buckets):
    if buckets not in _HANDLES:
        _HANDLES[buckets] = cg.GraphHandle(rowwise, SPEC, warmup=1, buckets=buckets)
    return _HANDLES[buckets]


@pytest.fixture(scope="module", autouse=True)
def _close_handles():
    yield
    for h in _HANDLES.values():
        h.close()
    _HANDLES.clear()


@pytest.mark.parametrize("buckets", [None, (2, 4, 8)])
@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_real_handle_gives_eager_result_or_our_error(buckets, data):
    h = _handle(buckets)
    given_ = data.draw(calls(buckets))
    on_device = data.draw(st.booleans())
    if on_device:
        given_ = {k: v.cuda() for k, v in given_.items()}
    phase = h.phase
    torch.cuda.synchronize()
    before = {b: {k: v.clone() for k, v in h.static_inputs(b).items()} for b in (buckets or (None,))}
    try:
        out = h(**given_)
    except cg.InputError as e:
        assert not _acceptable(given_, buckets), f"valid call refused: {e}"
        assert h.phase == phase
        torch.cuda.synchronize()
        for b, statics in before.items():    # a refused call copied nothing
            assert all(torch.equal(h.static_inputs(b)[k], v) for k, v in statics.items()), b
    else:
        assert _acceptable(given_, buckets), "invalid call accepted"
        out = out.clone()
        assert torch.equal(out, _eager(h, rowwise, **given_)), (phase, h.phase)
    n = 8 if buckets is None else 3
    good = {"x": torch.randn(n, 4, device="cuda"), "tok": torch.arange(n, device="cuda")}
    assert torch.equal(h(**good).clone(), _eager(h, rowwise, **good))


