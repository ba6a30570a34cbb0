"""The output folder of one sweep: its files, the check that a folder holds this sweep (and so may resume), and
reading a finished sweep back.

* ``sweep_config.json``: what the sweep computes (``identity``: model checksum, data, preprocessing, grid,
  columns) and ``info`` (checkpoint path, grid spec, package version). A later run with the same output folder
  must have the same identity: it then resumes; otherwise it is refused before anything is written;
* ``sweep.csv``: one row per (grid point, pair) (:class:`~.sweep.SweepTable`);
* ``summary.json``: the summary (:func:`~.selection.summarize` and what :class:`~.workflow.ParameterSweep` adds).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic import atomic_write_json
from .selection import SweepResults, read_sweep

__all__ = ["CONFIG_FILE", "TABLE_FILE", "SUMMARY_FILE", "file_sha256", "check_or_record", "load_sweep"]

CONFIG_FILE, TABLE_FILE, SUMMARY_FILE = "sweep_config.json", "sweep.csv", "summary.json"


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_or_record(output_dir: str | Path, identity: dict, info: dict) -> None:
    """Refuse an output folder holding a sweep of another identity; record this one (with ``info``) if the folder
    holds none, so that a later run of the same sweep resumes.

    Raises:
        ValueError: the folder holds a sweep that differs (naming the differing keys), or a ``sweep.csv`` without
            its ``sweep_config.json``.
    """
    output_dir = Path(output_dir)
    config_path, table_path = output_dir / CONFIG_FILE, output_dir / TABLE_FILE
    identity = json.loads(json.dumps(identity))  # compare as it reads back from disk
    if config_path.is_file():
        recorded = json.loads(config_path.read_text()).get("identity", {})
        differing = sorted(key for key in set(recorded) | set(identity) if recorded.get(key) != identity.get(key))
        if differing:
            raise ValueError(
                f"{output_dir} holds a sweep with another configuration (differs in: {', '.join(differing)}); "
                "pass another --output_dir, or delete that folder to start over. Only the same configuration "
                "resumes."
            )
        return
    if table_path.exists():
        raise ValueError(f"{table_path} exists without {CONFIG_FILE}: not a sweep this workflow can resume.")
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, {"identity": identity, "info": info})


def load_sweep(folder: str | Path) -> tuple[dict, dict, SweepResults]:
    """A finished sweep: ``(sweep_config.json, summary.json, the table read back)``.

    Raises:
        FileNotFoundError: one of its files is missing.
    """
    folder = Path(folder)
    for name in (CONFIG_FILE, SUMMARY_FILE, TABLE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: run the sweep (configs/sweep.json) of that model first.")
    config = json.loads((folder / CONFIG_FILE).read_text())
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    identity = config["identity"]
    results = read_sweep(folder / TABLE_FILE, identity["names"], num_points=len(identity["grid"]))
    return config, summary, results
