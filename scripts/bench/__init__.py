"""Measurement code of ``scripts/benchmark.py``: timers and memory probes (:mod:`.timing`, :mod:`.probe`), the
networks' plain twins (:mod:`.nets`), classical registration peers (:mod:`.classical`), the five sections
(:mod:`.cost`, :mod:`.accuracy`) and the markdown report (:mod:`.report`)."""

import json
from pathlib import Path


def inference_config() -> dict:
    """This checkout's ``configs/inference.json``, parsed: the one place the measurement code reads the defaults a
    user gets (the schedule, ``lam``, ``mu``), so that every section records what actually ran."""
    return json.loads((Path(__file__).resolve().parents[2] / "configs" / "inference.json").read_text())


def inference_schedule() -> dict:
    """The instance optimisation's schedule in :func:`inference_config`: ``steps`` (``instance_steps`` as the config
    holds it: one number for every level, or one per level), ``coverage_mask`` (``instance_coverage_mask``: a moving
    image on another grid compared only where it has data) and ``similarity_stride``
    (``instance_similarity_stride``, 1 where the config has none)."""
    config = inference_config()
    return {"steps": config["instance_steps"], "coverage_mask": bool(config.get("instance_coverage_mask", False)),
            "similarity_stride": config.get("instance_similarity_stride", 1)}
