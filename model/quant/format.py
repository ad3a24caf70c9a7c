"""The int4 weight format: group-wise asymmetric 4-bit codes packed eight to an int32 along K.

A linear weight W [..., N, K] (rows = outputs, K = inputs, as torch and transformers hold it) is
stored as three tensors (docs/int4.md has the full description):

- `qweight` int32 [..., N, K // 8]: word j of a row holds the codes of columns 8j .. 8j+7, the code
  of column 8j+i in bits 4i .. 4i+3 (column 8j in the low nibble). Packing along K keeps each row
  contiguous like the bf16 layout, and since a group is a multiple of 8 columns every word lies in
  one group: a GEMV kernel loads [BLOCK_N, BLOCK_K // 8] words, shifts by 4*i and masks with 0xF.
- `scales`, `zeros` [..., N, K // group_size], floating (the model dtype or fp16), one pair per
  group of `group_size` consecutive input columns.

Dequantization: w = (q - z) * s, computed in fp32 and rounded to the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = 4
QMAX = (1 << BITS) - 1            # codes are 0 .. 15
CODES_PER_WORD = 32 // BITS       # 8 codes in one int32
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SHIFTS = tuple(BITS * i for i in range(CODES_PER_WORD))


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__} {group_size!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; use one of {list(GROUP_SIZES)}")
    return group_size


def check_groupable(shape, group_size: int, name: str = "weight") -> None:
    """Refuse a weight whose K (last dim) is not a whole number of groups."""
    check_group_size(group_size)
    if len(shape) < 2:
        raise ValueError(f"{name}: int4 quantization needs a [..., N, K] weight, got shape {list(shape)}")
    K = shape[-1]
    if K % group_size:
        raise ValueError(f"{name}: K={K} (shape {list(shape)}) is not a multiple of group_size={group_size}; "
                         f"int4 groups run along K, so K must be a whole number of groups "
                         + (f"(choose a group size from {fits} or keep this tensor in the model dtype)"
                            if (fits := [g for g in GROUP_SIZES if K % g == 0]) else
                            f"(no group size of {list(GROUP_SIZES)} divides it: this model cannot be int4)"))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] (integers in 0..15) -> int32 [..., K // 8], eight codes per word along K."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_int4 takes integer codes, got {codes.dtype}")
    K = codes.shape[-1]
    if K % CODES_PER_WORD:
        raise ValueError(f"pack_int4: K={K} is not a multiple of {CODES_PER_WORD}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > QMAX):
        raise ValueError(f"pack_int4: codes must lie in [0, {QMAX}], got [{int(c.min())}, {int(c.max())}]")
    c = c.reshape(*codes.shape[:-1], K // CODES_PER_WORD, CODES_PER_WORD)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=codes.device)
    word = (c << shifts).sum(-1)                       # 0 .. 2^32 - 1
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)   # the same 32 bits as a signed int32
    return word.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [..., K // 8] -> uint8 codes [..., K] (the inverse of pack_int4)."""
    if qweight.dtype != torch.int32:
        raise TypeError(f"unpack_int4 takes int32 words, got {qweight.dtype}")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=qweight.device)
    # arithmetic shift on int32 then the mask: what a Triton kernel does with the same words
    c = (qweight.unsqueeze(-1) >> shifts) & QMAX
    return c.reshape(*qweight.shape[:-1], qweight.shape[-1] * CODES_PER_WORD).to(torch.uint8)


@dataclass
class QuantizedLinear:
    """One int4 linear weight of logical shape `shape` = (..., N, K) (leading dims: e.g. experts).

    qweight int32 [..., N, K // 8]; scales and zeros [..., N, K // group_size], same floating dtype,
    same device. Checked on construction; a mismatch names `name` and the tensor."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    shape: tuple
    name: str = "weight"

    def __post_init__(self):
        n = self.name
        self.shape = tuple(int(d) for d in self.shape)
        check_groupable(self.shape, self.group_size, n)
        for attr in ("qweight", "scales", "zeros"):
            t = getattr(self, attr)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{n}.{attr} must be a torch.Tensor, got {type(t).__name__}")
        if self.qweight.dtype != torch.int32:
            raise TypeError(f"{n}.qweight must be int32 (eight 4-bit codes per word), got {self.qweight.dtype}")
        want_q = (*self.shape[:-1], self.shape[-1] // CODES_PER_WORD)
        if tuple(self.qweight.shape) != want_q:
            raise ValueError(f"{n}.qweight has shape {list(self.qweight.shape)}, expected {list(want_q)} "
                             f"for a {list(self.shape)} weight")
        want_s = (*self.shape[:-1], self.shape[-1] // self.group_size)
        for attr in ("scales", "zeros"):
            t = getattr(self, attr)
            if t.dtype not in SCALE_DTYPES:
                raise TypeError(f"{n}.{attr} must be one of {[str(d) for d in SCALE_DTYPES]}, got {t.dtype}")
            if tuple(t.shape) != want_s:
                raise ValueError(f"{n}.{attr} has shape {list(t.shape)}, expected {list(want_s)} for a "
                                 f"{list(self.shape)} weight with group_size={self.group_size}")
        if self.zeros.dtype != self.scales.dtype:
            raise TypeError(f"{n}.zeros is {self.zeros.dtype} but {n}.scales is {self.scales.dtype}; they must match")
        devs = {self.qweight.device, self.scales.device, self.zeros.device}
        if len(devs) != 1:
            raise ValueError(f"{n}: qweight, scales and zeros are on different devices {sorted(map(str, devs))}")

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def codes(self) -> torch.Tensor:
        """The 4-bit codes as uint8 [..., N, K]."""
        return unpack_int4(self.qweight)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reference: w = (q - z) * s in fp32, rounded to `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dequantize: dtype must be a floating torch.dtype, got {dtype!r}")
        G = self.group_size
        q = self.codes().to(torch.float32).unflatten(-1, (-1, G))
        s = self.scales.to(torch.float32).unsqueeze(-1)
        z = self.zeros.to(torch.float32).unsqueeze(-1)
        return ((q - z) * s).flatten(-2).to(dtype)

    def to(self, device) -> "QuantizedLinear":
        return QuantizedLinear(self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
                               self.group_size, self.shape, self.name)
