"""Reading a Hugging Face JSON file field by field, each one type- and range-checked before use.

A config written by hand or by another tool can hold anything: `[]` instead of an object,
`"four"` for a layer count, `"default"` for the rope parameters, a zero interval. Every such value
is a ConfigError naming the file and the field (dotted for nested ones: `rope_parameters.rope_theta`),
the value given and what was expected, instead of an AttributeError or a ZeroDivisionError later.
"""
from __future__ import annotations

import json
import math
import os

MISSING = object()
INT_MAX = 2 ** 31 - 1       # shapes and ids index tensors with 32-bit offsets in the kernels


class ConfigError(ValueError):
    """A Hugging Face config this decoder cannot honour: not JSON, not an object, a field of the
    wrong type or out of range, an unknown field (named), a missing or unsupported one."""


def describe(value) -> str:
    """A value as a JSON reader sees it: `'four' (a string)`, `[] (a list)`."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def load_json_object(path, what: str = "file") -> dict:
    """The JSON object in `path`; a file that is not UTF-8 JSON, or holds something other than an
    object, is a ConfigError naming it."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                          f"the {what} is corrupt or was not downloaded completely") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          f"the {what} is corrupt") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object {{...}}, it holds {describe(data)}")
    return data


class FieldReader:
    """Typed access to one JSON object's fields; `used` collects the names read."""

    def __init__(self, data: dict, where: str, prefix: str = ""):
        self.data, self.where, self.prefix = data, where, prefix
        self.used: set = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: field {self.prefix + key!r} {message}")

    def unsupported(self, key: str, value, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}={value!r} (field {self.prefix + key!r}) is not supported ({why})")

    def raw(self, key: str, default=MISSING):
        """The value, or `default` where absent or null; a required field missing is an error."""
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if default is MISSING:
                raise self.error(key, "is required and missing")
            return default
        return value

    def int(self, key: str, default=MISSING, *, lo: int = 1, hi: int = INT_MAX):
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.error(key, f"must be an integer in [{lo}, {hi}], got {describe(value)}")
        return value

    def number(self, key: str, default=MISSING, *, lo: float, hi: float = math.inf,
               lo_open: bool = False, hi_open: bool = False) -> float:
        value = self.raw(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
            raise self.error(key, f"must be a finite number in {span}, got {describe(value)}")
        return float(value)

    def bool(self, key: str, default=MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {describe(value)}")
        return value

    def str(self, key: str, default=MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {describe(value)}")
        return value

    def object(self, key: str) -> "FieldReader | None":
        """A nested object's reader (None where absent or null)."""
        value = self.raw(key, None)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"must be an object {{...}} or null, got {describe(value)}")
        return FieldReader(value, self.where, f"{self.prefix}{key}.")

    def token_ids(self, key: str, vocab_size: int):
        """null, one id, or a non-empty list of ids, each in [0, vocab_size): None, int or tuple."""
        value = self.raw(key, None)
        if value is None:
            return None
        ids = value if isinstance(value, list) else [value]
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                              for t in ids):
            raise self.error(key, f"must be a token id or a non-empty list of token ids in "
                                  f"[0, vocab_size={vocab_size}), got {describe(value)}")
        return tuple(ids) if isinstance(value, list) else value

    def string_list(self, key: str, allowed: tuple, min_len: int):
        """A list of at least `min_len` strings, each one of `allowed` (None where absent)."""
        value = self.raw(key, None)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) < min_len:
            raise self.error(key, f"must be a list of at least {min_len} entries (one per layer), "
                                  f"got {describe(value)}")
        for i, item in enumerate(value):
            if item not in allowed:
                raise ConfigError(f"{self.where}: field {self.prefix + key!r}[{i}] is {describe(item)}, "
                                  f"expected one of {list(allowed)}")
        return value
