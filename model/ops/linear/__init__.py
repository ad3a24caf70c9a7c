"""Projections: the batch-1..16 decode GEMV and its fused-norm form (`gemv`)."""
from .gemv import *  # noqa: F401,F403
