"""Input specs and call validation for GraphHandle (pure logic, testable without a GPU).

A rejected call raises before anything is copied, so it changes nothing. Arrays are described by
the handle's framework adapter (cugraph_rt.framework); without one they are duck-typed (``shape``,
``dtype``, ``device``, ``is_contiguous()``), as torch tensors are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError, InputTypeError
from .framework import ArrayDesc

__all__ = ["InputSpec", "as_spec", "validate_call"]


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"InputSpec shape must be a sequence of non-negative ints; got {shape!r}")
    dims = []
    for s in shape:
        if isinstance(s, bool) or not hasattr(s, "__index__"):
            raise TypeError(f"InputSpec shape must be a sequence of non-negative ints; got "
                            f"{shape!r} (element {s!r})")
        dims.append(s.__index__())
    if any(s < 0 for s in dims):
        raise ValueError(f"InputSpec shape must be non-negative; got {tuple(dims)}")
    return tuple(dims)


def _check_dtype(dtype) -> None:
    """A dtype of any framework: a name, a dtype object (it has an itemsize), or a scalar type."""
    if isinstance(dtype, str) or isinstance(dtype, type) or hasattr(dtype, "itemsize"):
        if isinstance(dtype, str) and not dtype:
            raise ValueError("InputSpec dtype must not be an empty name")
        return
    raise TypeError(f"InputSpec dtype must be a dtype (e.g. torch.float32, numpy.float32) or its "
                    f"name; got {dtype!r}")


@dataclass(frozen=True)
class InputSpec:
    """Shape and dtype of one static input (it lives on the handle's device)."""
    shape: tuple[int, ...]
    dtype: Any

    def __post_init__(self):
        object.__setattr__(self, "shape", _check_shape(self.shape))
        _check_dtype(self.dtype)


def _resolve_dtype(dtype, adapter=None):
    if adapter is not None:
        return adapter.resolve_dtype(dtype)
    if isinstance(dtype, str):   # no adapter: names are torch's (the default framework)
        import torch
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise TypeError(f"unknown dtype name {dtype!r}")
        return resolved
    return dtype


def as_spec(name: str, value, adapter=None) -> InputSpec:
    """An InputSpec from an array (its shape and dtype), an InputSpec, or (shape, dtype)."""
    try:
        if isinstance(value, InputSpec):
            return InputSpec(value.shape, _resolve_dtype(value.dtype, adapter))
        desc = adapter.describe(value) if adapter is not None else None
        if desc is not None:
            return InputSpec(desc.shape, desc.dtype)
        if adapter is None and hasattr(value, "shape") and hasattr(value, "dtype"):
            return InputSpec(tuple(value.shape), value.dtype)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return InputSpec(value[0], _resolve_dtype(value[1], adapter))
    except (TypeError, ValueError) as exc:   # say which input
        raise type(exc)(f"input {name!r}: {exc}") from None
    what = adapter.array_word if adapter is not None else "a tensor"
    raise TypeError(f"input {name!r}: expected {what}, an InputSpec or (shape, dtype); "
                    f"got {type(value).__name__}")


def _duck_describe(t) -> ArrayDesc | None:
    """A torch-like tensor described without importing its framework."""
    if not (hasattr(t, "shape") and hasattr(t, "dtype") and hasattr(t, "device")
            and hasattr(t, "is_contiguous")):
        return None
    dev = t.device
    return ArrayDesc(tuple(t.shape), t.dtype, getattr(dev, "type", str(dev)),
                     getattr(dev, "index", None), bool(t.is_contiguous()),
                     tuple(t.stride()) if hasattr(t, "stride") else None, str(dev))


def validate_call(specs: dict[str, InputSpec], given: dict, *, device_index: int,
                  buckets: tuple[int, ...] | None = None, bucket_dim: int = 0,
                  bucketed: frozenset | None = None, adapter=None) -> int | None:
    """Check a call's inputs against the specs; return the size along ``bucket_dim`` (None
    without buckets). With buckets, the inputs named in ``bucketed`` (all when None) may be any
    size n <= the largest bucket along ``bucket_dim`` (the same n for all); the others keep their
    exact shape. Raises InputTypeError (names, types, dtypes; a TypeError) or InputError
    (shape, device, contiguity; a ValueError) naming what was expected and what was given."""
    if given.keys() != specs.keys():
        missing = sorted(specs.keys() - given.keys())
        extra = sorted(given.keys() - specs.keys())
        raise InputTypeError(f"inputs do not match: missing {missing}, unexpected {extra}; "
                             f"expected exactly {sorted(specs)}")
    describe = adapter.describe if adapter is not None else _duck_describe
    word = adapter.array_word if adapter is not None else "a tensor"
    size = None
    for name, spec in specs.items():
        t = given[name]
        d = describe(t)
        if d is None:
            raise InputTypeError(f"input {name!r}: expected {word}; got {type(t).__name__}")
        if d.dtype != spec.dtype:
            raise InputTypeError(f"input {name!r}: expected dtype {spec.dtype}; given {d.dtype}")
        placed = d.kind == "cpu" or (d.kind == "cuda" and
                                     (d.index is None or d.index == device_index))
        if not placed:
            raise InputError(f"input {name!r}: expected an array on cpu or cuda:{device_index}; "
                             f"given one on {d.where}")
        shape = d.shape
        if buckets is None or (bucketed is not None and name not in bucketed):
            if shape != spec.shape:
                raise InputError(f"input {name!r}: expected shape {spec.shape}; given {shape}")
        else:
            k = bucket_dim
            if len(shape) != len(spec.shape) or shape[:k] + shape[k + 1:] != \
                    spec.shape[:k] + spec.shape[k + 1:]:
                want = list(spec.shape)
                want[k] = "n"
                raise InputError(f"input {name!r}: expected shape ({', '.join(map(str, want))}) "
                                 f"with n <= {buckets[-1]} padded to a bucket in {list(buckets)}"
                                 f" (or eager above); given {shape}")
            if size is None:
                size = shape[k]
            elif shape[k] != size:
                raise InputError(f"input {name!r}: size {shape[k]} along bucket dim {k} differs "
                                 f"from the other inputs' {size}")
        if not d.contiguous:
            stride = d.strides if d.strides is not None else "?"
            raise InputError(f"input {name!r}: expected a contiguous array; given strides "
                             f"{stride} for shape {shape} (call .contiguous())")
    return size
