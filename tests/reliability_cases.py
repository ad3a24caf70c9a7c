"""Shared by the reliability tests (CPU and GPU): GraphHandle's call path on a CPU stand-in, a
row-wise step, its input specs, the acceptance oracle and (where hypothesis is installed) a
strategy of mostly-valid calls."""
import torch

from cugraph_rt.buckets import normalize_buckets, pad_copy_geometry, pick_bucket
from cugraph_rt.validation import InputSpec, as_spec, validate_call


class CpuHandle:
    """GraphHandle.__call__ without CUDA: the same validate_call, pick_bucket and
    pad_copy_geometry; static CPU buffers stand in for the device ones, the step runs eagerly on
    them (what a replay computes), outputs are cut back to n rows."""

    def __init__(self, fn, inputs, buckets=None, bucket_dim=0):
        self.fn = fn
        self.specs = {k: as_spec(k, v) for k, v in inputs.items()}
        self.buckets = normalize_buckets(buckets)
        self.dim = bucket_dim
        self.statics = {}
        for b in (self.buckets or (None,)):
            self.statics[b] = {}
            for k, spec in self.specs.items():
                shape = list(spec.shape)
                if b is not None:
                    shape[bucket_dim] = b
                self.statics[b][k] = torch.zeros(shape, dtype=spec.dtype)

    def __call__(self, **inputs):
        n = validate_call(self.specs, inputs, device_index=0, buckets=self.buckets,
                          bucket_dim=self.dim)
        bucket = None if self.buckets is None else pick_bucket(self.buckets, n)
        if self.buckets is not None and bucket is None:
            return self.fn(**inputs)                       # eager above the largest bucket
        for k, static in self.statics[bucket].items():
            t = inputs[k]
            if n is None:
                static.copy_(t)
                continue
            g = pad_copy_geometry(static.shape, self.dim, n, static.element_size())
            flat = static.view(torch.uint8).reshape(g.rows, g.dst_pitch)
            src = t.contiguous().view(torch.uint8).reshape(g.rows, g.width)
            flat[:, :g.width] = src
            flat[:, g.width:] = 0
        out = self.fn(**self.statics[bucket])
        if n is not None and n != bucket:
            out = out.narrow(self.dim, 0, n)
        return out


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
