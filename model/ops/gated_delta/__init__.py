"""Gated DeltaNet: the one-token decode step (`step`) and the chunked prefill form (`chunk`)."""
from .step import *  # noqa: F401,F403
from .chunk import *  # noqa: F401,F403
