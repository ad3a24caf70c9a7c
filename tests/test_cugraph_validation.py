"""GraphHandle's input validation and bucket logic, exercised without a GPU."""
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


def test_names_missing_and_unexpected():
    given = good()
    del given["tok"]
    given["y"] = torch.zeros(1)
    with pytest.raises(TypeError) as info:
        validate_call(SPECS, given, device_index=0)
    msg = str(info.value)
    assert "missing ['tok']" in msg and "unexpected ['y']" in msg and "['tok', 'x']" in msg


def test_shape_names_expected_and_given():
    given = good()
    given["x"] = torch.zeros(4, 9)
    with pytest.raises(ValueError, match=r"'x': expected shape \(4, 8\); given \(4, 9\)"):
        validate_call(SPECS, given, device_index=0)


def test_dtype_names_expected_and_given():
    given = good()
    given["tok"] = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(TypeError, match="'tok': expected dtype torch.int64; given torch.int32"):
        validate_call(SPECS, given, device_index=0)


def test_device_other_gpu_rejected():
    given = good()
    given["x"] = FakeCuda(torch.zeros(4, 8), 1)
    with pytest.raises(ValueError, match="cuda:0; given one on cuda:1"):
        validate_call(SPECS, given, device_index=0)
    given["x"] = FakeCuda(torch.zeros(4, 8), 0)
    validate_call(SPECS, given, device_index=0)


def test_meta_device_rejected():
    given = good()
    given["x"] = torch.zeros(4, 8, device="meta")
    with pytest.raises(ValueError, match="meta"):
        validate_call(SPECS, given, device_index=0)


def test_non_contiguous_rejected():
    given = good()
    given["x"] = torch.zeros(8, 4).t()
    with pytest.raises(ValueError, match="contiguous"):
        validate_call(SPECS, given, device_index=0)


def test_non_tensor_rejected():
    given = good()
    given["tok"] = [1]
    with pytest.raises(TypeError, match="expected a tensor; got list"):
        validate_call(SPECS, given, device_index=0)


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
    with pytest.raises(TypeError, match="callable"):
        cg.GraphHandle(3, {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="allocator"):
        cg.GraphHandle(lambda x: x, {"x": torch.zeros(1)}, allocator="malloc")
    with pytest.raises(ValueError, match="bucket_dim"):
        cg.GraphHandle(lambda x: x, {"x": torch.zeros(4)}, buckets=[2, 4], bucket_dim=1)
    with pytest.raises(ValueError, match="warmup"):
        cg.GraphHandle(lambda x: x, {"x": torch.zeros(1)}, warmup=-1)
