"""Issue 21's cohort goal on a CPU machine: evaluation (``configs/inference.json`` + ``evaluate.json``, defaults)
of the same pairs by 2 ``torchrun`` processes of 1 thread each (``multi_gpu_evaluate.json``, Gloo) against 1 process
of 2 threads and 1 process of 1 thread, in turn in fresh processes: throughput (pairs per minute of the whole
command, start-up included) and whether the metrics of the 2 processes are those of each one-process run
(``metrics.json``, pair by pair; ``runtime_s`` left out, the only column that is a time).

``python -m bench.processes DATASET_DIR OUTPUT_DIR [--record]`` from ``scripts/`` (one JSON line out; ``--record``
stores it as ``processes`` in ``docs/benchmarks.json``, rendered in benchmarks.md section 7c).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["configs/inference.json", "configs/evaluate.json"]


def _run(command: list[str], env: dict) -> tuple[float, str]:
    begin = time.perf_counter()
    completed = subprocess.run(command, cwd=str(ROOT), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - begin
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed: {completed.stderr[-2000:]}")
    return wall, completed.stdout + completed.stderr


def _pairs(output_dir: Path) -> dict[str, dict]:
    """``metrics.json``'s rows by pair id, without the runtime."""
    data = json.loads((output_dir / "metrics.json").read_text())
    rows = data["pairs"] if isinstance(data, dict) and "pairs" in data else data
    return {str(row["pair_id"]): {k: v for k, v in row.items() if k not in ("runtime", "runtime_s")} for row in rows}


def run(dataset_dir: str, output_dir: str) -> dict:
    out = Path(output_dir)
    common = ["--dataset_dir", dataset_dir, "--split", "all", "--overwrite", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(CONFIGS), *common]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run", "--config_file", json.dumps(CONFIGS + ["configs/multi_gpu_evaluate.json"]),
           *common]
    result = {"dataset_dir": dataset_dir, "cpus": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0]}
    # torchrun gives each process OMP_NUM_THREADS=1; 2 threads is torch's default on 2 cores
    legs = {"1 process x 2 threads": (one, "2", "one_process_2"), "2 processes x 1 thread": (two, "1", "two_processes"),
            "1 process x 1 thread": (one, "1", "one_process_1")}
    for name, (command, threads, folder) in legs.items():
        wall, _ = _run([*command, "--output_dir", str(out / folder)], {**env, "OMP_NUM_THREADS": threads})
        result[name] = {"wall_s": wall, "load_after": os.getloadavg()[0]}
    rows = {name: _pairs(out / folder) for name, (_, _, folder) in legs.items()}
    two_rows = rows.pop("2 processes x 1 thread")
    result["pairs"] = len(two_rows)
    for name, one_rows in rows.items():  # the 2 processes' metrics against each one-process run's
        differences = {}
        for pair, row in one_rows.items():
            for key, value in row.items():
                other = two_rows.get(pair, {}).get(key)
                if isinstance(value, (int, float)) and isinstance(other, (int, float)) and math.isfinite(value):
                    differences[key] = max(differences.get(key, 0.0), abs(value - other))
        result[name].update(same_pairs=sorted(one_rows) == sorted(two_rows), max_abs_difference=differences,
                            identical=sorted(one_rows) == sorted(two_rows) and not any(differences.values()))
    for name in legs:
        result[name]["pairs_per_minute"] = 60 * result["pairs"] / result[name]["wall_s"]
    return result


if __name__ == "__main__":
    measured = run(sys.argv[1], sys.argv[2])
    print(json.dumps(measured), flush=True)
    if "--record" in sys.argv:
        results_path = ROOT / "docs" / "benchmarks.json"
        results = json.loads(results_path.read_text())
        results["processes"] = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                "command": "python -m bench.processes " + " ".join(sys.argv[1:]), "result": measured}
        partial = results_path.with_name(results_path.name + ".partial")
        partial.write_text(json.dumps(results, indent=2, default=float) + "\n")
        os.replace(partial, results_path)
