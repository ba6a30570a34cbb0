"""The targets of amortised optimisation (:mod:`elastic_hypermorph_bundle.losses.amortised`): the instance
optimisation's field of each training pair at a few ``(lam, mu)`` grid points, computed once and cached as ``.npz``.

Each target minimises the objective the inference pipeline optimises (:func:`~elastic_hypermorph_bundle.optimize.
instance_optimize`: MIND-SSC + the elastic energy at ``(lam, mu)`` in voxels of the grid, coarse to fine, its
default levels, control grid and step), started from the identity (so the target does not depend on any network),
on the pair as training reads it (``registration_transforms`` at the training ``spatial_size``/``pixdim``): the
network's grid, so a target compares voxel by voxel with the network's DDF.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..data.transforms import registration_transforms
from ..forward import plain
from ..losses.amortised import AmortisedTargets
from ..optimize import instance_optimize, similarity_features
from .datalists import pair_datalist

__all__ = ["DEFAULT_POINTS", "default_grid", "build_targets", "training_keys"]

logger = logging.getLogger("elastic_hypermorph_bundle")

#: the log-spaced values of each Lamé parameter in the default grid (with (0, 0) added): both ends of what the
#: optimisation's field does, from nearly free (0.05: folds start below it) to stiff (1, the trained range's top)
DEFAULT_POINTS = (0.05, 0.2236, 1.0)


def default_grid(points: Sequence[float] = DEFAULT_POINTS) -> list[tuple[float, float]]:
    """``(0, 0)`` and every ``(lam, mu)`` of ``points`` x ``points``."""
    return [(0.0, 0.0), *itertools.product((float(p) for p in points), repeat=2)]


def training_keys(amortised: AmortisedTargets | None = None) -> list[str]:
    """The pair keys training loads (``train#datalist#keys`` of ``configs/train.json``): the two images, and the
    fixed mask when amortised optimisation's term is masked (other keys stay out, so that masks are neither loaded
    nor cached when nothing reads them)."""
    return ["fixed_image", "moving_image", *(() if amortised is None else amortised.batch_keys)]


def build_targets(
    dataset_dir: str | Path,
    output: str | Path,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    hu_window: Sequence[float] = (-1000.0, 500.0),
    grid: Sequence[Sequence[float]] | None = None,
    max_pairs: int | None = None,
    split: str = "train",
    seed: int = 0,
    split_file: str | Path | None = None,
    steps: int = 25,
    similarity: str = "mind",
    dtype: str = "float16",
) -> Path:
    """Optimise every pair of ``split`` (the first ``max_pairs``) at every ``(lam, mu)`` of ``grid`` (default
    :func:`default_grid`) and write ``pair_ids``, ``hyper``, ``fields`` ``(P, G, 3, X, Y, Z)`` (voxels, ``dtype``)
    and the settings to ``output`` (``.npz``, written whole or not at all).

    Raises:
        ValueError: an empty grid, a grid row that is not ``(lam, mu) >= 0``, ``max_pairs`` < 1, ``output`` exists.
    """
    grid = default_grid() if grid is None else [tuple(float(v) for v in row) for row in grid]
    if not grid or any(len(row) != 2 or min(row) < 0 for row in grid):
        raise ValueError(f"grid must be a non-empty list of (lam, mu) >= 0, got {grid}.")
    if max_pairs is not None and int(max_pairs) < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}.")
    output = Path(output)
    if output.exists():
        raise ValueError(f"{output} exists; remove it or name another file.")
    pairs = pair_datalist(dataset_dir, split, seed=seed, split_file=split_file, keys=["fixed_image", "moving_image"])
    pairs = pairs[: None if max_pairs is None else int(max_pairs)]
    transform = registration_transforms(spatial_size, pixdim, tuple(hu_window), with_masks=False,
                                        with_keypoints=False, with_landmarks=False)
    fields, start = [], time.perf_counter()
    for count, pair in enumerate(pairs, 1):
        data = transform(pair)
        fixed, moving = (plain(data[key])[None].float() for key in ("fixed_image", "moving_image"))
        features = similarity_features(fixed, moving, similarity)
        rows = [instance_optimize(fixed, moving, lam, mu, None, similarity=similarity, steps=steps,
                                  features=features)[0].numpy().astype(dtype) for lam, mu in grid]
        fields.append(np.stack(rows))
        logger.info("amortised targets: pair %s (%d/%d) done, %.0f s", pair["pair_id"], count, len(pairs),
                    time.perf_counter() - start)
    return atomic_write(output, lambda stream: np.savez(
        stream, pair_ids=np.array([p["pair_id"] for p in pairs]), hyper=np.array(grid, np.float32),
        fields=np.stack(fields), spatial_size=np.array(spatial_size),
        pixdim=np.array([] if pixdim is None else pixdim, np.float32), steps=steps, similarity=similarity))
