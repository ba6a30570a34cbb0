#!/usr/bin/env bash
# The CUDA check of issue 13 on any CUDA machine, from a fresh clone, in a few minutes: installs the bundle (an
# existing CUDA torch is kept, see scripts/install.sh) and runs scripts/gpu_check.py on simulated 192x192x208 pairs.
# Usage: bash scripts/gpu_check.sh OUT [--device cpu --tiny]
# Writes OUT/gpu_check.json, OUT/gpu_check.md and OUT/logs/; exits non-zero if a step failed or gave a non-finite value.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_check.sh OUT [--device cpu --tiny]}
shift
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())" || true
bash scripts/install.sh >/dev/null
python scripts/gpu_check.py --output_dir "$out" "$@"
