"""Shared by the property tests (validate_call on the CPU, a real GraphHandle on the GPU): a
row-wise step, its input specs, the acceptance oracle and (where hypothesis is installed) a
strategy of mostly-valid calls."""
import torch

from cugraph_rt.validation import InputSpec


def rowwise(x, tok):
    """Row-independent along dim 0, so padding rows cannot change real rows."""
    return torch.tanh(x) * 2 + tok.to(x.dtype).unsqueeze(-1)


SPEC = {"x": InputSpec((8, 4), torch.float32), "tok": InputSpec((8,), torch.int64)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int32, torch.bool]


def _tensor(shape, dtype, contiguous):
    if len(shape) == 2 and not contiguous and shape[0] > 1 and shape[1] > 1:
        return torch.randn(shape[1], shape[0]).to(dtype).t()
    return (torch.randn(shape) * 3).to(dtype)


def _acceptable(given, buckets):
    if set(given) != set(SPEC):
        return False
    sizes = set()
    for name, spec in SPEC.items():
        t = given[name]
        if t.dtype != spec.dtype or t.dim() != len(spec.shape) or not t.is_contiguous():
            return False
        if buckets:
            if tuple(t.shape[1:]) != spec.shape[1:]:
                return False
            sizes.add(t.shape[0])
        elif tuple(t.shape) != spec.shape:
            return False
    return len(sizes) <= 1


try:
    from hypothesis import strategies as st
except ImportError:   # the property tests skip themselves
    st = None

if st is not None:
    @st.composite
    def calls(draw, bucket_sizes):
        """Mostly-valid calls with one or two things wrong: names, dtypes, shapes, layout."""
        n = draw(st.integers(0, 12))
        given = {}
        for name, spec in SPEC.items():
            shape = list(spec.shape)
            if bucket_sizes:
                shape[0] = n
            mutate = draw(st.sampled_from(["ok", "ok", "ok", "shape", "rank", "dtype", "layout"]))
            dtype = spec.dtype
            contiguous = True
            if mutate == "shape":
                i = draw(st.integers(0, len(shape) - 1))
                shape[i] = draw(st.integers(0, 10))
            elif mutate == "rank":
                shape = shape + [draw(st.integers(1, 3))] if draw(st.booleans()) else shape[:-1]
            elif mutate == "dtype":
                dtype = draw(st.sampled_from(DTYPES))
            elif mutate == "layout":
                contiguous = False
            given[name] = _tensor(tuple(shape), dtype, contiguous)
        names = draw(st.sampled_from(["ok"] * 6 + ["drop", "extra"]))
        if names == "drop":
            given.pop(draw(st.sampled_from(sorted(given))))
        elif names == "extra":
            given["y"] = torch.zeros(1)
        return given
