"""int4 weights: the format (format.py, docs/int4.md), the quantizers (quantizers.py)."""
from .format import (BITS, CODES_PER_WORD, DEFAULT_GROUP_SIZE, GROUP_SIZES, QMAX, SCALE_DTYPES,  # noqa: F401
                     QuantizedLinear, check_group_size, check_groupable, pack_int4, unpack_int4)
from .quantizers import METHODS, quantize, relative_error  # noqa: F401
