"""The simulator's follow-up case (``preset="followup"``): a real CT as the baseline, the follow-up in another
position on another grid, with ground truth in the Learn2Reg convention on the fixed grid (skipped without the
shared real CTs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from elastic_hypermorph_bundle.data import discover_pairs, registration_transforms, validate_pairs
from elastic_hypermorph_bundle.simulation.followup import followup_geometry
from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
from elastic_hypermorph_bundle.simulation.generator import simulate_pair

BASELINE = "lidc_idri_0001.nii.gz"  # the real CT of the baseline scans (the conftest's real_ct skips without it)
SIZE, SPACING = (48, 48, 52), (7.0, 5.0, 7.0)


def test_followup_geometry_draws_the_stated_ranges():
    rng = np.random.default_rng(0)
    for _ in range(20):
        motion, affine, shape, record = followup_geometry(SIZE, SPACING, rng)
        rotation = motion[:3, :3]
        assert np.allclose(rotation @ rotation.T, np.eye(3)) and np.linalg.det(rotation) == pytest.approx(1.0)
        assert 20.0 <= np.linalg.norm(record["followup_offset_mm"]) <= 50.0 and record["followup_rotation_deg"] <= 10.0
        # the rotation is about the grid's centre: T(c) = c + t
        centre = (np.asarray(SIZE) - 1) * np.asarray(SPACING) / 2
        assert np.allclose(motion[:3, :3] @ centre + motion[:3, 3], centre + record["followup_offset_mm"])
        voxel = np.abs(np.diag(affine[:3, :3]))
        assert np.all((voxel >= 0.8 * np.asarray(SPACING) - 1e-9) & (voxel <= 1.25 * np.asarray(SPACING) + 1e-9))
        assert affine[0, 0] < 0 and affine[1, 1] < 0 and affine[2, 2] > 0  # stored LPS
        assert list(shape) == record["followup_shape"]
    with pytest.raises(ValueError, match="unknown follow-up options"):
        followup_geometry(SIZE, SPACING, rng, offset=3)


def test_followup_pair_ground_truth_maps_points_and_images(real_ct):
    pair = simulate_pair(SIZE, SPACING, seed=3, preset="followup", real_ct=real_ct(BASELINE))
    assert pair.moving_image.shape != SIZE and not np.allclose(pair.moving_affine, pair.affine)
    # points: x + u(x), written in the follow-up's world, is the moving point of the follow-up's own grid
    u = np.stack([ndimage.map_coordinates(c, pair.fixed_keypoints.T, order=1) for c in pair.displacement], 1)
    world = (pair.fixed_keypoints + u) * SPACING
    moving_world = pair.moving_keypoints @ pair.moving_affine[:3, :3].T + pair.moving_affine[:3, 3]
    assert len(world) > 5 and np.abs(world - moving_world).max() < 1e-3
    assert np.linalg.norm(moving_world - pair.fixed_keypoints * SPACING, axis=1).mean() > 15.0  # a large offset
    # images: the follow-up sampled at the ground truth's points is the baseline (noise, blur, sliding aside)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in SIZE), indexing="ij"))
    to_moving = np.linalg.solve(pair.moving_affine, pair.affine)

    def sampled(points):
        voxels = np.einsum("ij,j...->i...", to_moving[:3, :3], points) + to_moving[:3, 3, None, None, None]
        return ndimage.map_coordinates(pair.moving_image.astype(float), voxels, order=1, cval=-1000.0)

    inner = ndimage.binary_erosion(pair.fixed_labels > 0, iterations=2)
    before = np.corrcoef(sampled(grid)[inner], pair.fixed_image[inner])[0, 1]
    after = np.corrcoef(sampled(grid + pair.displacement)[inner], pair.fixed_image[inner])[0, 1]
    assert after > 0.85 and after > before + 0.1, (before, after)


def test_followup_dataset_loads_onto_the_fixed_grid(tmp_path, real_ct):
    with pytest.raises(ValueError, match="real_ct_fraction 1"):
        make_synthetic_dataset(tmp_path / "x", num_pairs=1, spatial_size=SIZE, preset="followup")
    out = make_synthetic_dataset(tmp_path / "data", num_pairs=1, seed=4, spatial_size=SIZE, spacing=SPACING,
                                 preset="followup", real_ct=real_ct(BASELINE), real_ct_fraction=1.0)
    spec = json.loads((out / "LungCT_dataset.json").read_text())
    assert "tensorImageShape" not in spec and spec["generator"]["preset"] == "followup"
    (pair,) = discover_pairs(out).pairs
    validate_pairs([pair])
    loaded = registration_transforms()(pair)
    assert loaded["moving_image"].shape == loaded["fixed_image"].shape == (1, *SIZE)
    truth = torch.as_tensor(np.moveaxis(np.asarray(
        __import__("nibabel").load(out / "displacementsTr" / "LungCT_0001.nii.gz").dataobj), -1, 0))
    fixed = loaded["fixed_keypoints"].double()
    u = torch.stack([torch.as_tensor(ndimage.map_coordinates(c.numpy(), fixed.T.numpy(), order=1)) for c in truth], 1)
    # the moving points, read in the follow-up's own voxels, are mapped into the fixed grid where the truth sends
    # the fixed points (keypoint files are written with 6 decimals)
    assert torch.allclose(fixed + u, loaded["moving_keypoints"].double(), atol=1e-3)


def test_on_fixed_grid_is_what_the_bundle_sees(real_ct):
    from elastic_hypermorph_bundle.simulation.followup import on_fixed_grid

    pair = on_fixed_grid(simulate_pair(SIZE, SPACING, seed=5, preset="followup", real_ct=real_ct(BASELINE)))
    assert pair.moving_image.shape == pair.fixed_image.shape == SIZE and pair.moving_grid_affine is None
    u = np.stack([ndimage.map_coordinates(c, pair.fixed_keypoints.T, order=1) for c in pair.displacement], 1)
    assert np.abs(pair.fixed_keypoints + u - pair.moving_keypoints).max() < 1e-3
    assert pair.moving_image.min() >= -1024 and set(np.unique(pair.moving_mask)) <= {0, 1}
    assert on_fixed_grid(pair) is pair
