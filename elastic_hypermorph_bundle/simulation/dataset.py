"""Simulated datasets in the Learn2Reg 2021+ layout: :func:`make_synthetic_dataset` writes ``num_pairs`` cases of
:func:`.generator.simulate_pair` (images, masks, labels, keypoints, ground-truth displacements, optional previews)
and the dataset JSON, atomically (see :mod:`.generator` for the files' conventions)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..data.io import write_points
from ..data.learn2reg import split_sizes
from .case import SimulatedPair
from .generator import simulate_pair
from .options import BASE_OPTIONS, resolve_settings
from .phantom import LABELS

__all__ = ["make_synthetic_dataset", "DATASET_NAME"]

logger = logging.getLogger("elastic_hypermorph_bundle")

DATASET_NAME = "LungCT"
DISPLACEMENT_CONVENTION = (
    "displacementsTr/<name>_XXXX.nii.gz: ground truth of pair XXXX in voxels of the fixed (_0000) grid, "
    "channel-last (X, Y, Z, 3), channel j along array axis j, fixed image affine; backward mapping: the fixed "
    "voxel x corresponds to the moving (_0001) point x + u(x) (Learn2Reg convention)."
)


_SIMULATION_OPTIONS = {
    name: parameter.default
    for name, parameter in inspect.signature(simulate_pair).parameters.items()
    if name not in ("seed", "real_ct")  # make_synthetic_dataset sets these per case
}
"""The keyword options of :func:`simulate_pair` that :func:`make_synthetic_dataset` takes, with their defaults."""


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)  # nibabel's gzip writer stores mtime 0: same array, same bytes


def _write_pair(root: Path, case: str, pair: SimulatedPair, preview: bool) -> tuple[list[dict], dict]:
    """Write one case's files under ``root``; return its per-image JSON entries and its pair entry."""
    entries = []
    for phase, image, mask, labels, points, affine in (
        ("0000", pair.fixed_image, pair.fixed_mask, pair.fixed_labels, pair.fixed_keypoints, pair.affine),
        ("0001", pair.moving_image, pair.moving_mask, pair.moving_labels, pair.moving_keypoints, pair.moving_affine),
    ):
        name = f"{DATASET_NAME}_{case}_{phase}"
        _save_nifti(image, affine, root / "imagesTr" / f"{name}.nii.gz")
        _save_nifti(mask, affine, root / "masksTr" / f"{name}.nii.gz")
        _save_nifti(labels, affine, root / "labelsTr" / f"{name}.nii.gz")
        write_points(root / "keypointsTr" / f"{name}.csv", points, fmt="%.6f")
        entries.append(
            {
                "image": f"./imagesTr/{name}.nii.gz",
                "mask": f"./masksTr/{name}.nii.gz",
                "label": f"./labelsTr/{name}.nii.gz",
                "keypoints": f"./keypointsTr/{name}.csv",
            }
        )
    displacement = f"./displacementsTr/{DATASET_NAME}_{case}.nii.gz"
    _save_nifti(np.moveaxis(pair.displacement, 0, -1), pair.affine, root / displacement)
    if preview and pair.moving_grid_affine is None:  # a follow-up's grid differs: no preview
        _write_preview(root / "previews" / f"{DATASET_NAME}_{case}.png", pair, title=f"{DATASET_NAME}_{case}")
    simulation = {**pair.simulation, "num_keypoints": len(pair.fixed_keypoints), "displacement": displacement}
    return entries, {"fixed": entries[0]["image"], "moving": entries[1]["image"], "simulation": simulation}


def _write_preview(path: Path, pair: SimulatedPair, title: str) -> None:
    import torch
    from monai.networks.blocks import Warp

    from ..visualize import save_pair_png

    moving = torch.as_tensor(pair.moving_image, dtype=torch.float32)[None, None]
    warped = Warp(mode="bilinear", padding_mode="border")(moving, torch.as_tensor(pair.displacement)[None])[0, 0]
    save_pair_png(
        path,
        pair.fixed_image,
        pair.moving_image,
        warped=warped,
        fixed_mask=pair.fixed_mask,
        moving_mask=pair.moving_mask,
        ddf=pair.displacement,
        spacing=pair.spacing,
        title=title,
    )


def make_synthetic_dataset(
    output_dir: str | os.PathLike,
    num_pairs: int = 6,
    seed: int = 0,
    preview: bool = False,
    overwrite: bool = False,
    real_ct: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    real_ct_fraction: float = 0.0,
    **simulation,
) -> Path:
    """Write ``num_pairs`` simulated pairs as a Learn2Reg 2021+ dataset (see the module docstring); return its path.

    Case ``i`` (1-based id ``XXXX``) is :func:`simulate_pair` with the seed
    ``numpy.random.SeedSequence(seed).spawn(num_pairs)[i - 1].generate_state(1)[0]`` (recorded in its
    ``simulation`` entry, so one case can be regenerated alone). The first cases are ``training_paired_images``,
    then ``registration_val`` and ``registration_test`` with sizes from :func:`.learn2reg.split_sizes` (20/4/6
    proportions, at least one each from 3 pairs on). Same arguments, byte-identical files.

    With ``real_ct`` (a chest CT, NIfTI in HU; or a list of them; or a folder, meaning its ``*.nii.gz`` / ``*.nii``
    files in name order) a fraction ``real_ct_fraction`` of the cases, spread evenly over the list (case ``i``,
    0-based, when ``floor((i + 1) f) > floor(i f)``), use a real CT as the exhale anatomy, the ``k``-th such case
    the CT ``k mod n`` of the ``n`` given (so several anatomies share the real-CT cases in turn); their
    ``simulation`` record says ``"anatomy": "real_ct"`` and names the CT. The CTs are read, never copied into the
    dataset. To hold an anatomy out of training, leave it out of the list.

    The dataset is built in a hidden sibling folder and renamed into place at the end, so an interrupted run
    leaves no partial dataset.

    Args:
        output_dir: the dataset folder.
        num_pairs: number of cases.
        seed: the dataset's seed (the cases' seeds derive from it, see above).
        preview: also write a PNG preview of each case under ``previews``.
        overwrite: replace an existing ``output_dir``.
        real_ct: a chest CT, a list of them or a folder of them, the exhale anatomy of some cases (see above).
        real_ct_fraction: the fraction of the cases on a real CT.
        simulation: the keyword options of simulate_pair (all but ``seed`` and ``real_ct``), the same for every
            case; ``spatial_size`` defaults to (64, 64, 64).

    Raises:
        FileExistsError: ``output_dir`` exists and is not an empty folder, and ``overwrite`` is false.
        ValueError: an unknown or invalid option (see :func:`simulate_pair`).
    """
    output_dir = Path(output_dir).absolute()
    num_pairs = int(num_pairs)
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}.")
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"output_dir {output_dir} exists and is not empty; pass overwrite=True to replace it.")
    unknown = set(simulation) - set(_SIMULATION_OPTIONS)
    if unknown:
        raise ValueError(f"unknown simulation options {sorted(unknown)}; valid: {sorted(_SIMULATION_OPTIONS)}.")
    simulation = {**_SIMULATION_OPTIONS, **simulation}
    # refuse bad options before writing anything
    spatial_size, spacing, poisson_range, mu_range, resolved = resolve_settings(**simulation)
    real_ct_fraction = float(real_ct_fraction)
    if not 0.0 <= real_ct_fraction <= 1.0:
        raise ValueError(f"real_ct_fraction must be in [0, 1], got {real_ct_fraction}.")
    if simulation["preset"] == "followup" and real_ct_fraction < 1:
        raise ValueError(f"preset 'followup' needs real_ct and real_ct_fraction 1 (got {real_ct_fraction}).")
    if real_ct_fraction > 0 and real_ct is None:
        raise ValueError("real_ct_fraction > 0 needs real_ct, the path of a chest CT.")
    real_cts = _real_ct_paths(real_ct)
    uses_real_ct = [np.floor((i + 1) * real_ct_fraction) > np.floor(i * real_ct_fraction) for i in range(num_pairs)]
    anatomies = [None] * num_pairs
    for k, i in enumerate(i for i, on_real_ct in enumerate(uses_real_ct) if on_real_ct):
        anatomies[i] = real_cts[k % len(real_cts)]
    record = {
        "noise_std": float(resolved["noise_std"]),
        "poisson_range": list(poisson_range),
        "mu_range": list(mu_range),
        "max_displacement_range": list(resolved["max_displacement_range"]),
    }
    if simulation["preset"] is not None or any(simulation[k] is not None for k in BASE_OPTIONS if k not in record):
        # the values in effect, whichever of the caller, the preset or the base set them
        # (the pleural load only when drawn: datasets written before the option existed keep their bytes)
        record.update(preset=simulation["preset"], **{k: v for k, v in resolved.items() if k not in record
                                                      and not (k == "pleural_load_range" and v is None)})
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in record.items()}
    if simulation["padding_fraction"] != _SIMULATION_OPTIONS["padding_fraction"]:
        record["padding_fraction"] = float(simulation["padding_fraction"])
    if real_cts:  # one CT keeps the record of a single path
        names = [str(path.absolute()) for path in real_cts]
        record.update(real_ct=names[0] if len(names) == 1 else names, real_ct_fraction=real_ct_fraction)
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(num_pairs)]
    cases = [f"{i:04d}" for i in range(1, num_pairs + 1)]
    num_train, num_val, _ = split_sizes(num_pairs)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for folder in ("imagesTr", "masksTr", "labelsTr", "keypointsTr", "displacementsTr"):
            (staging / folder).mkdir(parents=True)
        images, pairs = [], []
        for case, case_seed, anatomy in zip(cases, seeds, anatomies):
            start = time.perf_counter()
            pair = simulate_pair(seed=case_seed, real_ct=anatomy, **simulation)
            entries, pair_entry = _write_pair(staging, case, pair, preview)
            images += entries
            pairs.append(pair_entry)
            logger.info("synthetic case %s (seed %d) written in %.1f s", case, case_seed, time.perf_counter() - start)
        spec = {
            "name": DATASET_NAME,
            "description": "Simulated breathing lung CT: exhale (_0000, fixed) and inhale (_0001, moving) of an "
            "analytic thorax phantom, the inhale displacement solving the linear elastic (Navier-Lame) "
            "equilibrium under a breathing body force.",
            # the module that simulates every case (simulate_pair); the record stays as it was written before the
            # dataset writer had its own module, so the same options still give byte-identical files
            "reference": "elastic_hypermorph_bundle.simulation.generator",
            "licence": "Apache-2.0 (synthetic data)",
            "release": __version__,
            "pairings": "paired",
            "registration_direction": {"fixed": 0, "moving": 1},
            "modality": {"0": "CT", "1": "CT"},
            "labels": {"0": "background", "1": "lung"},
            "label_map": {str(k): v for k, v in LABELS.items()},
            "tensorImageSize": "3D",
            # a follow-up's images have their own shapes
            **({} if simulation["preset"] == "followup" else {"tensorImageShape": {"0": list(spatial_size)}}),
            "spacing": list(spacing),
            "displacement_convention": DISPLACEMENT_CONVENTION.replace("<name>", DATASET_NAME),
            "generator": {"seed": int(seed), "num_pairs": num_pairs, **record},
            "numTraining": len(images),
            "numTest": 0,
            "training": images,
            "test": [],
            "numPairedTraining": num_train,
            "training_paired_images": pairs[:num_train],
            "numRegistration_val": num_val,
            "registration_val": pairs[num_train : num_train + num_val],
            "numRegistration_test": num_pairs - num_train - num_val,
            "registration_test": pairs[num_train + num_val :],
        }
        (staging / f"{DATASET_NAME}_dataset.json").write_text(json.dumps(spec, indent=4) + "\n")
        if output_dir.exists():
            retired = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
            os.replace(output_dir, retired)
            shutil.rmtree(retired) if retired.is_dir() else retired.unlink()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _real_ct_paths(real_ct: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """The chest CTs named by ``real_ct`` of :func:`make_synthetic_dataset`: none, one file, a list of files, or a
    folder (its ``*.nii.gz`` and ``*.nii`` files in name order).

    Raises:
        FileNotFoundError: a named CT is not a file, or a folder holds no NIfTI file.
        ValueError: an empty list.
    """
    if real_ct is None:
        return []
    if isinstance(real_ct, (str, os.PathLike)) and Path(real_ct).is_dir():
        folder = Path(real_ct)
        paths = sorted({*folder.glob("*.nii.gz"), *folder.glob("*.nii")})
        if not paths:
            raise FileNotFoundError(f"real_ct folder {folder} holds no chest CT (*.nii.gz or *.nii).")
        return paths
    paths = [Path(real_ct)] if isinstance(real_ct, (str, os.PathLike)) else [Path(p) for p in real_ct]
    if not paths:
        raise ValueError("real_ct is an empty list; name at least one chest CT or pass None.")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"real_ct {path} is not a file (a chest CT in NIfTI format, HU).")
    return paths
