"""Fixed and moving images on different grids (shape, spacing, origin, orientation) register in physical space:
the moving image, its mask and its points are taken into the fixed grid through both affines; images that do not
overlap, and masks off their image's grid, are refused before any work."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from elastic_hypermorph_bundle.data import Learn2RegDataError, registration_transforms, validate_pairs, write_points
from elastic_hypermorph_bundle.data.grids import boxes_overlap, grid_offset_voxels, world_box
from elastic_hypermorph_bundle.optimize import instance_optimize

FIXED_AFFINE = np.array([[1.5, 0, 0, 10.0], [0, 1.5, 0, 20.0], [0, 0, 1.5, 30.0], [0, 0, 0, 1]])


def moving_affine(degrees=6.0):
    """A follow-up's grid: x flipped, other spacings, rotated about z, another origin; it covers the fixed grid."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.2, 1.0, 2.0])
    affine[:3, 3] = [66.0, 6.0, 20.0]
    return affine


def write(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def smooth_volume(shape, seed):
    return (gaussian_filter(np.random.default_rng(seed).random(shape), 2.0) * 3000 - 1500).astype(np.float32)


@pytest.fixture()
def pair(tmp_path):
    """A 24x26x22 fixed image and a 52x62x24 moving image whose grid covers it, with masks and points."""
    moving = smooth_volume((52, 62, 24), 1)
    pair = {
        "fixed_image": write(tmp_path / "fixed.nii.gz", smooth_volume((24, 26, 22), 0), FIXED_AFFINE),
        "moving_image": write(tmp_path / "moving.nii.gz", moving, moving_affine()),
        "fixed_mask": write(tmp_path / "fixed_mask.nii.gz", np.ones((24, 26, 22), np.uint8), FIXED_AFFINE),
        "moving_mask": write(tmp_path / "moving_mask.nii.gz", (moving > 0).astype(np.uint8), moving_affine()),
        "fixed_keypoints": str(write_points(tmp_path / "fixed.csv", np.array([[5.0, 6, 7], [20, 10, 12]]))),
        "moving_keypoints": str(write_points(tmp_path / "moving.csv", np.array([[10.0, 20, 7], [30, 12, 15]]))),
    }
    return pair


def test_moving_image_mask_and_points_go_into_the_fixed_grid(pair):
    validate_pairs([pair])
    out = registration_transforms(hu_offset=0)(pair)
    for key in ("fixed_image", "moving_image", "fixed_mask", "moving_mask"):
        assert out[key].shape == (1, 24, 26, 22), key
        assert np.allclose(out[key].affine, FIXED_AFFINE), key
    assert set(out["moving_mask"].unique().tolist()) == {0.0, 1.0}  # nearest neighbour keeps labels
    # a moving point is at the same world position before (its file grid) and after (the fixed grid)
    moving_points = np.loadtxt(pair["moving_keypoints"], delimiter=",")
    world = moving_points @ moving_affine()[:3, :3].T + moving_affine()[:3, 3]
    mapped = out["moving_keypoints"].double().numpy()
    assert np.allclose(mapped @ FIXED_AFFINE[:3, :3].T + FIXED_AFFINE[:3, 3], world, atol=1e-4)
    fixed_points = np.loadtxt(pair["fixed_keypoints"], delimiter=",")
    assert np.allclose(out["fixed_keypoints"].numpy(), fixed_points, atol=1e-5)  # the fixed grid is not touched


def test_different_grids_give_the_field_of_the_pair_resampled_by_hand(pair, tmp_path):
    """SimpleITK resamples the moving image into the fixed grid (linear, physical space); registering that pair and
    the pair on two grids gives the same field."""
    fixed = sitk.ReadImage(pair["fixed_image"])
    by_hand = sitk.Resample(sitk.ReadImage(pair["moving_image"]), fixed, sitk.Transform(), sitk.sitkLinear, -1000.0)
    sitk.WriteImage(by_hand, str(tmp_path / "by_hand.nii.gz"))
    transform = registration_transforms(hu_offset=0, with_masks=False, with_keypoints=False)
    two_grids = transform({k: pair[k] for k in ("fixed_image", "moving_image")})
    one_grid = transform({"fixed_image": pair["fixed_image"], "moving_image": str(tmp_path / "by_hand.nii.gz")})
    assert torch.allclose(two_grids["moving_image"], one_grid["moving_image"], atol=1e-5)
    fields = [
        instance_optimize(p["fixed_image"][None], p["moving_image"][None], 0.1, 0.05, steps=5, levels=2,
                          spacing=(1.5, 1.5, 1.5))
        for p in (two_grids, one_grid)
    ]
    assert fields[0].abs().max() > 0.01  # the optimisation moved
    assert torch.allclose(fields[0], fields[1], atol=1e-4)


def test_a_pair_on_one_grid_is_left_as_it_is(pair, tmp_path):
    """A moving image within a small fraction of a voxel of the fixed grid (two exports of one scan) is not
    resampled, and is accepted with masks whose origin is rounded."""
    shifted = FIXED_AFFINE.copy()
    shifted[:3, 3] += 0.001  # mm
    image = smooth_volume((24, 26, 22), 2)
    pair = {"fixed_image": pair["fixed_image"], "moving_image": write(tmp_path / "m.nii.gz", image, shifted),
            "fixed_mask": write(tmp_path / "fm.nii.gz", np.ones((24, 26, 22), np.uint8), shifted),
            "moving_mask": write(tmp_path / "mm.nii.gz", np.ones((24, 26, 22), np.uint8), FIXED_AFFINE)}
    validate_pairs([pair])
    out = registration_transforms(hu_offset=0)(pair)
    expected = np.clip((image + 1000.0) / 1500.0, 0.0, 1.0)
    assert np.allclose(out["moving_image"][0].numpy(), expected, atol=1e-6)


def test_refusals_are_one_line_and_say_what_to_do(pair, tmp_path):
    far = moving_affine()
    far[:3, 3] += [0.0, 0.0, 500.0]
    apart = dict(pair, moving_image=write(tmp_path / "far.nii.gz", np.zeros((52, 62, 24), np.float32), far))
    apart.pop("moving_mask")
    with pytest.raises(Learn2RegDataError, match=r"far.nii.gz \(world .* mm\) and fixed image .* do not overlap") as error:
        validate_pairs([apart], voxels=False)
    assert "\n" not in str(error.value)
    off = FIXED_AFFINE.copy()
    off[0, 3] += 0.5  # a third of a voxel
    bad_mask = dict(pair, fixed_mask=write(tmp_path / "off.nii.gz", np.ones((24, 26, 22), np.uint8), off))
    with pytest.raises(Learn2RegDataError, match=r"off.nii.gz lies up to 0.333 voxels off the grid of its image") as error:
        validate_pairs([bad_mask], voxels=False)
    assert "\n" not in str(error.value) and "resample the mask onto its image's grid" in str(error.value)
    short = dict(pair, fixed_mask=write(tmp_path / "short.nii.gz", np.ones((24, 26, 21), np.uint8), FIXED_AFFINE))
    with pytest.raises(Learn2RegDataError, match=r"short.nii.gz has shape \(24, 26, 21\), but its image"):
        validate_pairs([short], voxels=False)


def test_grid_geometry():
    assert grid_offset_voxels((4, 4, 4), FIXED_AFFINE, FIXED_AFFINE) == 0.0
    flipped = FIXED_AFFINE @ np.array([[-1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # same voxels
    assert grid_offset_voxels((4, 4, 4), flipped, FIXED_AFFINE) == pytest.approx(3.0)  # index order differs
    box = world_box((4, 4, 4), FIXED_AFFINE)
    assert np.allclose(box, [[9.25, 19.25, 29.25], [15.25, 25.25, 35.25]])
    assert np.allclose(world_box((4, 4, 4), flipped), box)
    touching = FIXED_AFFINE.copy()
    touching[0, 3] += 6.0
    assert boxes_overlap(box, box) and not boxes_overlap(box, world_box((4, 4, 4), touching))
