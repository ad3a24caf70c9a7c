"""Argument types the command lines share (model.generate, model.demo, tools/).

Each is an argparse `type=`: a bad value becomes argparse's usage error (exit code 2, the flag and
the value named, no traceback) while the command line is parsed, before anything is imported or
allocated.
"""
import argparse
import math

PRESETS = ("tiny", "35b-a3b", "122b-a10b")
SEED_MAX = 2 ** 63 - 1     # seeds are held in an int64 on the device


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")


def positive_int(text: str) -> int:
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def seed(text: str) -> int:
    value = _int(text, f"an integer seed in [0, {SEED_MAX}]")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63 - 1 = {SEED_MAX}] (it is held in "
                                         f"a signed 64-bit integer), got {value}")
    return value


def positive_int_list(text: str) -> list:
    """'1,2,4' -> [1, 2, 4]: comma-separated positive integers, at least one."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def finite_float(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False, what: str = ""):
    """A type accepting finite floats in the interval (brackets as given); nan and inf never pass."""
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
    expected = f"a finite number in {span}" + (f" ({what})" if what else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) \
            and (value < hi if hi_open else value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = "number"   # argparse names the type in some messages
    return parse


QUANT_CHOICES = ("none", "int4", "int4-dequant")
DEFAULT_GROUP_SIZE = 128


def add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=QUANT_CHOICES, default="none",
                   help="int4: int4 weights through the int4 kernels (a bf16 checkpoint or preset quantized "
                        "with HQQ as it is built); int4-dequant: the same int4 model dequantized to the model "
                        "dtype, through the bf16 kernels (the reference). An int4 checkpoint is int4 already.")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help=f"int4 group size when quantizing (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--lm-head", choices=("bf16", "int4"), default=None,
                   help="the lm_head's format when quantizing (default bf16: kept in the model dtype)")
    p.add_argument("--quant-method", choices=("hqq", "rtn"), default=None,
                   help="the quantizer when quantizing (default hqq; rtn: round-to-nearest, faster to build)")


def sampling_params(args, error):
    """SamplingParams from --temperature/--top-k/--top-p/--seed; error(message) (argparse's: exit 2)
    names the bad value."""
    from model.generation import SamplingParams

    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        error(str(e))
