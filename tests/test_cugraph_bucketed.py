"""Buckets with some inputs left out of the padding (`bucketed=`): validation on the CPU."""
import pytest
import torch

from cugraph_rt.validation import InputSpec, validate_call

SPECS = {"tokens": InputSpec((64,), torch.int64), "info": InputSpec((3,), torch.int64)}
BUCKETS = (16, 64)


def call(n, info_len=3):
    return {"tokens": torch.zeros(n, dtype=torch.int64), "info": torch.zeros(info_len, dtype=torch.int64)}


def test_unbucketed_input_keeps_its_shape_while_the_bucketed_one_varies():
    for n in (1, 16, 40, 64):
        assert validate_call(SPECS, call(n), device_index=0, buckets=BUCKETS, bucketed=frozenset({"tokens"})) == n


def test_unbucketed_input_of_another_shape_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"'info'.*\(3,\).*\(5,\)"):
        validate_call(SPECS, call(8, info_len=5), device_index=0, buckets=BUCKETS, bucketed=frozenset({"tokens"}))


def test_without_bucketed_every_input_must_share_the_bucket_size():
    with pytest.raises(ValueError, match="differs"):
        validate_call(SPECS, call(8), device_index=0, buckets=BUCKETS)
