"""Section 5 of the benchmark: accuracy, time and memory of every registration method on the same held-out simulated
breathing-lung pairs with known ground truth.

Pairs: :func:`elastic_hypermorph_bundle.simulation.generator.simulate_pair` at the given grid (the default run: the
Learn2Reg lung grid 192 x 192 x 208 of 1.75 x 1.25 x 1.75 mm) with the given simulation settings, cached as
``.npz`` under ``cache_dir/<settings hash>/`` (a full-size pair takes a minute to simulate; the cache holds nothing
the settings do not determine).

Methods (:data:`KINDS`): no registration, elastix B-spline, SimpleITK demons, ConvexAdam, the bundle's network
alone, the bundle's instance optimisation from identity and from the network's prediction. Each method runs in a
fresh Python process (:mod:`bench.register_probe`) over all pairs, so that its peak resident memory (``VmHWM``) is
its own; the process writes each pair's DDF to a scratch file and the parent scores it with :func:`evaluate_ddf`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from elastic_hypermorph_bundle.simulation.followup import followup_geometry, on_fixed_grid
from elastic_hypermorph_bundle.simulation.case import SimulatedPair
from elastic_hypermorph_bundle.simulation.generator import simulate_pair
from elastic_hypermorph_bundle.simulation.real_ct import LUNG_MASK_RULE
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.forward import training_terms
from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.metrics import pair_metrics
from elastic_hypermorph_bundle.networks import HyperUNet

__all__ = [
    "HU_WINDOW", "KINDS", "normalise", "cached_pairs", "load_pair", "moving_coverage", "evaluate_ddf",
    "train_tiny_model",
    "run_method", "summarise", "pair_path",
]

HU_WINDOW = (-1000.0, 500.0)  # the bundle's intensity window, clipped and scaled to [0, 1]
KINDS = ("identity", "elastix", "demons", "convex_adam", "network", "optimize")
REPO_ROOT = Path(__file__).resolve().parents[2]


def normalise(image: np.ndarray) -> np.ndarray:
    low, high = HU_WINDOW
    return ((np.clip(image.astype(np.float32), low, high) - low) / (high - low)).astype(np.float32)


def _settings_hash(spatial_size, simulation: dict) -> str:
    key = {"spatial_size": [int(s) for s in spatial_size], "simulation": simulation}
    if simulation.get("real_ct"):  # the pair follows the lung mask of the CT: a new mask rule, a new pair
        key["lung_mask_rule"] = LUNG_MASK_RULE
    key = json.dumps(key, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def pair_path(spatial_size, seed, simulation: dict, cache_dir: str | Path) -> Path:
    """Where :func:`cached_pairs` keeps the pair of ``seed`` (whether or not it is simulated yet)."""
    return Path(cache_dir) / _settings_hash(spatial_size, simulation) / f"pair_{int(seed)}.npz"


def cached_pairs(spatial_size, seeds, simulation: dict, cache_dir: str | Path, log=print) -> list[Path]:
    """Paths of the simulated pairs ``simulate_pair(spatial_size, seed=s, **simulation)`` for ``seeds``, simulating
    (and caching) those not yet under ``cache_dir``. Files are written to a temporary name and renamed, so a killed
    run leaves no partial pair."""
    folder = Path(cache_dir) / _settings_hash(spatial_size, simulation)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({"spatial_size": list(spatial_size), "simulation": simulation},
                                                     indent=2))
    paths = []
    for seed in seeds:
        path = pair_path(spatial_size, seed, simulation, cache_dir)
        if not path.is_file():
            start = time.perf_counter()
            # a follow-up's moving image on the fixed grid, as the bundle's transforms resample it for every method
            pair = on_fixed_grid(simulate_pair(spatial_size, seed=int(seed), **simulation))
            arrays = {k: np.asarray(v) for k, v in dataclasses.asdict(pair).items()
                      if k != "simulation" and v is not None}
            arrays["simulation"] = np.asarray(json.dumps(pair.simulation))
            with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as handle:
                np.savez(handle, **arrays)
            os.replace(handle.name, path)
            log(f"  simulated pair seed {seed} at {list(spatial_size)} in {time.perf_counter() - start:.0f} s")
        paths.append(path)
    return paths


def load_pair(path: str | Path) -> SimulatedPair:
    """A pair written by :func:`cached_pairs`."""
    with np.load(path) as data:
        fields = {key: data[key] for key in data.files}
    text = str(fields["simulation"])
    fields["simulation"] = json.loads(text) if text.startswith("{\"") else ast.literal_eval(text)
    fields["spacing"] = tuple(float(s) for s in fields["spacing"])
    return SimulatedPair(**fields)


def moving_coverage(pair: SimulatedPair) -> np.ndarray | None:
    """Where a follow-up's moving scan has data on the fixed grid, ``(X, Y, Z)`` 0/1, as the bundle computes it from
    the scan's own grid (:class:`~elastic_hypermorph_bundle.data.transforms.ResampleToFixedd`'s
    ``moving_coverage``); ``None`` for a pair on one grid (a breath-hold pair), which the bundle gives none.

    The cache holds the follow-up already resampled into the fixed grid (:func:`on_fixed_grid`, for the peers), not
    its own grid; that grid is the simulation's draw, replayed here (:func:`followup_geometry` with the case's seed
    and the fixed grid's size and spacing, as :func:`~elastic_hypermorph_bundle.simulation.followup.
    simulate_followup_pair` drew it) and checked against the shape and voxel size the case recorded.

    Raises:
        ValueError: when the replayed grid is not the recorded one (the simulation changed since the pair was
            cached: simulate it again).
    """
    from monai.data import MetaTensor

    from elastic_hypermorph_bundle.data.transforms import COVERAGE_KEY, ResampleToFixedd

    record = pair.simulation or {}
    if record.get("preset") != "followup":
        return None
    rng = np.random.default_rng([int(record["seed"]), 2])
    _, affine, shape, drawn = followup_geometry(pair.fixed_image.shape, pair.spacing, rng)
    if list(shape) != list(record["followup_shape"]) or not np.allclose(drawn["followup_spacing"],
                                                                          record["followup_spacing"]):
        raise ValueError(f"the follow-up grid replayed for seed {record['seed']} ({list(shape)}, "
                         f"{drawn['followup_spacing']} mm) is not the recorded one ({record['followup_shape']}, "
                         f"{record['followup_spacing']} mm): simulate the pair again.")
    fixed = MetaTensor(torch.zeros(1, *pair.fixed_image.shape), affine=torch.as_tensor(pair.affine))
    moving = MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))
    moving.meta["original_affine"] = affine
    covered = ResampleToFixedd("moving_image")({"fixed_image": fixed, "moving_image": moving})
    return covered[COVERAGE_KEY][0].numpy()


def evaluate_ddf(ddf: np.ndarray | torch.Tensor, pair) -> dict:
    """Metrics of a DDF ``(3, X, Y, Z)`` (voxels, package convention) against a simulated pair's ground truth, under
    the bundle's names (:func:`~elastic_hypermorph_bundle.metrics.pair_metrics` of the lung masks and keypoints:
    ``tre_mm`` of the vessel-bifurcation keypoints, ``dice_mean`` of the lungs, ``folding_percent`` and
    ``sd_log_jacobian`` over the whole field, the elastic energies), plus two that need the simulation:
    ``tre_dense_mm``, the mean ``|u - u_gt|`` in mm over the fixed lung mask, and ``dice_labels_mean``, the mean
    Dice over the phantom's labels."""
    ddf = torch.as_tensor(np.asarray(ddf, dtype=np.float32))[None]
    spacing = torch.tensor(pair.spacing, dtype=torch.float32)
    volume = lambda array: torch.from_numpy(np.asarray(array).astype(np.int64))[None, None]  # noqa: E731
    metrics = pair_metrics(
        ddf, fixed_mask=volume(pair.fixed_mask), moving_mask=volume(pair.moving_mask),
        fixed_points=pair.fixed_keypoints, moving_points=pair.moving_keypoints, spacing=spacing, masked=False,
    )
    labels = pair_metrics(ddf, fixed_mask=volume(pair.fixed_labels), moving_mask=volume(pair.moving_labels))
    error = (ddf[0] - torch.from_numpy(pair.displacement)) * spacing.view(3, 1, 1, 1)
    lung = torch.from_numpy(pair.fixed_mask > 0)
    return {
        **metrics,
        "tre_dense_mm": float(torch.linalg.vector_norm(error, dim=0)[lung].mean()),
        "dice_labels_mean": labels["dice_mean"],
    }


def train_tiny_model(pairs: list, seconds: float, folder: str | Path, seed: int = 0, learning_rate: float = 1e-3) -> Path:
    """Train a HyperUNet briefly on ``pairs`` (batch 1, Adam, uniform ``[lam, mu]`` in [0, 1], the bundle's loss)
    and export it as the bundle does (``model.pt`` + ``model.json``); for ``--quick`` runs without a release model.
    Returns the path of ``model.pt``."""
    torch.manual_seed(seed)
    space = HyperSpace("elastic")
    kwargs = {"hyper_dims": space.dims}
    net = HyperUNet(**kwargs)
    loss_fn = RegistrationLoss(regularizer="elastic")
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    images = [
        tuple(torch.from_numpy(normalise(image))[None, None] for image in (p.moving_image, p.fixed_image)) for p in pairs
    ]
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        moving, fixed = images[steps % len(images)]
        loss = training_terms(net, loss_fn, moving, fixed, space.sample(1, generator))["loss"]  # the bundle's step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    from elastic_hypermorph_bundle.model_card import ModelCard

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    ModelCard(space, "HyperUNet", kwargs, spatial_size=list(pairs[0].fixed_image.shape),
              pixdim=list(pairs[0].spacing), hu_window=list(HU_WINDOW),
              training={"steps": steps, "seconds": time.perf_counter() - start, "note": "benchmark --quick model"}
              ).save(folder)
    return folder / "model.pt"


def run_method(spec: dict, pair_paths: list[Path], timeout: float = 3600) -> dict:
    """Run one method (``spec``: ``name``, ``kind`` in :data:`KINDS`, options) on all pairs in a fresh process
    (:mod:`bench.register_probe`); score each pair's DDF against its ground truth. Returns the method's row
    (:func:`summarise`), or ``{"method", "skipped"}`` / ``{"method", "error"}``, or ``{"method", "timed_out_s",
    "pairs"}`` when the method did not finish all pairs within ``timeout`` seconds (the process is killed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(REPO_ROOT / "scripts"),
                                                      env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="bench_register_") as scratch:
        job = {"spec": spec, "pairs": [str(p) for p in pair_paths], "scratch": scratch}
        try:
            completed = subprocess.run([sys.executable, "-m", "bench.register_probe", json.dumps(job)],
                                       capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
        except subprocess.TimeoutExpired:
            return {"method": spec["name"], "kind": spec["kind"], "timed_out_s": float(timeout),
                    "pairs": len(pair_paths)}
        if completed.returncode != 0:
            return {"method": spec["name"], "kind": spec["kind"],
                    "error": f"exited with {completed.returncode}: {completed.stderr.strip()[-800:]}"}
        report = json.loads(completed.stdout.strip().splitlines()[-1])
        if "skipped" in report:
            return {"method": spec["name"], "kind": spec["kind"], "skipped": report["skipped"]}
        results = []
        for index, path in enumerate(pair_paths):
            ddf = np.load(Path(scratch) / f"ddf_{index}.npy")
            results.append(evaluate_ddf(ddf, load_pair(path)))
    return summarise(spec, results, report)


def summarise(spec: dict, results: list[dict], report: dict) -> dict:
    """One method's row: the means of the per-pair metrics, the median seconds per pair, the process's peak RSS."""
    row = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
    row.update({
        "method": spec["name"], "kind": spec["kind"], "options": spec.get("options", {}), "pairs": len(results),
        "seconds_per_pair": float(np.median(report["seconds"])), "seconds": report["seconds"],
        "peak_rss_mib": report["peak_rss_mib"], "baseline_rss_mib": report["baseline_rss_mib"],
        "per_pair": results,
    })
    for key in ("seconds_network", "seconds_optimize", "device", "details"):
        if key in report:
            row[key] = report[key]
    return row
