"""Issue 21's cohort goal on a CPU machine: evaluation (``configs/inference.json`` + ``evaluate.json``, defaults)
of the same pairs by 2 ``torchrun`` processes of 1 thread each (``multi_gpu_evaluate.json``, Gloo) against 1 process
of 2 threads, in turn in fresh processes: throughput (pairs per second of the whole command, start-up included,
and of the engine) and whether the metrics are the same (``metrics.json`` of both, pair by pair; ``runtime`` left
out, the only column that is a time).

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
    return {str(row["pair_id"]): {k: v for k, v in row.items() if k != "runtime"} for row in rows}


def run(dataset_dir: str, output_dir: str) -> dict:
    out = Path(output_dir)
    common = ["--dataset_dir", dataset_dir, "--split", "all", "--overwrite", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(CONFIGS),
           "--output_dir", str(out / "one_process"), *common]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run", "--config_file", json.dumps(CONFIGS + ["configs/multi_gpu_evaluate.json"]),
           "--output_dir", str(out / "two_processes"), *common]
    result = {"dataset_dir": dataset_dir, "cpus": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0]}
    # 1 process of 2 threads (torch's default on 2 cores), then 2 processes of 1 (torchrun's OMP_NUM_THREADS=1)
    for name, command, threads in (("1 process x 2 threads", one, "2"), ("2 processes x 1 thread", two, "1")):
        wall, log = _run(command, {**env, "OMP_NUM_THREADS": threads})
        result[name] = {"wall_s": wall, "load_after": os.getloadavg()[0]}
    first, second = _pairs(out / "one_process"), _pairs(out / "two_processes")
    result["pairs"] = len(first)
    result["same_pairs"] = sorted(first) == sorted(second)
    differences = {}
    for pair, row in first.items():
        for key, value in row.items():
            other = second.get(pair, {}).get(key)
            if isinstance(value, (int, float)) and isinstance(other, (int, float)) and math.isfinite(value):
                differences[key] = max(differences.get(key, 0.0), abs(value - other))
    result["max_abs_difference"] = differences
    result["identical"] = result["same_pairs"] and all(v == 0 for v in differences.values())
    for name in ("1 process x 2 threads", "2 processes x 1 thread"):
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
