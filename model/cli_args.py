"""Argument types the command lines share (model.generate, model.demo, tools/)."""
import argparse

PRESETS = ("tiny", "35b-a3b", "122b-a10b")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
