"""Candidates to make the instance optimisation cheaper (issue 21 item 3), measured on full-size cached pairs and
recorded in ``docs/benchmarks.json`` (``speed_candidates``, rendered in benchmarks.md section 7).

* ``micro PAIR.npz [ROUNDS] [--compile]``: the cost of one finest-level step (96 x 96 x 104, the 12 MIND-SSC
  descriptors, elastic energy, backward, Adam), two steps per timed call, the candidates interleaved round by round
  (order reversed every other round): 2 torch threads (the default on 2 cores), 1 thread, ``channels_last_3d``
  tensors, and ``torch.compile`` of the loss (its first call, the compilation, timed apart); each candidate's
  field after the same steps is compared with the default's (max abs difference, voxels).
* ``tre PAIR.npz ...`` (``FINEST=25,15``; ``20:2``: 20 steps at similarity stride 2): from the release model's start at the inference defaults
  (lam 0.083, mu 0.03), the two coarse levels of the default schedule once (25 steps each), then the finest level
  with each number of steps in ``FINEST``: keypoint TRE and seconds of each, the variants' order alternating by pair;
  ``COARSE=25,50`` repeats it after each number of steps on the two coarse levels (keys ``coarse_<n>_...``).
* ``pipeline PAIR.npz ...``: the whole default optimisation (MIND-SSC of both images, then the steps and similarity
  strides of ``configs/inference.json`` on its 3 levels) from the release model's start, keypoint TRE and seconds,
  of the code on ``PYTHONPATH``: run for two commits in turn (``git archive`` of the older one) to compare code versions on the same pairs.

Run from ``scripts/``: ``python -m bench.speed_candidates micro ~/.cache/elastic_hypermorph_bundle/benchmark_pairs/<h>/pair_1101.npz``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def _pair_tensors(path: str):
    from bench.accuracy import load_pair, normalise

    pair = load_pair(path)
    fixed = torch.from_numpy(normalise(pair.fixed_image))[None, None]
    moving = torch.from_numpy(normalise(pair.moving_image))[None, None]
    return pair, fixed, moving


def micro(path: str, rounds: int = 3, compile_step: bool = False) -> dict:
    from elastic_hypermorph_bundle import optimize
    from elastic_hypermorph_bundle.losses.elastic import elastic_energy
    from elastic_hypermorph_bundle.losses.similarity import get_similarity
    from elastic_hypermorph_bundle.networks.spatial import field_scale, level_shape, resize_image

    pair, fixed, moving = _pair_tensors(path)
    begin = time.perf_counter()
    features = optimize.similarity_features(fixed, moving, "mind")
    result = {"pair": path, "mind_both_images_s": time.perf_counter() - begin, "load_before": os.getloadavg()[0]}
    shape = tuple(fixed.shape[2:])
    level = level_shape(shape, 2.0)
    fixed_l, moving_l = (resize_image(f, level) for f in features)
    row = get_similarity("mind")
    spacing = torch.as_tensor(pair.spacing, dtype=torch.float32)
    level_spacing = (spacing / field_scale(shape, level, spacing).flatten()).tolist()
    lam, mu = torch.tensor([0.083]), torch.tensor([0.03])

    def loss_of(correction, fixed_l, moving_l):
        field = correction
        for _ in range(3):  # the optimisation's smoothing of the control values
            field = F.avg_pool3d(F.pad(field, (1,) * 6, mode="replicate"), 3, stride=1)
        similarity = optimize._LevelSimilarity(row, fixed_l, moving_l, None, 2.0)(field)
        return (similarity + elastic_energy(field, lam, mu, level_spacing)).sum() * math.prod(level)

    compiled = {}

    def make(threads: int = 2, channels_last: bool = False, compiled_loss: bool = False, steps: int = 2):
        layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        f, m = (t.contiguous(memory_format=layout) for t in (fixed_l, moving_l))

        def run():
            if compiled_loss and "loss" not in compiled:
                compiled["loss"] = torch.compile(loss_of)
            loss = compiled["loss"] if compiled_loss else loss_of
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                correction = torch.nn.Parameter(torch.zeros(1, 3, *level).contiguous(memory_format=layout))
                optimizer = torch.optim.Adam([correction], lr=0.2, eps=1e-4)
                for _ in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    loss(correction, f, m).backward()
                    optimizer.step()
            finally:
                torch.set_num_threads(previous)
            return correction.detach()

        return run

    candidates = {"2 threads (default)": make(), "1 thread": make(threads=1), "channels_last_3d": make(channels_last=True)}
    reference = candidates["2 threads (default)"]()
    result["max_abs_difference"] = {"channels_last_3d": float((candidates["channels_last_3d"]() - reference).abs().max())}
    if compile_step:
        begin = time.perf_counter()
        try:
            run = make(compiled_loss=True)
            field = run()
            result["compile_first_call_s"] = time.perf_counter() - begin
            result["max_abs_difference"]["torch.compile"] = float((field - reference).abs().max())
            candidates["torch.compile"] = run
        except Exception as error:  # a CPU build without a working compiler: say so
            result["compile_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    times = {name: [] for name in candidates}
    for index in range(rounds):
        for name in list(candidates) if index % 2 == 0 else list(candidates)[::-1]:
            begin = time.perf_counter()
            candidates[name]()
            times[name].append((time.perf_counter() - begin) / 2)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    default = medians["2 threads (default)"]
    result.update(level=list(level), rounds=rounds, step_median_s=medians, step_times_s=times,
                  ratio_to_default={name: value / default for name, value in medians.items()},
                  load_after=os.getloadavg()[0])
    return result


def tre(paths: list[str], finest_steps=(25, 15), coarse_level_steps=(25,)) -> list[dict]:
    from bench.register_probe import load_model, network_ddf
    from elastic_hypermorph_bundle import optimize
    from elastic_hypermorph_bundle.metrics import target_registration_error

    from bench import inference_schedule

    network, space, card = load_model(ROOT / "models" / "model.pt", "cpu")
    weights = network.generate_weights(space.point(0.083, 0.03))
    schedule = inference_schedule()
    rows = []
    for index, path in enumerate(paths):
        pair, fixed, moving = _pair_tensors(path)
        fixed_points, moving_points = (torch.as_tensor(p, dtype=torch.float32)
                                       for p in (pair.fixed_keypoints, pair.moving_keypoints))

        def error(ddf):
            return target_registration_error(ddf[0], fixed_points, moving_points, pair.spacing).mean().item()

        settings = json.loads(Path(path).with_name("settings.json").read_text())["simulation"]  # the pair cache's
        row = {"pair": path, "real_ct": Path(str(settings.get("real_ct"))).name, "preset": settings.get("preset"),
               "load_before": os.getloadavg()[0]}
        begin = time.perf_counter()
        start = network_ddf(network, weights, fixed, moving, card["spatial_size"])
        row["network_s"], row["identity_tre_mm"], row["network_tre_mm"] = (time.perf_counter() - begin,
                                                                          error(torch.zeros_like(start)), error(start))
        begin = time.perf_counter()
        features = optimize.similarity_features(fixed, moving)
        row["mind_s"] = time.perf_counter() - begin
        for coarse_count in coarse_level_steps:
            # levels 1-2 of the default (control grids 8 and 4 times coarser), 25 steps each unless COARSE says
            begin = time.perf_counter()
            coarse = optimize.instance_optimize(fixed, moving, 0.083, 0.03, start, steps=coarse_count, levels=2,
                                                grid=4.0, features=features)
            tag = "" if coarse_count == 25 else f"coarse_{coarse_count}_"
            row[f"{tag}coarse_s"], row[f"{tag}coarse_tre_mm"] = time.perf_counter() - begin, error(coarse)
            for variant in finest_steps if index % 2 == 0 else finest_steps[::-1]:
                steps, _, stride = str(variant).partition(":")  # "20:2": 20 steps, similarity stride 2
                key = f"{tag}finest_{steps}" + (f"_stride{stride}" if stride else "")
                begin = time.perf_counter()
                ddf = optimize.instance_optimize(fixed, moving, 0.083, 0.03, coarse, steps=int(steps), levels=1,
                                                 grid=2.0, features=features, similarity_stride=int(stride or 1))
                row[f"{key}_s"], row[f"{key}_tre_mm"] = time.perf_counter() - begin, error(ddf)
                print(json.dumps(row), flush=True)
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
    return rows


def pipeline(paths: list[str]) -> list[dict]:
    from bench.register_probe import load_model, network_ddf
    from elastic_hypermorph_bundle import optimize
    from elastic_hypermorph_bundle.metrics import target_registration_error

    from bench import inference_schedule

    network, space, card = load_model(ROOT / "models" / "model.pt", "cpu")
    weights = network.generate_weights(space.point(0.083, 0.03))
    schedule = inference_schedule()
    rows = []
    for path in paths:
        pair, fixed, moving = _pair_tensors(path)
        fixed_points, moving_points = (torch.as_tensor(p, dtype=torch.float32)
                                       for p in (pair.fixed_keypoints, pair.moving_keypoints))
        settings = json.loads(Path(path).with_name("settings.json").read_text())["simulation"]
        row = {"pair": path, "real_ct": Path(str(settings.get("real_ct"))).name, "load_before": os.getloadavg()[0],
               "steps": list(schedule["steps"]), "similarity_stride": list(schedule["similarity_stride"])}
        start = network_ddf(network, weights, fixed, moving, card["spatial_size"])
        begin = time.perf_counter()
        features = optimize.similarity_features(fixed, moving)
        row["mind_s"] = time.perf_counter() - begin
        ddf = optimize.instance_optimize(fixed, moving, 0.083, 0.03, start, features=features, steps=schedule["steps"],
                                         similarity_stride=schedule["similarity_stride"])
        row["optimisation_s"] = time.perf_counter() - begin
        row["tre_mm"] = target_registration_error(ddf[0], fixed_points, moving_points, pair.spacing).mean().item()
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
    return rows


def record(key: str, value, json_path: Path = ROOT / "docs" / "benchmarks.json", module: str = "speed_candidates") -> None:
    """Store ``value`` as ``speed_candidates[key]`` (with the date and the command of ``bench.<module>``) in
    ``benchmarks.json``."""
    results = json.loads(json_path.read_text())
    results.setdefault("speed_candidates", {})[key] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f"python -m bench.{module} " + " ".join(sys.argv[1:]), "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "result": value,
    }
    partial = json_path.with_name(json_path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2, default=float) + "\n")
    os.replace(partial, json_path)


if __name__ == "__main__":
    import logging

    logging.getLogger("elastic_hypermorph_bundle").setLevel(logging.WARNING)
    kind, arguments = sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("--")]
    if kind == "micro":
        measured = micro(arguments[0], int(arguments[1]) if len(arguments) > 1 else 3, "--compile" in sys.argv)
    elif kind == "pipeline":
        measured = pipeline(arguments)
    else:
        measured = tre(arguments, tuple(os.environ.get("FINEST", "25,15").split(",")),
                       tuple(int(s) for s in os.environ.get("COARSE", "25").split(",")))
    print(json.dumps(measured), flush=True)
    if "--record" in sys.argv:
        record(kind, measured)
