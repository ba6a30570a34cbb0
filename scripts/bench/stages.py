"""Section 7: where the time of a registration goes, stage by stage, in the bundle's own engine.

Each path runs ``monai.bundle.run`` of ``configs/inference.json`` with the defaults in a fresh process
(``python -m bench.stages '<json spec>'``, one JSON line out), under ``cProfile``: the time of each stage is the
cumulative time of the function that does it (:data:`STAGE_FUNCTIONS`); each output file's time runs from the
writer's call that writes it (``InferenceWriter.write_file``: what that output needs: warping, conversion,
compression, saving), and the profiled paths write in place (``write_background false``, so the writing is in the
profiled thread; the run without the profiler writes in the background, as the defaults do); each
optimisation level is timed by the bundle's own log lines (the last step of each level), so the table needs no
instrumentation in the package. Start-up is the process's wall
time before the run's first step: interpreter, imports, config parsing and instantiation. A second run of the
split path without the profiler gives the profiler's overhead (its total wall time against the profiled one).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from . import inference_config

ROOT = Path(__file__).resolve().parents[2]

#: stage -> (file name ending, function name) whose cProfile cumulative time is the stage's time (summed when a
#: stage lists several); the functions are the bundle's (or MONAI's) own, so the table follows the code
STAGE_FUNCTIONS = {
    "checks (overrides, model card, input files)": [
        ("elastic_hypermorph_bundle/cli.py", "check_overrides"),
        ("elastic_hypermorph_bundle/model_card.py", "check_run"),
        ("elastic_hypermorph_bundle/workflow/inference.py", "inference_datalist"),
    ],
    "loading and preprocessing": [("monai/data/dataset.py", "__getitem__")],
    "pre-alignment (incl. the auto check)": [("elastic_hypermorph_bundle/workflow/instance.py", "align")],
    "network (weights, resampling, forward)": [("elastic_hypermorph_bundle/workflow/steps.py", "predict")],
    "instance optimisation": [("elastic_hypermorph_bundle/optimize.py", name)
                              for name in ("similarity_features", "start_objective", "instance_optimize")],
    "writing outputs (all files)": [("elastic_hypermorph_bundle/workflow/writers.py", "__call__")],
}
#: parts of the stages above, listed under them
PART_FUNCTIONS = {
    "MIND features of both images": [("elastic_hypermorph_bundle/optimize.py", "similarity_features")],
    "choice of the start (objective of both starts)": [("elastic_hypermorph_bundle/optimize.py", "start_objective")],
}
#: the whole engine run (the run list's last step) and the registration iteration
ENGINE = ("ignite/engine/engine.py", "run")
ITERATION = ("elastic_hypermorph_bundle/workflow/steps.py", "__call__")
LEVEL_LOG = re.compile(r"instance optimisation level (\d+)/(\d+) \((\S+)\) step (\d+)/(\d+)")
#: the run's summary line: mean TRE of the pairs with points, after and before registration
TRE_LOG = re.compile(r"TRE (\d+\.\d+) mm \(before (\d+\.\d+) mm")

__all__ = ["profile_run", "run"]


def _output_kind(relative_path: str) -> str:
    """An output path with its pair id left out: ``0001_0001/ddf.nii.gz`` -> ``<pair>/ddf.nii.gz``."""
    parts = Path(relative_path).parts
    if parts[0] == "submission":
        return "submission/disp_<pair>.nii.gz"
    return "/".join(["<pair>", *parts[1:]]) if len(parts) > 1 else relative_path


def _cumulative(stats, file_end: str, function: str) -> tuple[float, int]:
    """Cumulative seconds and primitive call count of the functions named ``function`` in files ending with
    ``file_end`` (recursive calls counted once by cProfile's cumulative time)."""
    seconds, calls = 0.0, 0
    for (path, _, name), (primitive, _, _, cumulative, _) in stats.stats.items():
        if name == function and path.replace("\\", "/").endswith(file_end):
            seconds, calls = seconds + cumulative, calls + primitive
    return seconds, calls


def profile_run(spec: dict) -> dict:
    """In this (fresh) process: ``monai.bundle.run`` of ``spec["config_file"]`` with ``spec["overrides"]`` under
    cProfile (unless ``spec["profile"]`` is false); per-stage seconds, per-file write seconds, per-level seconds."""
    t_start = time.perf_counter()
    import cProfile
    import logging
    import pstats

    from monai.bundle import run as bundle_run

    from elastic_hypermorph_bundle.workflow import writers

    outputs: dict[str, float] = {}  # output kind -> seconds (every file of that kind)
    write_files, write_file = writers.InferenceWriter.write_files, writers.InferenceWriter.write_file

    def timed_files(self, pair, paths):
        begin = time.perf_counter()
        before = sum(outputs.values())
        try:
            return write_files(self, pair, paths)
        finally:
            first = "before the first file (field to the file grid)"
            spent = time.perf_counter() - begin - (sum(outputs.values()) - before)
            outputs[first] = outputs.get(first, 0.0) + spent

    def timed_file(self, kind, path, *args):
        begin = time.perf_counter()
        try:
            return write_file(self, kind, path, *args)
        finally:
            label = _output_kind(Path(path).relative_to(self.files.staging).as_posix())
            outputs[label] = outputs.get(label, 0.0) + time.perf_counter() - begin

    writers.InferenceWriter.write_files, writers.InferenceWriter.write_file = timed_files, timed_file
    levels: list[tuple[float, str]] = []

    class LevelLog(logging.Handler):
        def emit(self, record):
            levels.append((time.perf_counter(), record.getMessage()))

    logging.getLogger("elastic_hypermorph_bundle").addHandler(LevelLog(logging.INFO))
    profiler = cProfile.Profile() if spec.get("profile", True) else None
    t_run = time.perf_counter()
    if profiler:
        profiler.enable()
    bundle_run(config_file=spec["config_file"], meta_file=str(ROOT / "configs" / "metadata.json"),
               bundle_root=str(ROOT), **spec["overrides"])
    if profiler:
        profiler.disable()
    t_end = time.perf_counter()
    result = {"imports_s": t_run - t_start, "run_s": t_end - t_run, "outputs": outputs, "level_seconds": [],
              "threads": __import__("torch").get_num_threads()}
    for _, message in levels:
        match = TRE_LOG.search(message)
        if match:
            result["tre_mm"], result["tre_before_mm"] = float(match.group(1)), float(match.group(2))
    # each level's time: from the previous level's last logged step (or the optimisation's start) to its own
    ends = {}
    for stamp, message in levels:
        match = LEVEL_LOG.search(message)
        if match and match.group(4) == match.group(5):
            ends.setdefault(int(match.group(1)), []).append((stamp, match.group(3)))
    if profiler is None:
        return result
    stats = pstats.Stats(profiler)
    result["stages"] = {}
    result["parts"] = {}
    for key, table in (("stages", STAGE_FUNCTIONS), ("parts", PART_FUNCTIONS)):
        for stage, functions in table.items():
            found = [_cumulative(stats, *f) for f in functions]
            result[key][stage] = {"seconds": sum(s for s, _ in found), "calls": sum(c for _, c in found)}
    engine_s, _ = _cumulative(stats, *ENGINE)
    result["engine_s"] = engine_s
    result["iteration_s"], result["iterations"] = _cumulative(stats, *ITERATION)
    optimisation = result["stages"]["instance optimisation"]["seconds"]
    pairs = max(1, result["iterations"])
    if ends and all(len(v) == pairs for v in ends.values()):
        # per pair: level l ends at ends[l][pair]; level 1 starts where the optimisation of the pair starts, which
        # the logs do not mark: level 1 is the optimisation's per-pair time minus the finer levels
        count = max(ends)
        per_level = [0.0] * count
        for pair in range(pairs):
            for level in range(2, count + 1):
                per_level[level - 1] += ends[level][pair][0] - ends[level - 1][pair][0]
        # the optimisation's time before level 2 also holds the MIND features of both images (computed once) and
        # the choice of the start, listed apart
        before = sum(part["seconds"] for part in result["parts"].values())
        per_level[0] = optimisation - sum(per_level[1:]) - before
        result["level_seconds"] = [
            {"level": level + 1, "grid": ends[level + 1][0][1], "seconds_per_pair": per_level[level] / pairs}
            for level in range(count)
        ]
    return result


def _command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "bench.stages", json.dumps(spec)]


def _run_path(spec: dict, log) -> dict:
    """One path in a fresh process; its wall time measured here (the process's start-up included)."""
    begin = time.perf_counter()
    completed = subprocess.run(_command(spec), cwd=str(ROOT / "scripts"), capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - begin
    if completed.returncode != 0:
        raise RuntimeError(f"stage profile of {spec['name']} failed: {completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result.update(name=spec["name"], wall_s=wall, overrides=spec["overrides"])
    result["startup_s"] = wall - result["run_s"]
    log(f"  {spec['name']}: {wall:.1f} s wall")
    return result


def convex_adam_pair(fixed: str, moving: str, points: tuple[str, str] | None) -> dict:
    """ConvexAdam (its defaults, :func:`bench.classical.convex_adam_register`) on the single path's pair, read from
    its files (HU arrays, the bundle's input), timed from the arrays in memory to its field: its seconds and, when
    the pair has points, its TRE (mm) as the bundle's summary line computes it."""
    import nibabel as nib
    import numpy as np
    import torch

    from bench.classical import convex_adam_register
    from elastic_hypermorph_bundle.data.io import read_points
    from elastic_hypermorph_bundle.metrics import target_registration_error

    images = [nib.load(path) for path in (fixed, moving)]
    arrays = [np.asarray(image.dataobj, dtype=np.float32) for image in images]
    begin = time.perf_counter()
    ddf = convex_adam_register(*arrays)
    result = {"seconds": time.perf_counter() - begin, "threads": torch.get_num_threads()}
    if points:
        spacing = [float(s) for s in images[1].header.get_zooms()[:3]]
        result["tre_mm"] = target_registration_error(torch.from_numpy(ddf).double(),
                                                     *(torch.as_tensor(read_points(p)).double() for p in points),
                                                     spacing).mean().item()
    return result


def run(options: dict, log) -> dict:
    """Section 7: the split path (``options["pairs"]`` pairs of a simulated Learn2Reg dataset at
    ``options["dataset_dir"]``, simulated there if absent, on ``options["real_ct"]`` when that file exists; one
    process) and the single-pair path (``--fixed``/``--moving``), profiled; the split path once more without the
    profiler (unless ``options["overhead_run"]`` is false)."""
    from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset

    dataset = Path(options["dataset_dir"])
    if not dataset.is_dir():
        begin = time.perf_counter()
        real_ct = options.get("real_ct")
        real_ct = real_ct if real_ct and Path(real_ct).is_file() else None  # absent: the phantom's anatomy
        make_synthetic_dataset(dataset, num_pairs=options["pairs"], spatial_size=tuple(options["spatial_size"]),
                               seed=options["seed"], real_ct=real_ct, real_ct_fraction=1.0 if real_ct else 0.0,
                               **options["simulation"])
        log(f"  simulated {options['pairs']} pairs at {options['spatial_size']} in {time.perf_counter() - begin:.0f} s")
    config = str(ROOT / "configs" / "inference.json")
    out = Path(options["output_dir"])
    common = {"ckpt_path": options["model"], "overwrite": True, **options.get("overrides", {})}
    split = {"dataset_dir": str(dataset), "split": "all", **common}
    images = sorted((dataset / "imagesTr").glob("*_0000.nii.gz"))[:1]
    single = {"fixed": str(images[0]), "moving": str(images[0]).replace("_0000.nii", "_0001.nii"), **common}
    masks = [Path(str(p).replace("imagesTr", "masksTr")) for p in (single["fixed"], single["moving"])]
    if all(m.is_file() for m in masks):
        single.update(fixed_mask=str(masks[0]), moving_mask=str(masks[1]))
    points = [dataset / "keypointsTr" / Path(image).name.replace(".nii.gz", ".csv")
              for image in (single["fixed"], single["moving"])]
    if all(p.is_file() for p in points):  # so that its summary line gives its TRE, beside ConvexAdam's on the pair
        single.update(fixed_points=str(points[0]), moving_points=str(points[1]))
    paths = [
        {"name": "split", "config_file": config,
         "overrides": {**split, "write_background": False, "output_dir": str(out / "split")}},
        {"name": "single pair", "config_file": config,
         "overrides": {**single, "write_background": False, "output_dir": str(out / "single")}},
    ]
    if options.get("overhead_run", True):
        paths.append({"name": "split, no profiler", "config_file": config, "profile": False,
                      "overrides": {**split, "output_dir": str(out / "split_plain")}})
    setup = {key: options.get(key) for key in ("spatial_size", "pairs", "seed", "simulation", "real_ct", "model")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    cgroup = Path("/proc/self/cgroup").read_text().strip() if Path("/proc/self/cgroup").is_file() else None
    # the schedule that ran: the options' override (the quick run's) or the config's default
    setup["instance_steps"] = options.get("overrides", {}).get(
        "instance_steps", inference_config()["instance_steps"])
    setup.update(dataset_dir=str(dataset), cpus=len(os.sched_getaffinity(0)), cgroup=cgroup,
                 commit=commit.stdout.strip() if commit.returncode == 0 else None)  # the code measured
    load_before = os.getloadavg()
    measured = [_run_path(spec, log) for spec in paths]
    result = {"setup": setup, "paths": measured}
    from bench.classical import convex_adam_available

    if options.get("convex_adam") and convex_adam_available():  # the peer on the single path's pair, in the same run (issue 21: 0.3x its time)
        name = Path(single["fixed"]).name.replace("_0000.nii.gz", "")
        result["convex_adam"] = {"pair": name, "load_before": list(os.getloadavg()), **convex_adam_pair(
            single["fixed"], single["moving"], tuple(map(str, points)) if all(p.is_file() for p in points) else None)}
        log(f"  ConvexAdam on {name}: {result['convex_adam']['seconds']:.1f} s")
    setup["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    return result


if __name__ == "__main__":
    print(json.dumps(profile_run(json.loads(sys.argv[1]))))
