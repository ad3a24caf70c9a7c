#!/usr/bin/env bash
# Set up (once) and run the test suite. GPU tests (marker `gpu`) skip with a reason without a GPU;
# -rs lists every skip with its reason. CUGRAPH_RT_REQUIRE_GPU=1 makes any skip a failure.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m pytest -q -rs "$@"
