"""Shared test setup: the measurement code under ``scripts/`` (``bench``) is importable, as ``scripts/benchmark.py``
makes it, without being part of the installed package."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
