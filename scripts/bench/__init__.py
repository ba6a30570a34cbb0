"""Measurement code of ``scripts/benchmark.py``: timers and memory probes (:mod:`.timing`, :mod:`.probe`), the
networks' plain twins (:mod:`.nets`), classical registration peers (:mod:`.classical`), the five sections
(:mod:`.cost`, :mod:`.accuracy`) and the markdown report (:mod:`.report`)."""

import json
from pathlib import Path


def inference_config() -> dict:
    """This checkout's ``configs/inference.json``, parsed: the one place the measurement code reads the defaults a
    user gets (the schedule, ``lam``, ``mu``), so that every section records what actually ran."""
    return json.loads((Path(__file__).resolve().parents[2] / "configs" / "inference.json").read_text())
