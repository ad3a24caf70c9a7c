#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: make (once) and activate .venv with everything the project needs.
# On a machine whose python already has torch (a GPU box), the venv sees it and nothing is fetched.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
    python -m pip install -q --upgrade pip
    # A CPU build of torch when none is present (a plain 'torch' requirement would pull a CUDA build).
    python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
    # cuda-bindings of the CUDA major version torch was built for (a CPU build of torch: either).
    cuda_major="$(python -c "import torch; print((torch.version.cuda or '').split('.')[0])")"
    case "$cuda_major" in
        12) python -m pip install -q "cuda-bindings>=12.9,<13" ;;
        13) python -m pip install -q "cuda-bindings>=13,<14" ;;
        "") ;;
        *) echo "setup.sh: torch is built for CUDA $cuda_major; cuda-bindings supports 12 and 13 here" >&2 ;;
    esac
    python -m pip install -q -e ".[test]"
    touch "$stamp"
fi
