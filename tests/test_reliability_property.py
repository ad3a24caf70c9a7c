"""Hypothesis property test of GraphHandle's call path on the CPU (its validation layer, the same
functions the handle calls, on a CPU stand-in): every call gives the eager result or raises our
InputError, and a refused call changes nothing. tests/gpu/test_reliability_property_gpu.py runs
the same strategy against a real handle."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cugraph_rt as cg  # noqa: E402
from tests.reliability_cases import SPEC, CpuHandle, _acceptable, calls, rowwise  # noqa: E402


@pytest.mark.parametrize("buckets", [None, (2, 4, 8)])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_every_call_is_the_eager_result_or_our_error(buckets, data):
    h = CpuHandle(rowwise, SPEC, buckets=buckets)
    before = {b: {k: v.clone() for k, v in d.items()} for b, d in h.statics.items()}
    given = data.draw(calls(buckets))
    try:
        out = h(**given)
    except cg.InputError as e:
        assert not _acceptable(given, buckets), f"valid call refused: {e}"
        assert "input" in str(e)
        for b, d in h.statics.items():   # a refused call changed nothing
            assert all(torch.equal(d[k], before[b][k]) for k in d)
    else:
        assert _acceptable(given, buckets), f"invalid call accepted: {[(k, v.shape, v.dtype) for k, v in given.items()]}"
        assert torch.equal(out, rowwise(**given))
    # and the next valid call gives the right result
    n = 8 if buckets is None else 3
    good = {"x": torch.randn(n, 4), "tok": torch.arange(n)}
    assert torch.equal(h(**good), rowwise(**good))


