"""Every public argument of cugraph_rt is type- and range-checked, and the error names it: the
cases found by hand, then a hypothesis property over the public constructors and functions (one
argument at a time made wrong; argument errors come before any CUDA call, so this runs without a
GPU: valid arguments there end in CudaUnavailableError)."""
import numpy as np
import pytest

from tests.needs import need_module
import torch

import cugraph_rt as cg

hypothesis = need_module("hypothesis", "the property tests need it (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def test_bucket_helpers_refuse_what_they_used_to_coerce():
    with pytest.raises(TypeError, match=r"buckets must be .*'48'"):
        cg.normalize_buckets("48")              # was (4, 8)
    with pytest.raises(TypeError, match=r"buckets.*element 2\.7"):
        cg.normalize_buckets([2.7])             # was (2,)
    with pytest.raises(TypeError, match=r"buckets.*element True"):
        cg.normalize_buckets([True])            # was (1,)
    assert cg.normalize_buckets([np.int64(8), 4, 4]) == (4, 8)
    with pytest.raises(ValueError, match="n must be >= 0"):
        cg.pick_bucket((4, 8), -1)              # was 4
    with pytest.raises(TypeError, match="n must be an int"):
        cg.pick_bucket((4, 8), 2.0)
    with pytest.raises(TypeError, match="buckets must be a sorted tuple"):
        cg.pick_bucket([8, 4], 2)
    assert cg.pick_bucket((4, 8), 0) == 4 and cg.pick_bucket((4, 8), 9) is None


def test_handle_and_capture_arguments_are_named():
    x = {"x": torch.zeros(4, 2)}
    with pytest.raises(TypeError, match="bucket_dim must be an int; got 'a'"):
        cg.GraphHandle(lambda x: x, x, buckets=[2, 4], bucket_dim="a")
    with pytest.raises(TypeError, match="InputSpec shape must be a sequence .* got 5"):
        cg.InputSpec(5, torch.float32)
    with pytest.raises(TypeError, match="InputSpec dtype"):
        cg.InputSpec((2,), None)
    with pytest.raises(TypeError, match="stream must be a cugraph_rt.Stream"):
        cg.capture(None)
    with pytest.raises(TypeError, match="host_outputs must be True or False"):
        cg.GraphHandle(lambda x: x, x, host_outputs="yes")
    with pytest.raises(ValueError, match=r"capture mode \(capture_mode=\)"):
        cg.GraphHandle(lambda x: x, x, capture_mode="always")
    with pytest.raises(TypeError, match="bucketed must be an iterable"):
        cg.GraphHandle(lambda x: x, x, buckets=[4], bucketed=[["x"]])
    with pytest.raises(ValueError, match="stream: capture needs a created stream"):
        cg.GraphHandle(lambda x: x, x, stream=0)


# ---- the property -------------------------------------------------------------------------------
ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False),
                st.text(max_size=3), st.lists(st.integers(-2, 2), max_size=2), st.just(object()))
NOT_INT = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=3),
                    st.lists(st.integers(0, 3), max_size=2))
NEGATIVE = st.integers(-1000, -1)
NOT_BOOL = st.one_of(st.none(), st.integers(0, 2), st.text(max_size=2), st.floats())
STREAM_BAD = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=3), NEGATIVE)
NAME_BAD = st.one_of(st.integers(), st.none(), st.text(max_size=4).filter(
    lambda s: s not in ("pool", "async", "forbid", "thread_local", "global", "relaxed")))
X = torch.zeros(4, 3)

# For each callable: its valid arguments, and per argument the wrong values and the word the
# error message must contain.
CASES = {
    "GraphHandle": (cg.GraphHandle, dict(fn=lambda x: x, inputs={"x": X}, warmup=1, stream=None,
                                         allocator="pool", buckets=None, bucket_dim=0,
                                         bucketed=None, upload=True, host_outputs=False,
                                         capture_mode="thread_local", slice_outputs=True,
                                         capture=True, framework=None), {
        "fn": (st.one_of(st.none(), st.integers(), st.text(max_size=2)), "fn"),
        "inputs": (st.one_of(ANY, st.just({"x": 5}), st.just({3: X}), st.just({"x": ((-1,), "float32")}),
                             st.just({"x": ("ab", "float32")}), st.just({"x": ((2,), "float5")})), "input"),
        "warmup": (st.one_of(NOT_INT, NEGATIVE), "warmup"),
        "stream": (STREAM_BAD.filter(lambda v: v is not None), "stream"),
        "allocator": (NAME_BAD, "allocator"),
        "buckets": (st.one_of(st.text(min_size=1, max_size=3), st.lists(NOT_INT, min_size=1, max_size=2),
                              st.lists(st.integers(-5, 0), min_size=1, max_size=2), st.just([]),
                              st.integers(), st.floats()), "buckets"),
        "bucket_dim": (st.one_of(NOT_INT, NEGATIVE), "bucket_dim"),
        "bucketed": (st.one_of(st.just(["y"]), st.just([]), st.integers(), st.just("x")), "bucketed"),
        "upload": (NOT_BOOL, "upload"), "host_outputs": (NOT_BOOL, "host_outputs"),
        "slice_outputs": (NOT_BOOL, "slice_outputs"), "capture": (NOT_BOOL, "capture"),
        "capture_mode": (NAME_BAD, "capture_mode"),
        "framework": (st.one_of(st.integers(), st.text(max_size=3), st.floats()), "framework"),
    }),
    "InputSpec": (cg.InputSpec, dict(shape=(2, 3), dtype=torch.float32), {
        "shape": (st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.none(),
                            st.lists(st.one_of(NEGATIVE, st.floats(), st.booleans()), min_size=1,
                                     max_size=2)), "InputSpec shape"),
        "dtype": (st.one_of(st.none(), st.integers(), st.floats(), st.just("")), "InputSpec dtype"),
    }),
    "Stream": (cg.Stream, dict(priority=0, device=None), {
        "priority": (NOT_INT, "priority"), "device": (st.one_of(NEGATIVE, st.floats(), st.text(max_size=2)), "device"),
    }),
    "Event": (cg.Event, dict(timing=True), {"timing": (NOT_BOOL, "timing")}),
    "DeviceBuffer": (cg.DeviceBuffer, dict(nbytes=64, stream=None, pool=None), {
        "nbytes": (st.one_of(NOT_INT, NEGATIVE), "nbytes"), "stream": (STREAM_BAD.filter(lambda v: v is not None), "stream"),
        "pool": (st.one_of(st.floats(), st.text(max_size=2), NEGATIVE, st.just(0)), "pool"),
    }),
    "HostBuffer": (cg.HostBuffer, dict(nbytes=64), {"nbytes": (st.one_of(NOT_INT, NEGATIVE), "nbytes")}),
    "capture": (cg.capture, dict(stream=1234, mode="thread_local", allocator="pool"), {
        "stream": (st.one_of(STREAM_BAD, st.sampled_from([0, 1, 2])), "stream"),
        "mode": (NAME_BAD, "mode"), "allocator": (NAME_BAD, "allocator"),
    }),
    "Graph": (cg.Graph, dict(handle=None), {"handle": (st.one_of(NOT_INT.filter(lambda v: v is not None),
                                                                 st.integers(-5, 0)), "handle")}),
    "GraphExec": (cg.GraphExec, dict(graph=None), {"graph": (ANY, "graph")}),
    "normalize_buckets": (cg.normalize_buckets, dict(buckets=[4, 8]), {
        "buckets": (st.one_of(st.text(min_size=1, max_size=3), st.lists(NOT_INT, min_size=1, max_size=3),
                              st.integers(), st.just(()), st.lists(st.integers(-3, 0), min_size=1)), "buckets"),
    }),
    "pick_bucket": (cg.pick_bucket, dict(buckets=(4, 8), n=3), {
        "buckets": (st.one_of(ANY, st.just((8, 4)), st.just(()), st.just((0, 4))), "buckets"),
        "n": (st.one_of(NOT_INT, NEGATIVE), "n"),
    }),
    "copy_async": (cg.copy_async, dict(dst=0x1000, src=0x2000, nbytes=16, stream=1234), {
        "nbytes": (st.one_of(NOT_INT, NEGATIVE), "nbytes"), "stream": (STREAM_BAD, "stream"),
        "dst": (st.one_of(st.none(), st.booleans(), st.text(max_size=2), st.floats()), "dst"),
    }),
    "memset_async": (cg.memset_async, dict(dst=0x1000, value=0, nbytes=16, stream=1234), {
        "value": (st.one_of(NOT_INT, NEGATIVE, st.integers(256, 10_000)), "value"),
        "nbytes": (st.one_of(NOT_INT, NEGATIVE), "nbytes"), "stream": (STREAM_BAD, "stream"),
    }),
    "device_info": (cg.device_info, dict(device=None), {"device": (st.one_of(NEGATIVE, st.floats(), st.text(max_size=2)), "device")}),
    "graph_memory": (cg.graph_memory, dict(device=None), {"device": (st.one_of(NEGATIVE, st.floats(), st.text(max_size=2)), "device")}),
}
VALID_RESULTS = (cg.CudaUnavailableError,)   # no GPU: valid arguments reach the CUDA check


def _close(obj):
    close = getattr(obj, "close", None)
    if callable(close):
        close()


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_wrong_argument_is_refused_naming_it(name, data):
    fn, valid, wrong = CASES[name]
    arg = data.draw(st.sampled_from(sorted(wrong)), label="argument")
    strategy, word = wrong[arg]
    value = data.draw(strategy, label=arg)
    kwargs = dict(valid, **{arg: value})
    try:
        out = fn(**kwargs)
    except (TypeError, ValueError) as exc:
        assert word in str(exc), f"{name}({arg}={value!r}): {type(exc).__name__}: {exc}"
        return
    except cg.CudaUnavailableError as exc:
        raise AssertionError(f"{name}({arg}={value!r}) was not refused before the CUDA check: {exc}")
    _close(out)
    raise AssertionError(f"{name}({arg}={value!r}) was accepted")


# GraphExec needs a captured Graph; the copy/memset cases' addresses and stream are made up, fit
# only for a machine without a device (where the call stops at the missing driver)
_VALID_CASES = sorted(n for n in CASES if n != "GraphExec"
                      and not (n in ("copy_async", "memset_async") and cg.is_available()))


@pytest.mark.parametrize("name", _VALID_CASES)
def test_the_valid_arguments_pass_the_checks(name):
    fn, valid, _ = CASES[name]
    try:
        _close(fn(**valid))
    except VALID_RESULTS:
        pass
