"""GraphHandle's input validation (cugraph_rt.validation.validate_call, the function the handle runs
before copying a call's inputs) and bucket logic, tested under their own names without a GPU."""
import pytest
import torch

import cugraph_rt as cg
from cugraph_rt.buckets import capture_order, normalize_buckets, pad_copy_geometry, pick_bucket
from cugraph_rt.validation import InputSpec, as_spec, validate_call

SPECS = {"x": InputSpec((4, 8), torch.float32), "tok": InputSpec((1,), torch.int64)}


def good():
    return {"x": torch.zeros(4, 8), "tok": torch.zeros(1, dtype=torch.int64)}


class FakeCuda:
    """A tensor-like on a given cuda device (no GPU needed)."""

    def __init__(self, t, index):
        self._t = t
        self.shape, self.dtype = t.shape, t.dtype
        self.device = torch.device("cuda", index)

    def is_contiguous(self):
        return True


def test_valid_call_passes():
    assert validate_call(SPECS, good(), device_index=0) is None


def _with(**changes):
    given = good()
    for k, v in changes.items():
        if v is None:
            del given[k]
        else:
            given[k] = v
    return given


# The one owner of the refusal cases on the CPU: validate_call is what GraphHandle.__call__ runs
# before copying anything (tests/gpu/test_reliability_handle.py refuses the same on a real handle,
# in every phase, and checks the handle unchanged).
@pytest.mark.parametrize("given,exc,needle", [
    (_with(x=torch.zeros(4, 9)), cg.InputError, "input 'x': expected shape (4, 8); given (4, 9)"),
    (_with(x=torch.zeros(4)), cg.InputError, "input 'x': expected shape (4, 8); given (4,)"),
    (_with(x=torch.zeros(4, 8, dtype=torch.float64)), cg.InputTypeError,
     "input 'x': expected dtype torch.float32; given torch.float64"),
    (_with(tok=torch.zeros(1, dtype=torch.int32)), cg.InputTypeError,
     "input 'tok': expected dtype torch.int64; given torch.int32"),
    (_with(x=torch.zeros(8, 4).t()), cg.InputError,
     "input 'x': expected a contiguous array; given strides (1, 4) for shape (4, 8)"),
    (_with(x=torch.zeros(4, 8, device="meta")), cg.InputError,
     "input 'x': expected an array on cpu or cuda:0; given one on meta"),
    (_with(x=FakeCuda(torch.zeros(4, 8), 1)), cg.InputError, "expected an array on cpu or cuda:0; given one on cuda:1"),
    (_with(tok=[1]), cg.InputTypeError, "input 'tok': expected a tensor; got list"),
    (_with(tok=None), cg.InputTypeError, "missing ['tok'], unexpected []"),
    (_with(z=torch.zeros(1)), cg.InputTypeError, "missing [], unexpected ['z']"),
])
def test_refused_calls_name_expected_and_given(given, exc, needle):
    with pytest.raises(cg.InputError) as info:
        validate_call(SPECS, given, device_index=0)
    assert type(info.value) is exc
    assert needle in str(info.value), str(info.value)


def test_names_missing_and_unexpected_together():
    with pytest.raises(cg.InputTypeError) as info:
        validate_call(SPECS, _with(tok=None, y=torch.zeros(1)), device_index=0)
    msg = str(info.value)
    assert "missing ['tok']" in msg and "unexpected ['y']" in msg and "expected exactly ['tok', 'x']" in msg


def test_device_index_is_the_handles():
    validate_call(SPECS, _with(x=FakeCuda(torch.zeros(4, 8), 0)), device_index=0)
    validate_call(SPECS, _with(x=FakeCuda(torch.zeros(4, 8), 1)), device_index=1)
    with pytest.raises(cg.InputError, match="cuda:1; given one on cuda:0"):
        validate_call(SPECS, _with(x=FakeCuda(torch.zeros(4, 8), 0)), device_index=1)


def test_error_types():
    assert issubclass(cg.InputError, ValueError) and issubclass(cg.InputError, cg.CugraphRtError)
    assert issubclass(cg.InputTypeError, TypeError) and issubclass(cg.InputTypeError, cg.InputError)


def test_buckets_size_and_consistency():
    specs = {"x": InputSpec((16, 8), torch.float32), "m": InputSpec((16,), torch.bool)}
    bk = (4, 8, 16)
    n = validate_call(specs, {"x": torch.zeros(5, 8), "m": torch.zeros(5, dtype=torch.bool)},
                      device_index=0, buckets=bk, bucket_dim=0)
    assert n == 5 and pick_bucket(bk, n) == 8
    with pytest.raises(ValueError, match="differs"):
        validate_call(specs, {"x": torch.zeros(5, 8), "m": torch.zeros(6, dtype=torch.bool)},
                      device_index=0, buckets=bk, bucket_dim=0)
    with pytest.raises(ValueError, match=r"expected shape \(n, 8\)"):
        validate_call(specs, {"x": torch.zeros(5, 7), "m": torch.zeros(5, dtype=torch.bool)},
                      device_index=0, buckets=bk, bucket_dim=0)


def test_as_spec_forms():
    assert as_spec("a", torch.zeros(2, 3)) == InputSpec((2, 3), torch.float32)
    assert as_spec("a", ((2,), "bfloat16")) == InputSpec((2,), torch.bfloat16)
    assert as_spec("a", InputSpec((1,), "int32")).dtype is torch.int32
    with pytest.raises(TypeError, match="input 'a'"):
        as_spec("a", 3)
    with pytest.raises(TypeError, match="unknown dtype"):
        as_spec("a", ((2,), "float5"))


def test_bucket_helpers():
    assert normalize_buckets([16, 4, 8, 8]) == (4, 8, 16)
    assert normalize_buckets(None) is None
    with pytest.raises(ValueError):
        normalize_buckets([])
    with pytest.raises(ValueError):
        normalize_buckets([0, 4])
    assert pick_bucket((4, 8, 16), 1) == 4
    assert pick_bucket((4, 8, 16), 8) == 8
    assert pick_bucket((4, 8, 16), 17) is None
    assert capture_order((4, 8, 16)) == [16, 8, 4]


def test_pad_geometry():
    g = pad_copy_geometry((16, 8), 0, 5, 4)
    assert (g.rows, g.width, g.dst_pitch, g.pad_bytes) == (1, 5 * 8 * 4, 16 * 8 * 4, 11 * 8 * 4)
    g = pad_copy_geometry((3, 16, 2), 1, 5, 2)
    assert (g.rows, g.width, g.dst_pitch, g.pad_bytes) == (3, 20, 64, 44)
    with pytest.raises(ValueError):
        pad_copy_geometry((3, 16), 1, 17, 4)


def test_handle_argument_errors_come_before_cuda():
    # argument errors are raised before any CUDA call, so they show without a GPU too
    x = {"x": torch.zeros(1)}
    with pytest.raises(TypeError, match="callable"):
        cg.GraphHandle(3, x)
    with pytest.raises(ValueError, match="allocator"):
        cg.GraphHandle(lambda x: x, x, allocator="malloc")
    with pytest.raises(ValueError, match="bucket_dim"):
        cg.GraphHandle(lambda x: x, {"x": torch.zeros(4)}, buckets=[2, 4], bucket_dim=1)
    with pytest.raises(ValueError, match="warmup"):
        cg.GraphHandle(lambda x: x, x, warmup=-1)
    with pytest.raises(ValueError, match=r"warmup must be an int >= 0 .*capture=False.*None"):
        cg.GraphHandle(lambda x: x, x, warmup=None)
    with pytest.raises(ValueError, match="capture mode"):
        cg.GraphHandle(lambda x: x, x, capture_mode="sometimes")
    with pytest.raises(TypeError, match="buckets"):
        cg.GraphHandle(lambda x: x, x, buckets="big")
    with pytest.raises(ValueError, match="InputSpec shape must be non-negative"):
        InputSpec((-1, 4), torch.float32)
