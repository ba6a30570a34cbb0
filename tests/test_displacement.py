"""The registration as an ITK displacement field: ITK (SimpleITK) applies the written file to points and images
as the bundle's own warp does, on a grid with rotation, a flipped axis and anisotropic voxels."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

sitk = pytest.importorskip("SimpleITK")

from elastic_hypermorph_bundle.displacement import (  # noqa: E402
    image_from_nifti,
    itk_grid,
    map_points,
    physical_points,
    read_displacement_field,
    resample,
    voxel_to_physical,
    write_displacement_field,
)
from elastic_hypermorph_bundle.metrics import warp_points  # noqa: E402
from elastic_hypermorph_bundle.networks import warp_image, warp_label  # noqa: E402

SHAPE = (20, 18, 16)


def _affine() -> np.ndarray:
    """Voxel -> RAS: spacing (1.5, 1.0, 2.0), a 20 degree rotation about z, the y axis flipped, an offset origin."""
    angle = math.radians(20.0)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, -1.0, 2.0])
    affine[:3, 3] = [-30.0, 12.0, -70.0]
    return affine


def _smooth(channels: int, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, channels, 4, 4, 4, generator=generator, dtype=torch.float64)
    return scale * F.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)[0]


@pytest.fixture
def written(tmp_path):
    ddf = _smooth(3, 0.8, seed=0)  # voxels, up to about 2 voxels, no folding
    moving = 1000.0 * _smooth(1, 1.0, seed=1)[0] - 500.0  # "HU"
    nib.save(nib.Nifti1Image(moving.numpy().astype(np.float32), _affine()), tmp_path / "moving.nii.gz")
    path = write_displacement_field(tmp_path / "transform.nii.gz", ddf, _affine())
    return path, ddf, moving, tmp_path / "moving.nii.gz"


def test_the_file_is_an_itk_vector_field_on_the_fixed_grid(written):
    path, ddf, _, moving_path = written
    header = nib.load(path).header
    assert header.get_intent()[0] == "vector" and nib.load(path).shape == (*SHAPE, 1, 3)
    image = sitk.ReadImage(str(path))
    origin, spacing, direction = itk_grid(_affine())
    assert np.allclose(image.GetOrigin(), origin) and np.allclose(image.GetSpacing(), (1.5, 1.0, 2.0))
    assert np.allclose(image.GetDirection(), direction)
    # the same grid as ITK's own reading of a NIfTI file with this affine
    reference = sitk.ReadImage(str(moving_path))
    assert np.allclose(reference.GetOrigin(), origin, atol=1e-4) and np.allclose(reference.GetDirection(), direction, atol=1e-5)


def test_itk_maps_points_as_the_bundle_does(written):
    path, ddf, _, _ = written
    transform, grid = read_displacement_field(path)
    generator = torch.Generator().manual_seed(2)
    # inside, away from the border: beyond the field's grid ITK's displacement is zero, so there the inverse is not unique
    points = 3 + torch.rand(50, 3, generator=generator, dtype=torch.float64) * (torch.tensor(SHAPE) - 7)
    bundle_moving = warp_points(ddf, points).numpy()  # moving voxels (moving shares the fixed grid)
    itk_moving = map_points(voxel_to_physical(points.numpy(), grid), transform)
    difference_mm = np.linalg.norm(itk_moving - voxel_to_physical(bundle_moving, grid), axis=1)
    assert difference_mm.max() < 0.01, difference_mm.max()
    assert np.linalg.norm(itk_moving - voxel_to_physical(points.numpy(), grid), axis=1).max() > 1.0  # it moved them
    # and back: the inverse map recovers the fixed points
    recovered = map_points(itk_moving, transform, inverse=True, tolerance=1e-4)
    assert np.abs(physical_points(recovered, grid, "voxel", inverse=True) - points.numpy()).max() < 1e-3
    # RAS and LPS millimetres are the same points
    ras = physical_points(itk_moving, grid, "ras", inverse=True)
    assert np.allclose(physical_points(ras, grid, "ras"), itk_moving) and np.allclose(ras[:, 2], itk_moving[:, 2])


def test_itk_warps_images_and_labels_as_the_bundle_does(written):
    path, ddf, moving, moving_path = written
    transform, grid = read_displacement_field(path)
    warped_itk = sitk.GetArrayFromImage(resample(image_from_nifti(moving_path), transform, grid)).transpose(2, 1, 0)
    warped = warp_image(moving[None, None].float(), ddf[None].float())[0, 0].numpy()
    # compare where x + u(x) lies inside the moving image (outside, ITK pads with the minimum, the bundle repeats the border)
    target = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")) + ddf.numpy()
    inside = np.all([(target[a] >= 0) & (target[a] <= SHAPE[a] - 1) for a in range(3)], axis=0)
    assert inside.mean() > 0.5
    assert np.abs(warped_itk[inside] - warped[inside]).max() < 1e-2  # "HU" of a +-1000 image, float32 rounding
    # label maps: nearest neighbour, same labels as the bundle's warp_label away from ties
    labels = (moving > 0).to(torch.uint8) + (moving > 300).to(torch.uint8)
    nib.save(nib.Nifti1Image(labels.numpy(), _affine()), moving_path.with_name("labels.nii.gz"))
    warped_labels = resample(image_from_nifti(moving_path.with_name("labels.nii.gz")), transform, grid, "nearest")
    itk_labels = sitk.GetArrayFromImage(warped_labels).transpose(2, 1, 0)
    bundle_labels = warp_label(labels[None, None], ddf[None].float())[0, 0].numpy()
    assert itk_labels.dtype == np.uint8 and set(np.unique(itk_labels)) <= {0, 1, 2}
    assert (itk_labels[inside] == bundle_labels[inside]).mean() > 0.99


def test_sheared_affine_and_non_fields_are_refused(tmp_path):
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="shear"):
        itk_grid(sheared)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), tmp_path / "image.nii.gz")
    with pytest.raises(ValueError, match="not a displacement field"):
        read_displacement_field(tmp_path / "image.nii.gz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_displacement_field(tmp_path / "missing.nii.gz")
