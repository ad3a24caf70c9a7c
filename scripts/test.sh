#!/usr/bin/env bash
# Set up (once) and run the test suite. GPU tests (marker `gpu`) skip with a reason without a GPU.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m pytest -q "$@"
