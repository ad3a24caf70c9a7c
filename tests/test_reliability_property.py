"""Hypothesis property test of GraphHandle's input validation under its own name,
cugraph_rt.validation.validate_call (what the handle runs before copying anything): random names,
shapes, ranks, dtypes and layouts, with and without shape buckets; a call is accepted exactly
when an independent oracle says it is valid (returning the bucket size), else refused with our
InputError naming the input. tests/gpu/test_reliability_property_gpu.py runs the same strategy
against a real handle (eager result bit for bit, refused calls change nothing)."""
import pytest

from tests.needs import need_module

need_module("hypothesis", "the property tests (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cugraph_rt as cg  # noqa: E402
from cugraph_rt.validation import validate_call  # noqa: E402
from tests.reliability_cases import SPEC, _acceptable, calls  # noqa: E402


@pytest.mark.parametrize("buckets", [None, (2, 4, 8)])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_validate_call_accepts_exactly_the_valid_calls(buckets, data):
    given_ = data.draw(calls(buckets))
    try:
        n = validate_call(SPEC, given_, device_index=0, buckets=buckets, bucket_dim=0)
    except cg.InputError as e:
        assert not _acceptable(given_, buckets), f"valid call refused: {e}"
        assert str(e).startswith("input") or "missing" in str(e), str(e)
    else:
        assert _acceptable(given_, buckets), \
            f"invalid call accepted: {[(k, tuple(v.shape), v.dtype) for k, v in given_.items()]}"
        assert n == (None if buckets is None else given_["x"].shape[0])
