"""int4 weights: the format (format.py, docs/int4.md), the quantizers (quantizers.py), the
checkpoint's quantization_config (qconfig.py), reading (reader.py) and writing (writer.py), the
decoder's int4 layout (layout.py), building one in place (build.py; on_load.py quantizes while a
bf16 checkpoint loads), the bytes a decode step reads (cost.py) and the command lines' flags (cli.py)."""
from .format import (BITS, CODES_PER_WORD, DEFAULT_GROUP_SIZE, GROUP_SIZES, QMAX, SCALE_DTYPES,  # noqa: F401
                     QuantizedLinear, check_group_size, check_groupable, pack_int4, unpack_int4)
from .qconfig import QuantizationConfig, is_linear  # noqa: F401
from .quantizers import METHODS, quantize, relative_error  # noqa: F401
from .reader import load_int4_checkpoint, read_int4, read_quantization_config  # noqa: F401
from .writer import quantize_checkpoint, quantize_rows  # noqa: F401
from .layout import (check_decoder_weights, dequantize_weights, int4_fields, is_int4_field,  # noqa: F401
                     load_int4_weights, map_weights, quantize_weights)
from .build import empty_int4_weights, quantize_into, random_int4_weights  # noqa: F401
