#!/usr/bin/env bash
# Set up (once) and run the demo: graph-captured Qwen3.5-MoE decode on the GPU, or, with no GPU,
# an explanation and the same decode on the CPU reference path.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m model.demo "$@"
