#!/usr/bin/env bash
# Installs the package with its test extra and runs the whole test suite (slow end-to-end tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# The tests run in TEST_WORKERS (default 2) pytest-xdist processes, each test file in one of them (its module
# fixtures built once): much of the suite is interpreter start-up, imports and file I/O of single-threaded
# subprocesses, which two processes overlap (on 2 cores: 510 s against 640-770 s in one process). TEST_WORKERS=0
# runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -m pytest -q -ra --durations=15 -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
