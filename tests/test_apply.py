"""configs/apply.json: a written registration applied to images (linear), label maps (nearest) and point sets (voxel
or mm, both directions), against the bundle's own warp of a known field."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("SimpleITK")

from elastic_hypermorph_bundle.data.io import read_points, write_points  # noqa: E402
from elastic_hypermorph_bundle.displacement import RAS_TO_LPS, write_displacement_field  # noqa: E402
from elastic_hypermorph_bundle.metrics import warp_points  # noqa: E402
from elastic_hypermorph_bundle.networks import warp_image, warp_label  # noqa: E402
from elastic_hypermorph_bundle.workflow.apply import ApplyRegistration  # noqa: E402
from elastic_hypermorph_bundle.workflow.writers import OutputFiles  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (22, 18, 14)


def _affine() -> np.ndarray:
    angle = math.radians(15.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    affine[:3, :3] = affine[:3, :3] @ np.diag([1.25, 1.5, -2.0])
    affine[:3, 3] = [-10.0, 30.0, 60.0]
    return affine


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A known smooth field written as a transform, a moving image (float "HU") and a label map on the same grid,
    fixed-space voxel points inside the grid."""
    folder = tmp_path_factory.mktemp("apply")
    generator = torch.Generator().manual_seed(3)
    smooth = lambda c, s: s * F.interpolate(torch.randn(1, c, 4, 4, 4, generator=generator), size=SHAPE,  # noqa: E731
                                            mode="trilinear", align_corners=True)[0]
    ddf, image = smooth(3, 0.8), 800.0 * smooth(1, 1.0)[0]
    labels = ((image > 0).to(torch.int16) + (image > 400).to(torch.int16))
    nib.save(nib.Nifti1Image(image.numpy(), _affine()), folder / "moving.nii.gz")
    nib.save(nib.Nifti1Image(labels.numpy(), _affine()), folder / "moving_labels.nii.gz")
    write_displacement_field(folder / "transform.nii.gz", ddf, _affine())
    points = 3 + torch.rand(40, 3, generator=generator, dtype=torch.float64) * (torch.tensor(SHAPE) - 7)
    write_points(folder / "fixed_points.csv", points.numpy(), fmt="%.8f")
    target = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")) + ddf.numpy()
    inside = np.all([(target[a] >= 0) & (target[a] <= SHAPE[a] - 1) for a in range(3)], axis=0)
    return {"folder": folder, "ddf": ddf, "image": image, "labels": labels, "points": points, "inside": inside}


def _apply(case, out, **options) -> Path:
    files = OutputFiles(out)
    files.run(ApplyRegistration(case["folder"] / "transform.nii.gz", files, **options).run)
    return out


def test_images_and_labels_are_warped_as_the_bundle_warps_them(case, tmp_path):
    folder = case["folder"]
    out = _apply(case, tmp_path / "out", image=str(folder / "moving.nii.gz"), label=[str(folder / "moving_labels.nii.gz")])
    warped = nib.load(out / "moving_warped.nii.gz")
    assert np.allclose(warped.affine, _affine(), atol=1e-4)  # on the fixed (the transform's) grid
    expected = warp_image(case["image"][None, None], case["ddf"][None])[0, 0].numpy()
    assert np.abs(warped.get_fdata() - expected)[case["inside"]].max() < 0.05
    labels = np.asarray(nib.load(out / "moving_labels_warped_labels.nii.gz").dataobj)
    expected_labels = warp_label(case["labels"][None, None], case["ddf"][None])[0, 0].numpy()
    assert labels.dtype == np.int16 and (labels == expected_labels)[case["inside"]].mean() > 0.99


def test_points_in_voxels_and_mm_both_directions(case, tmp_path):
    folder = case["folder"]
    fixed = case["points"].numpy()
    moved = read_points(_apply(case, tmp_path / "voxel", points=str(folder / "fixed_points.csv")) / "fixed_points_in_moving.csv")
    assert np.abs(moved - warp_points(case["ddf"].double(), case["points"]).numpy()).max() < 1e-4  # voxels
    # the same points in RAS millimetres give the same moved points in RAS millimetres
    to_ras = lambda p: p @ _affine()[:3, :3].T + _affine()[:3, 3]  # noqa: E731
    write_points(tmp_path / "fixed_ras.csv", to_ras(fixed), fmt="%.8f")
    moved_ras = read_points(_apply(case, tmp_path / "ras", points=str(tmp_path / "fixed_ras.csv"), points_space="ras")
                            / "fixed_ras_in_moving.csv")
    assert np.abs(moved_ras - to_ras(moved)).max() < 1e-3
    write_points(tmp_path / "fixed_lps.csv", to_ras(fixed) @ RAS_TO_LPS, fmt="%.8f")
    moved_lps = read_points(_apply(case, tmp_path / "lps", points=str(tmp_path / "fixed_lps.csv"), points_space="lps")
                            / "fixed_lps_in_moving.csv")
    assert np.abs(moved_lps - to_ras(moved) @ RAS_TO_LPS).max() < 1e-3
    # moving-space points back to the fixed space: the inverse recovers the fixed points
    write_points(tmp_path / "moving_points.csv", moved, fmt="%.8f")
    back = read_points(_apply(case, tmp_path / "back", points=str(tmp_path / "moving_points.csv"),
                              points_direction="moving_to_fixed") / "moving_points_in_fixed.csv")
    assert np.abs(back - fixed).max() < 2e-3


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({}, ValueError, "nothing to apply"),
        ({"image": "missing.nii.gz"}, FileNotFoundError, "--image missing.nii.gz does not exist"),
        ({"points": "POINTS", "points_space": "mm"}, ValueError, "--points_space must be one of"),
        ({"points": "POINTS", "points_direction": "backward"}, ValueError, "--points_direction must be one of"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(case, tmp_path, options, error, message):
    options = {k: str(case["folder"] / "fixed_points.csv") if v == "POINTS" else v for k, v in options.items()}
    with pytest.raises(error, match=message):
        ApplyRegistration(case["folder"] / "transform.nii.gz", OutputFiles(tmp_path / "out"), **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_apply_config_runs_from_the_command_line(case, tmp_path, bundle_run_in_process):
    folder = case["folder"]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/apply.json",
               "--transform", str(folder / "transform.nii.gz"), "--image", str(folder / "moving.nii.gz"),
               "--points", str(folder / "fixed_points.csv"), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".output_files.json", "fixed_points_in_moving.csv", "moving_warped.nii.gz"]
    again = bundle_run_in_process([str(ROOT / a) if a.startswith("configs/") else a for a in command[4:]])
    assert again.returncode != 0 and "--overwrite true" in again.stderr.strip().splitlines()[-1]
