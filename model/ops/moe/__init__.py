"""Sparse MoE: router top-k and the per-row decode experts (`decode`), the grouped-GEMM prefill
experts (`grouped`)."""
from .decode import *  # noqa: F401,F403
from .grouped import *  # noqa: F401,F403
