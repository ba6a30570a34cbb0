#!/usr/bin/env bash
# Installs the package with its test extra and runs the whole test suite (slow end-to-end tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -m pytest -q -ra --durations=15 "$@"
