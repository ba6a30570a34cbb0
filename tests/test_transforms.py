"""MONAI transforms of Learn2Reg pairs: intensity, resampling/cropping with points, inverse DDF mapping."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from elastic_hypermorph_bundle.data import (
    Learn2RegDataError,
    HounsfieldOffsetd,
    ddf_to_original_grid,
    detect_hu_offset,
    discover_pairs,
    map_points,
    read_points,
    registration_transforms,
    write_points,
)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "learn2reg_lungct_sample"
AFFINE = np.array([[1.75, 0, 0, -30.0], [0, 1.25, 0, 12.0], [0, 0, 1.75, 5.0], [0, 0, 0, 1]])


def write_pair(root, fixed, moving, points=None, masks=None, affine=AFFINE):
    """Write a pair (arrays) as NIfTI/CSV files; return the pair dict the loader would give."""
    root.mkdir(parents=True, exist_ok=True)
    pair = {"pair_id": "0001_0001", "case": {}}
    for role, image in (("fixed", fixed), ("moving", moving)):
        pair[f"{role}_image"] = str(root / f"{role}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(image, np.float32), affine), pair[f"{role}_image"])
        if masks is not None:
            pair[f"{role}_mask"] = str(root / f"{role}_mask.nii.gz")
            nib.save(nib.Nifti1Image(np.asarray(masks, np.uint8), affine), pair[f"{role}_mask"])
        if points is not None:
            pair[f"{role}_keypoints"] = str(write_points(root / f"{role}.csv", points))
    return pair


def ramp(shape, axis):
    """10 * voxel index along ``axis``: a linear function, reproduced exactly by linear interpolation."""
    return 10.0 * np.indices(shape)[axis]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_points_follow_resampling_and_crop_exactly(tmp_path, axis):
    shape = (20, 24, 18)
    rng = np.random.default_rng(axis)
    points = rng.uniform(3, np.array(shape) - 4, (60, 3))
    pair = write_pair(tmp_path, ramp(shape, axis), ramp(shape, axis), points=points)
    transform = registration_transforms(
        spatial_size=(12, 14, 22), pixdim=(2.5, 2.0, 1.5), hu_window=(0.0, 1000.0), hu_offset=0, with_masks=False
    )
    out = transform(pair)
    assert out["fixed_image"].shape == (1, 12, 14, 22)
    for role in ("fixed", "moving"):
        mapped = out[f"{role}_keypoints"].numpy().astype(np.float64)
        inside = np.all((mapped >= 1) & (mapped <= np.array([12, 14, 22]) - 2), axis=1)
        assert inside.sum() >= 10
        values = map_coordinates(out[f"{role}_image"][0].numpy(), mapped[inside].T, order=1)
        np.testing.assert_allclose(values, 10.0 * points[inside, axis] / 1000.0, atol=2e-5)


@pytest.mark.parametrize(
    "pixdim, block",
    [((1.0, 1.0, 1.25), 0),  # finer grid: a single marked voxel is never lost
     ((2.0, 1.5, 2.0), 1)],  # coarser grid: 3x3x3 marked blocks
)
def test_marked_voxels_stay_marked_after_resampling_and_crop(tmp_path, pixdim, block):
    shape = (16, 20, 14)
    centres = np.array([[4, 5, 4], [11, 14, 9], [8, 10, 6], [12, 5, 10]])
    mask = np.zeros(shape, np.uint8)
    for c in centres:
        mask[tuple(slice(v - block, v + block + 1) for v in c)] = 1
    pair = write_pair(tmp_path, mask * 1000.0 - 1000.0, mask * 1000.0 - 1000.0, points=centres, masks=mask)
    out = registration_transforms(spatial_size=(24, 28, 20), pixdim=pixdim)(pair)
    network_mask = out["fixed_mask"][0].numpy()
    assert set(np.unique(network_mask)) == {0.0, 1.0}
    voxels = np.round(out["fixed_keypoints"].numpy()).astype(int)
    assert np.all((voxels >= 0) & (voxels < network_mask.shape))
    assert network_mask[tuple(voxels.T)].tolist() == [1.0] * len(centres)
    assert network_mask.sum() < mask.size  # other voxels stay unmarked


def test_crop_and_pad_shift_points_by_half_the_size_change(tmp_path):
    shape = (10, 8, 6)
    points = np.array([[2.0, 3.0, 1.0], [7.25, 0.5, 4.0]])
    pair = write_pair(tmp_path, np.zeros(shape), np.zeros(shape), points=points, masks=np.ones(shape))
    out = registration_transforms(spatial_size=(6, 10, 6))(pair)  # crop 2 per side, pad 1 per side
    assert out["fixed_mask"].shape == (1, 6, 10, 6)
    np.testing.assert_allclose(out["moving_keypoints"].numpy(), points + [-2.0, 1.0, 0.0])
    np.testing.assert_allclose(out["fixed_image"].affine.numpy()[:3, 3], AFFINE[:3, 3] + [2 * 1.75, -1.25, 0.0])


def test_reorientation_flips_points_and_inverse_ddf(tmp_path):
    shape = (5, 6, 4)
    points = np.array([[0.0, 0.0, 0.0], [1.5, 4.0, 3.0]])
    pair = write_pair(tmp_path, np.zeros(shape), np.zeros(shape), points=points)
    out = registration_transforms(axcodes="LPS", with_masks=False)(pair)  # file is RAS: x and y flip
    np.testing.assert_allclose(out["fixed_keypoints"].numpy(), [[4.0, 5.0, 0.0], [2.5, 1.0, 3.0]])
    image = out["fixed_image"]
    ddf = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    back = ddf_to_original_grid(ddf, image.affine, image.meta["original_affine"], image.meta["spatial_shape"])
    np.testing.assert_allclose(back[0, :, 2, 3, 1].numpy(), [-0.5, 1.0, 2.0], atol=1e-6)


def test_hu_offset_detection_and_override(tmp_path):
    rng = np.random.default_rng(0)
    hu = np.full((8, 8, 8), -1024.0)
    hu[2:6, 2:6, 2:6] = rng.uniform(-950, 400, (4, 4, 4))
    assert detect_hu_offset(torch.as_tensor(hu)) == 0 and detect_hu_offset(hu + 1000) == 1000
    stored_hu = registration_transforms(with_masks=False, with_keypoints=False)(write_pair(tmp_path / "a", hu, hu))
    shifted = registration_transforms(with_masks=False, with_keypoints=False)(write_pair(tmp_path / "b", hu + 1000, hu))
    assert stored_hu["fixed_image"].meta["hu_offset"] == 0 and shifted["fixed_image"].meta["hu_offset"] == 1000
    torch.testing.assert_close(shifted["fixed_image"].as_tensor(), stored_hu["fixed_image"].as_tensor())
    expected = np.clip((hu + 1000.0) / 1500.0, 0, 1)  # window (-1000, 500) HU -> [0, 1]
    np.testing.assert_allclose(stored_hu["moving_image"][0].numpy(), expected, atol=1e-6)
    forced = registration_transforms(hu_offset=0, with_masks=False, with_keypoints=False)(
        write_pair(tmp_path / "c", hu + 1000, hu)
    )
    assert forced["fixed_image"].meta["hu_offset"] == 0 and forced["fixed_image"].max() == 1.0
    with pytest.raises(ValueError, match="offset must be None"):
        HounsfieldOffsetd("fixed_image", offset=1024)
    with pytest.raises(ValueError, match="hu_window"):
        registration_transforms(hu_window=(500.0, -1000.0))


def test_non_finite_voxels_raise_naming_the_file(tmp_path):
    image = np.zeros((4, 4, 4))
    image[1, 2, 3] = np.nan
    pair = write_pair(tmp_path, np.zeros((4, 4, 4)), image)
    with pytest.raises(RuntimeError) as error:  # MONAI's Compose wraps the transform's error
        registration_transforms(with_masks=False, with_keypoints=False)(pair)
    assert isinstance(error.value.__cause__, Learn2RegDataError)
    assert "moving_image" in str(error.value.__cause__) and "moving.nii.gz contains non-finite" in str(error.value.__cause__)


def test_ddf_to_original_grid_matches_the_network_field():
    original_affine = np.diag([1.75, 1.25, 1.75, 1.0])
    network_affine = np.array([[3.5, 0, 0, 7.0], [0, 2.5, 0, -5.0], [0, 0, 3.5, 3.5], [0, 0, 0, 1]])
    network_shape, original_shape = (12, 10, 9), (20, 18, 16)
    constant = torch.tensor([0.5, -1.0, 0.25]).view(1, 3, 1, 1, 1).expand(2, 3, *network_shape)
    back = ddf_to_original_grid(constant, network_affine, original_affine, original_shape)
    assert back.shape == (2, 3, *original_shape)
    torch.testing.assert_close(back, torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1).expand_as(back))
    # a linear field is interpolated exactly: x + u_orig(x) == M (y + u_net(y)) with y = M^-1 x
    rng = np.random.default_rng(0)
    linear, offset = rng.uniform(-0.1, 0.1, (3, 3)), rng.uniform(-2, 2, 3)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in network_shape], indexing="ij"), axis=0)
    ddf = torch.as_tensor(np.einsum("ij,j...->i...", linear, grid) + offset[:, None, None, None])[None]
    back = ddf_to_original_grid(ddf, network_affine, original_affine, original_shape)[0].numpy()
    x = np.stack(np.meshgrid(*[np.arange(s) for s in original_shape], indexing="ij"), axis=-1).reshape(-1, 3)
    y = map_points(torch.as_tensor(x, dtype=torch.float64), original_affine, network_affine).numpy()
    inside = np.all((y >= 0) & (y <= np.array(network_shape) - 1), axis=1)
    expected = map_points(torch.as_tensor(y + y @ linear.T + offset), network_affine, original_affine).numpy()
    np.testing.assert_allclose((x + back.reshape(3, -1).T)[inside], expected[inside], atol=1e-9)
    with pytest.raises(ValueError, match="ddf must have shape"):
        ddf_to_original_grid(ddf[0], network_affine, original_affine, original_shape)


def link_sample(root):
    (root / "imagesTr").mkdir(parents=True)
    for folder in ("masksTr", "landmarksTr"):
        (root / folder).symlink_to(SAMPLE / folder)
    for mask in sorted((SAMPLE / "masksTr").glob("LungCT_0001_*.nii.gz")):
        (root / "imagesTr" / mask.name).symlink_to(mask)  # no CT images are available: masks stand in
    return root


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real Learn2Reg sample not found at {SAMPLE}")
def test_real_case_tre_and_dice_on_network_grid(tmp_path):
    pair = discover_pairs(link_sample(tmp_path / "lung")).pairs[0]
    transform = registration_transforms(
        spatial_size=(128, 128, 128), pixdim=(2.5, 2.5, 2.5), with_keypoints=False, with_landmarks=True
    )
    out = transform(pair)
    fixed, moving = out["fixed_landmarks"].double(), out["moving_landmarks"].double()
    assert fixed.shape == (81, 3)
    # zero field: TRE in mm on the network grid is the published initial TRE of case 1
    assert ((moving - fixed) * 2.5).norm(dim=1).mean().item() == pytest.approx(20.2, abs=0.05)
    f_mask, m_mask = out["fixed_mask"] > 0.5, out["moving_mask"] > 0.5
    assert (2 * (f_mask & m_mask).sum() / (f_mask.sum() + m_mask.sum())).item() == pytest.approx(0.71, abs=0.02)
    # a constant network-grid field gives the same TRE (mm) when mapped back to the file grid
    shift = torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64)
    network_tre = ((fixed + shift - moving) * 2.5).norm(dim=1)
    image = out["fixed_image"]
    ddf = shift.view(1, 3, 1, 1, 1).expand(1, 3, *image.shape[1:])
    back = ddf_to_original_grid(ddf, image.affine, image.meta["original_affine"], image.meta["spatial_shape"])
    assert back.shape == (1, 3, 192, 192, 208)
    fixed_file = read_points(pair["fixed_landmarks"])
    moving_file = read_points(pair["moving_landmarks"])
    u = back[0, :, *np.round(fixed_file).astype(int).T].T.numpy()  # constant field: any sample point works
    original_tre = np.linalg.norm((fixed_file + u - moving_file) * [1.75, 1.25, 1.75], axis=1)
    np.testing.assert_allclose(original_tre, network_tre.numpy(), atol=1e-4)


def test_the_transforms_load_the_optional_files_the_pair_has(tmp_path):
    """Masks and points are loaded when the pair dict lists them, without the config telling the transforms."""
    image = ramp((12, 10, 8), 0)
    full = write_pair(tmp_path / "full", image, image, points=np.array([[2.0, 3.0, 4.0]]), masks=image > 30)
    bare = write_pair(tmp_path / "bare", image, image)
    transform = registration_transforms(spatial_size=(16, 16, 16), pixdim=(1.5, 1.5, 1.5))
    loaded, plain = transform(full), transform(bare)
    assert loaded["fixed_mask"].shape == loaded["fixed_image"].shape and loaded["moving_keypoints"].shape == (1, 3)
    assert not any(key in plain for key in ("fixed_mask", "moving_mask", "fixed_keypoints", "moving_keypoints"))
    assert isinstance(registration_transforms(with_masks=False)(full)["fixed_mask"], str)  # left as the path
    with pytest.raises(RuntimeError) as error:  # MONAI wraps the KeyError of the transform
        registration_transforms(with_masks=True)(bare)
    assert "fixed_mask" in str(error.value.__cause__)
    with pytest.raises(ValueError, match="with_masks must be None"):
        registration_transforms(with_masks="false")
