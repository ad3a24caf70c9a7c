"""Full attention: the one-token decode kernels (`decode`) and the chunked prefill kernels (`prefill`)."""
from .decode import *  # noqa: F401,F403
from .prefill import *  # noqa: F401,F403
