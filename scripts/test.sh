#!/usr/bin/env bash
# Installs the package with its test extra and runs the whole test suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[test]"
python -m pytest -q -ra "$@"
