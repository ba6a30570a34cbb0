#!/usr/bin/env python
"""Benchmark of the bundle: cost of hyper-conditioning, regularizer cost, sweep throughput, full-size training
memory, and accuracy/time against classical registration. Writes docs/benchmarks.md and docs/benchmarks.json.

    python scripts/benchmark.py            # default settings (~30-40 min on 2 CPU cores)
    python scripts/benchmark.py --quick    # a few minutes: tiny sizes, few repeats (checks the script only)
    python scripts/benchmark.py --sections "[1,2]" --output_dir /tmp/bench   # a subset, elsewhere
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # bundle root, bench/

from bench import accuracy, cost, report  # noqa: E402
from bench.timing import machine_description  # noqa: E402

FULL_SIZE = [192, 192, 208]  # Learn2Reg LungCT grid


def _config(network, size, batch, modes, warmup, repeats):
    return {"network": network, "spatial_size": size, "batch": batch, "modes": modes, "warmup": warmup,
            "repeats": repeats}


def settings_for(quick: bool, cuda: bool) -> dict:
    both = ["inference", "training"]
    if quick:
        s = [32, 32, 32]
        return {
            "preset": "quick", "full_size": s,
            "conditioning": [_config("HyperUNet", s, 1, both, 1, 2), _config("HyperUNet", s, 2, ["training"], 1, 2),
                             _config("HyperLocalNet", s, 1, ["inference"], 1, 2)],
            "memory_probes": True,
            "regularizer_sizes": [s], "regularizer_warmup": 1, "regularizer_repeats": 3,
            "sweep": {"network": "HyperUNet", "spatial_size": s, "pairs": 2, "grid": 3, "warmup": 1, "repeats": 2},
            "classical": {"spatial_size": s, "counts": {"train": 2, "val": 1, "test": 1}, "train_seconds": 5.0,
                          "learning_rate": 1e-3, "grid": 3, "elastix_iterations": 30, "demons_iterations": [20, 10]},
        }
    m64, m96 = [64] * 3, [96] * 3
    conditioning = [
        _config("HyperUNet", m64, 1, both, 1, 3),
        _config("HyperUNet", m64, 2, both, 1, 3),
        _config("HyperLocalNet", m64, 1, both, 1, 3),
        _config("HyperLocalNet", m64, 2, ["inference"], 1, 3),
        _config("HyperUNet", m96, 1, both, 1, 2),
        _config("HyperUNet", FULL_SIZE, 1, ["inference"], 1, 2),
    ]
    if cuda:
        conditioning = [dict(c, device="cuda") for c in conditioning] + [
            dict(_config(n, FULL_SIZE, 1, both, 2, 5), device="cuda") for n in ("HyperUNet", "HyperLocalNet")]
    return {
        "preset": "default", "full_size": FULL_SIZE, "conditioning": conditioning, "memory_probes": True,
        "regularizer_sizes": [m96, FULL_SIZE], "regularizer_warmup": 1, "regularizer_repeats": 5,
        "sweep": {"network": "HyperUNet", "spatial_size": [48] * 3, "pairs": 2, "grid": 11, "warmup": 2,
                  "repeats": 3},
        "classical": {"spatial_size": [32] * 3, "counts": {"train": 8, "val": 2, "test": 4}, "train_seconds": 150.0,
                      "learning_rate": 1e-3, "grid": 11, "elastix_iterations": 200, "demons_iterations": [100, 50]},
    }


def run_classical(options: dict, device: str, seed: int) -> dict:
    splits = accuracy.simulate_split(options["spatial_size"], options["counts"], seed)
    methods = []
    for regularizer, name in (("elastic", "bundle HyperUNet, elastic, best swept (lam, mu)"),
                              ("diffusion", "bundle HyperUNet, diffusion baseline, best swept alpha")):
        model = accuracy.train_model(regularizer, splits["train"], options["train_seconds"], device,
                                     options["learning_rate"], seed)
        selection = accuracy.sweep_select(model, splits["val"], options["grid"], device)
        methods.append(accuracy.evaluate_model(name, model, selection, splits["test"], device))
        methods[-1]["validation"] = selection
    methods += accuracy.classical_accuracy(splits["test"], options["elastix_iterations"],
                                           options["demons_iterations"])
    return {
        "setup": {**options, "spacing": list(splits["test"][0].spacing), "device": device,
                  "elastix_grid": "6 then 3 voxels (the zoo's 10 mm then 5 mm at Learn2Reg's lung resolution)"},
        "methods": methods,
    }


def main(quick: bool = False, output_dir: str = "docs", sections=(1, 2, 3, 4, 5), seed: int = 0) -> str:
    """Run the benchmark; write ``benchmarks.md`` and ``benchmarks.json`` into ``output_dir``; return the md path.

    Args:
        quick: tiny sizes and few repeats (a few minutes), for checking that everything runs.
        output_dir: where the two result files go (default ``docs``, relative to the repository root).
        sections: which sections to run (all five by default; the markdown needs all five).
        seed: seed of the simulated data and of the trained models.
    """
    start = time.perf_counter()
    root = Path(__file__).resolve().parents[1]
    output = Path(output_dir) if Path(output_dir).is_absolute() else root / output_dir
    output.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    settings = settings_for(quick, cuda)
    settings["command"] = "python scripts/benchmark.py" + (" --quick" if quick else "")
    sections = {int(s) for s in (sections if isinstance(sections, (list, tuple)) else [sections])}
    results = {"machine": machine_description(), "settings": settings}

    def log(message):
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    if 1 in sections:
        log("section 1: hyper-conditioning cost")
        results["hyper_conditioning"] = []
        for config in settings["conditioning"]:
            device = config.get("device", "cpu")
            results["hyper_conditioning"] += cost.hyper_conditioning_cost([config], device, settings["memory_probes"])
            log(f"  {config['network']} {config['spatial_size']} batch {config['batch']} done")
    if 2 in sections:
        log("section 2: regularizer cost")
        results["regularizer"] = []
        for device in ["cpu"] + (["cuda"] if cuda else []):
            results["regularizer"] += cost.regularizer_cost(settings["regularizer_sizes"], device,
                                                            settings["regularizer_warmup"],
                                                            settings["regularizer_repeats"])
    device = "cuda" if cuda else "cpu"
    if 3 in sections:
        log("section 3: sweep throughput")
        results["sweep"] = cost.sweep_throughput(device=device, **settings["sweep"])
    if 4 in sections:
        log("section 4: full-size training memory")
        results["training_memory"] = cost.training_memory("HyperUNet", settings["full_size"], 1, device, 12.0)
    if 5 in sections:
        log("section 5: accuracy against classical registration")
        results["classical"] = run_classical(settings["classical"], device, seed)
    results["total_seconds"] = time.perf_counter() - start
    (output / "benchmarks.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    md_path = output / "benchmarks.md"
    if all(key in results for key in ("hyper_conditioning", "regularizer", "sweep", "training_memory", "classical")):
        md_path.write_text(report.render(results))
    log(f"wrote {output / 'benchmarks.json'}" + (f" and {md_path}" if md_path.exists() else ""))
    return str(md_path)


if __name__ == "__main__":
    fire.Fire(main)
