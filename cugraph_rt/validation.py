"""Input specs and call validation for GraphHandle (pure logic, testable without a GPU).

A rejected call raises before anything is copied, so it changes nothing. Tensors are duck-typed
(``shape``, ``dtype``, ``device``, ``is_contiguous()``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError, InputTypeError

__all__ = ["InputSpec", "as_spec", "validate_call"]


@dataclass(frozen=True)
class InputSpec:
    """Shape and dtype of one static input (it lives on the handle's device)."""
    shape: tuple[int, ...]
    dtype: Any

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"InputSpec shape must be non-negative; got {shape}")
        object.__setattr__(self, "shape", shape)


def _resolve_dtype(dtype):
    if isinstance(dtype, str):
        import torch
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise TypeError(f"unknown dtype name {dtype!r}")
        return resolved
    return dtype


def as_spec(name: str, value) -> InputSpec:
    """An InputSpec from a tensor (its shape and dtype), an InputSpec, or (shape, dtype)."""
    if isinstance(value, InputSpec):
        return InputSpec(value.shape, _resolve_dtype(value.dtype))
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return InputSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return InputSpec(tuple(value[0]), _resolve_dtype(value[1]))
    raise TypeError(f"input {name!r}: expected a tensor, an InputSpec or (shape, dtype); "
                    f"got {type(value).__name__}")


def _describe_device(dev) -> str:
    return str(dev)


def validate_call(specs: dict[str, InputSpec], given: dict, *, device_index: int,
                  buckets: tuple[int, ...] | None = None, bucket_dim: int = 0,
                  bucketed: frozenset | None = None) -> int | None:
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
    size = None
    for name, spec in specs.items():
        t = given[name]
        if not (hasattr(t, "shape") and hasattr(t, "dtype") and hasattr(t, "device")):
            raise InputTypeError(f"input {name!r}: expected a tensor; got {type(t).__name__}")
        if t.dtype != spec.dtype:
            raise InputTypeError(f"input {name!r}: expected dtype {spec.dtype}; given {t.dtype}")
        dev = t.device
        dtype_ok = dev.type == "cpu" or (dev.type == "cuda" and
                                         (dev.index is None or dev.index == device_index))
        if not dtype_ok:
            raise InputError(f"input {name!r}: expected a tensor on cpu or cuda:{device_index}; "
                             f"given one on {_describe_device(dev)}")
        shape = tuple(t.shape)
        if buckets is None or (bucketed is not None and name not in bucketed):
            if shape != spec.shape:
                raise InputError(f"input {name!r}: expected shape {spec.shape}; given {shape}")
        else:
            d = bucket_dim
            if len(shape) != len(spec.shape) or shape[:d] + shape[d + 1:] != \
                    spec.shape[:d] + spec.shape[d + 1:]:
                want = list(spec.shape)
                want[d] = "n"
                raise InputError(f"input {name!r}: expected shape ({', '.join(map(str, want))}) "
                                 f"with n <= {buckets[-1]} padded to a bucket in {list(buckets)}"
                                 f" (or eager above); given {shape}")
            if size is None:
                size = shape[d]
            elif shape[d] != size:
                raise InputError(f"input {name!r}: size {shape[d]} along bucket dim {d} differs "
                                 f"from the other inputs' {size}")
        if not t.is_contiguous():
            stride = tuple(t.stride()) if hasattr(t, "stride") else "?"
            raise InputError(f"input {name!r}: expected a contiguous tensor; given strides "
                             f"{stride} for shape {shape} (call .contiguous())")
    return size
