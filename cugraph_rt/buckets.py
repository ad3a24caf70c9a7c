"""Shape buckets (pure logic, testable without a GPU): one graph per bucket size along one
dimension, inputs padded up to the smallest bucket that fits, eager above the largest."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

__all__ = ["normalize_buckets", "pick_bucket", "capture_order", "PadCopy", "pad_copy_geometry"]


def normalize_buckets(buckets) -> tuple[int, ...] | None:
    """Sorted, de-duplicated positive ints, or None for no buckets. ``buckets`` must be None or
    an iterable of ints (numpy ints too; not bools, floats or a string)."""
    if buckets is None:
        return None
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
        raise TypeError(f"buckets must be None or an iterable of positive ints; got {buckets!r}")
    sizes = set()
    for b in buckets:
        if isinstance(b, bool) or not hasattr(b, "__index__"):
            raise TypeError(f"buckets must be None or an iterable of positive ints; got "
                            f"{buckets!r} (element {b!r})")
        sizes.add(b.__index__())
    if not sizes:
        raise ValueError("buckets must not be empty (pass None for no buckets)")
    ordered = tuple(sorted(sizes))
    if ordered[0] <= 0:
        raise ValueError(f"bucket sizes must be positive; got buckets {list(ordered)}")
    return ordered


def pick_bucket(buckets: tuple[int, ...], n: int) -> int | None:
    """The smallest bucket >= n, or None when n exceeds the largest (run eagerly). ``buckets``
    as normalize_buckets returns them; ``n`` an int >= 0."""
    if type(buckets) is not tuple or not buckets or any(
            isinstance(b, bool) or type(b) is not int or b <= 0 for b in buckets) \
            or any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise TypeError(f"buckets must be a sorted tuple of distinct positive ints (as "
                        f"normalize_buckets returns); got {buckets!r}")
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"n must be an int; got {n!r} ({type(n).__name__})")
    n = n.__index__()
    if n < 0:
        raise ValueError(f"n must be >= 0 (a size along the bucket dim); got {n}")
    return _pick(buckets, n)


def _pick(buckets: tuple[int, ...], n: int) -> int | None:
    """pick_bucket without the argument checks (GraphHandle's call path, after validation)."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def capture_order(buckets: tuple[int, ...]) -> list[int]:
    """Largest first: the smaller graphs then reuse the larger one's pool memory."""
    return sorted(buckets, reverse=True)


@dataclass(frozen=True)
class PadCopy:
    """How to copy an input of size n along ``dim`` into a static buffer of size b along it."""
    rows: int          # product of the dims before ``dim``
    width: int         # bytes copied per row (n * inner * itemsize)
    dst_pitch: int     # bytes per row in the static buffer (b * inner * itemsize)
    pad_bytes: int     # bytes of padding per row ((b - n) * inner * itemsize)

    @property
    def contiguous(self) -> bool:
        return self.rows == 1 or self.pad_bytes == 0


def pad_copy_geometry(static_shape, dim: int, n: int, itemsize: int) -> PadCopy:
    shape = tuple(static_shape)
    b = shape[dim]
    if not 0 <= n <= b:
        raise ValueError(f"size {n} along dim {dim} does not fit the bucket of {b}")
    rows = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1:])
    return PadCopy(rows=rows, width=n * inner * itemsize, dst_pitch=b * inner * itemsize,
                   pad_bytes=(b - n) * inner * itemsize)
