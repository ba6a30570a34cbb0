"""Timing and memory measurement helpers: medians after warm-up, interleaved comparisons, peak memory.

Every figure of the benchmark is the median of repeated runs after warm-up runs that are discarded (they pay for
lazy initialisation, allocator growth and oneDNN/cuDNN kernel selection). Candidates that are compared are timed
in the same process, interleaved round by round with the order reversed every other round (A B, B A, ...), so
slow drift of a shared machine (other jobs, thermal throttling) affects all of them alike.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["synchronize", "interleaved_medians", "max_rss_mib", "run_probe", "machine_description"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so that wall-clock time covers the work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device | str = "cpu"
) -> dict[str, dict]:
    """Time each zero-argument callable ``repeats`` times after ``warmup`` untimed calls, interleaved.

    Returns ``{name: {"median_s", "min_s", "times_s"}}``. Round ``r`` runs the candidates in the given order when
    ``r`` is even and in reverse when odd.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            candidates[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(values), "min_s": min(values), "times_s": values}
        for name, values in times.items()
    }


def max_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process image's own memory.
    ``getrusage``'s ``ru_maxrss`` is not used there because Linux carries it across ``fork``/``exec``: a child
    started by a large parent would report the parent's peak. Elsewhere: ``getrusage`` (macOS reports bytes).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_probe(spec: dict, timeout: float = 1800) -> dict:
    """Run :mod:`bench.probe` on ``spec`` in a fresh Python process and return its
    JSON result. A fresh process per configuration makes its peak RSS that configuration's alone."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(REPO_ROOT / "scripts"), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.probe", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT),
    )
    if completed.returncode != 0:
        return {"error": f"probe exited with {completed.returncode}: {completed.stderr.strip()[-800:]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine_description() -> dict:
    """Hardware and software the figures were measured on."""
    import monai

    description = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _total_memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
        description["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        description["cuda_version"] = torch.version.cuda
    return description
