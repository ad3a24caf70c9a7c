"""Argument checks shared by the public constructors and functions: each names the argument."""
from __future__ import annotations


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (numpy ints too; not bool, float or str), at least ``minimum``;
    TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    value = value.__index__()
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return value
