#!/usr/bin/env bash
# Installs the bundle's package into the current Python environment.
# Usage: bash scripts/install.sh [EXTRAS]   e.g. bash scripts/install.sh test
# torch is installed first, and only when missing, so that an existing (e.g. CUDA) build is kept;
# TORCH_SPEC chooses the release to install otherwise (default: the CPU build used by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -e ".${1:+[$1]}"
