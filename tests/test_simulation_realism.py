"""Realism options of the simulator, each checked on a small generated pair: mass conservation, sliding at the
pleura, per-phase acquisition, breath-hold amplitudes, fixed field of view, the preset, and a real CT as the
exhale anatomy (skipped when the shared CT is absent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp
from scipy import ndimage

from elastic_hypermorph_bundle.simulation import realism
from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
from elastic_hypermorph_bundle.simulation.generator import simulate_pair
from elastic_hypermorph_bundle.simulation.options import PRESETS, resolve_options

REPO = Path(__file__).resolve().parents[1]
SIZE = (40, 40, 40)


def _mm(pair) -> np.ndarray:
    return pair.displacement.astype(np.float64) * np.asarray(pair.spacing)[:, None, None, None]


def _parenchyma_mass(image: np.ndarray, labels: np.ndarray) -> float:
    return float((image[np.isin(labels, (2, 3))].astype(np.float64) + 1000).sum())


def test_mass_conservation_darkens_the_inhale_lung_by_the_volume_change():
    options = dict(noise_std=0.0, volume_change_range=(0.18, 0.18))
    plain = simulate_pair(SIZE, seed=2, **options)
    conserved = simulate_pair(SIZE, seed=2, mass_conservation=True, **options)
    np.testing.assert_array_equal(conserved.moving_image, plain.moving_image)
    np.testing.assert_array_equal(conserved.displacement, plain.displacement)
    # per voxel: HU + 1000 of the exhale parenchyma is that of the inhale one times det J
    parenchyma = np.isin(conserved.fixed_labels, (2, 3))
    jacobian = realism.jacobian_determinant(_mm(plain), plain.spacing)
    ratio = (conserved.fixed_image[parenchyma] + 1000.0) / (plain.fixed_image[parenchyma] + 1000.0)
    assert np.median(np.abs(ratio / jacobian[parenchyma] - 1)) < 0.01
    # over the lungs: the parenchyma's mass is the same in both phases, the inhale lung is darker
    volume_ratio = conserved.moving_mask.sum() / conserved.fixed_mask.sum()
    assert volume_ratio > 1.12
    for pair, expected in ((conserved, 1.0), (plain, volume_ratio)):
        mass_ratio = _parenchyma_mass(pair.moving_image, pair.moving_labels) / _parenchyma_mass(
            pair.fixed_image, pair.fixed_labels
        )
        assert abs(mass_ratio - expected) < 0.05, (mass_ratio, expected)
    lung_hu = [img[np.isin(lab, (2, 3))].mean() for img, lab in (
        (conserved.fixed_image, conserved.fixed_labels), (conserved.moving_image, conserved.moving_labels))]
    assert lung_hu[1] < lung_hu[0] - 15


def test_sliding_is_tangential_at_the_pleura_and_fold_free_on_each_side():
    fields = {s: _mm(simulate_pair(SIZE, seed=4, noise_std=0.0, sliding=s)) for s in (0.0, 1.0)}
    pair = simulate_pair(SIZE, seed=4, noise_std=0.0, sliding=1.0)
    lungs = pair.fixed_mask.astype(bool)
    spacing = np.asarray(pair.spacing)
    normal = np.stack(np.gradient(ndimage.gaussian_filter(lungs.astype(float), 4.0 / spacing), *spacing))
    normal /= np.maximum(np.linalg.norm(normal, axis=0), 1e-12)
    jumps = {}
    for s, u in fields.items():
        normal_jump, tangential_jump = [], []
        for axis in range(3):  # neighbouring voxels across the pleura: inside a, outside b = a + e_axis
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[axis], b[axis] = slice(0, -1), slice(1, None)
            for inside, outside in ((a, b), (b, a)):
                cross = lungs[tuple(inside)] & ~lungs[tuple(outside)]
                jump = (u[(slice(None), *outside)] - u[(slice(None), *inside)])[:, cross]
                n = normal[(slice(None), *inside)][:, cross]
                along = (jump * n).sum(axis=0)
                normal_jump.append(np.abs(along))
                tangential_jump.append(np.linalg.norm(jump - along * n, axis=0))
        jumps[s] = np.concatenate(normal_jump).mean(), np.concatenate(tangential_jump).mean()
    # sliding: a tangential jump of several mm at the pleura, the normal motion continuous
    assert jumps[1.0][1] > 3.0 and jumps[1.0][1] > 3 * jumps[0.0][1], jumps
    assert jumps[1.0][0] < 0.5 * jumps[1.0][1], jumps
    assert pair.simulation["sliding"] == 1.0 and pair.simulation["max_slip_mm"] > 3.0
    # each side stays fold-free: det J > 0 wherever the difference stencil stays on one side
    jacobian = realism.jacobian_determinant(fields[1.0], spacing)
    one_side = ndimage.binary_erosion(lungs) | ndimage.binary_erosion(~lungs)
    assert jacobian[one_side].min() > 0
    np.testing.assert_array_equal(fields[1.0][:, ndimage.binary_erosion(lungs, iterations=2)],
                                  fields[0.0][:, ndimage.binary_erosion(lungs, iterations=2)])
    with pytest.raises(ValueError, match="sliding"):
        simulate_pair((16, 16, 16), sliding=1.5)


def test_acquire_applies_blur_shift_and_noise():
    rng = np.random.default_rng(0)
    flat = np.full((30, 30, 30), 40.0, dtype=np.float32)
    noisy = realism.acquire(flat, (1.0, 1.0, 1.0), rng, noise_std=25.0, shift_hu=-12.0)
    assert abs(noisy.mean() - 28.0) < 1.0 and abs(noisy.std() - 25.0) < 1.0 and noisy.dtype == np.int16
    step = np.where(np.arange(40)[:, None, None] < 20, -800.0, 40.0) * np.ones((40, 4, 4), dtype=np.float32)
    sharp, blurred = (realism.acquire(step, (2.0, 1.0, 1.0), rng, 0.0, blur_sigma_mm=b) for b in (0.0, 4.0))
    width = [np.count_nonzero((img[:, 2, 2] > -750) & (img[:, 2, 2] < -10)) for img in (sharp, blurred)]
    assert width[0] == 0 and width[1] >= 3  # a 4 mm sigma spreads the edge over several 2 mm voxels


def test_each_phase_gets_its_own_noise_blur_and_shift():
    clean = simulate_pair(SIZE, seed=5, noise_std=0.0)
    shifted = simulate_pair(SIZE, seed=5, noise_std=0.0, intensity_shift_range=(-20.0, 20.0))
    noisy = simulate_pair(SIZE, seed=5, noise_std_range=(5.0, 40.0))
    blurred = simulate_pair(SIZE, seed=5, noise_std=0.0, blur_range=(1.0, 3.0))
    shifts = [shifted.simulation["acquisition"][p]["shift_hu"] for p in ("fixed", "moving")]
    stds = [noisy.simulation["acquisition"][p]["noise_std"] for p in ("fixed", "moving")]
    assert shifts[0] != shifts[1] and stds[0] != stds[1]
    for phase, shift, std in zip(("fixed_image", "moving_image"), shifts, stds):
        base = getattr(clean, phase).astype(np.float64)
        unclipped = base > -1000
        assert abs(np.median((getattr(shifted, phase) - base)[unclipped]) - shift) <= 1.0
        assert abs((getattr(noisy, phase) - base)[unclipped].std() / std - 1) < 0.15
        # blur lowers the image's roughness (mean absolute difference of neighbours)
        roughness = [np.abs(np.diff(image.astype(float), axis=0)).mean() for image in (getattr(blurred, phase), base)]
        assert roughness[0] < roughness[1]
    np.testing.assert_array_equal(shifted.displacement, clean.displacement)


@pytest.mark.parametrize("seed", [0, 1])
def test_realistic_preset_has_breath_hold_amplitudes(seed):
    pair = simulate_pair(SIZE, seed=seed, preset="realistic", fixed_field_of_view=False)
    tre_before = np.linalg.norm((pair.moving_keypoints - pair.fixed_keypoints) * pair.spacing, axis=1).mean()
    volume_change = pair.moving_mask.sum() / pair.fixed_mask.sum() - 1
    assert 8.0 <= tre_before <= 20.0, tre_before
    assert 0.10 <= volume_change <= 0.25, volume_change
    assert len(pair.fixed_keypoints) > 100
    # the default stays the gentle, small-deformation case
    plain = simulate_pair(SIZE, seed=seed)
    assert plain.moving_mask.sum() / plain.fixed_mask.sum() - 1 < 0.08


def test_fixed_field_of_view_moves_anatomy_out_of_the_slab():
    pair = simulate_pair(SIZE, seed=3, noise_std=0.0, fixed_field_of_view=True, volume_change_range=(0.15, 0.15))
    plain = simulate_pair(SIZE, seed=3, noise_std=0.0, volume_change_range=(0.15, 0.15))
    assert pair.fixed_image.shape == pair.moving_image.shape == pair.fixed_mask.shape == SIZE
    assert pair.displacement.shape == (3, *SIZE)
    # inhale lung bases below the slab; exhale lung points whose inhale position left the image
    assert pair.moving_mask[:, :, 0].any() and not plain.moving_mask[:, :, 0].any()
    lung = pair.fixed_mask.astype(bool)
    z = np.nonzero(lung)[2]
    assert (z + pair.displacement[2][lung] < 0).sum() > 10
    assert 5.0 <= pair.simulation["slab_depth_mm"] <= 25.0
    # kept keypoints are inside both images, and the ground truth still maps them
    top = np.subtract(SIZE, 1)
    for points in (pair.fixed_keypoints, pair.moving_keypoints):
        assert len(points) > 50 and np.all((points >= 0) & (points <= top))
    ddf = torch.as_tensor(pair.displacement)
    warped = Warp(mode="bilinear", padding_mode="border")(
        torch.as_tensor(pair.moving_image, dtype=torch.float32)[None, None], ddf[None])[0, 0].numpy()
    inner = ndimage.binary_erosion(lung, iterations=2) & (np.arange(SIZE[2]) > 8)[None, None]
    before, after = (np.corrcoef(image[inner], pair.fixed_image[inner])[0, 1] for image in (pair.moving_image, warped))
    assert after > 0.7 and after > before + 0.3, (before, after)  # lung texture at 8 mm voxels: vessels, blurred


def test_preset_resolution_and_validation(tmp_path):
    options = resolve_options("realistic")
    assert options["mass_conservation"] and options["fixed_field_of_view"] and options["sliding"] > 0
    assert options["volume_change_range"] is not None and options["noise_std_range"] is not None
    assert resolve_options("realistic", sliding=0.0)["sliding"] == 0.0  # explicit options win
    assert resolve_options()["mass_conservation"] is False
    with pytest.raises(ValueError, match="preset"):
        simulate_pair((16, 16, 16), preset="cinematic")
    with pytest.raises(ValueError, match="volume_change_range"):
        simulate_pair((16, 16, 16), volume_change_range=(0.3, 0.1))
    with pytest.raises(ValueError, match="mass_conservation"):
        make_synthetic_dataset(tmp_path / "x", num_pairs=1, spatial_size=(16, 16, 16), mass_conservation="yes")
    with pytest.raises(ValueError, match="real_ct"):
        make_synthetic_dataset(tmp_path / "x", num_pairs=1, spatial_size=(16, 16, 16), real_ct_fraction=0.5)
    with pytest.raises(ValueError, match=r"\['spatial_sise'\]; valid: .*'spatial_size'"):
        make_synthetic_dataset(tmp_path / "x", num_pairs=1, spatial_sise=(16, 16, 16))
    with pytest.raises(ValueError, match="poisson_range"):  # checked before anything is written
        make_synthetic_dataset(tmp_path / "x", num_pairs=1, spatial_size=(16, 16, 16), poisson_range=(0.3, 0.6))
    assert not (tmp_path / "x").exists()
    assert PRESETS["realistic"]["mass_conservation"] is True


def test_real_ct_exhale_anatomy_gives_a_consistent_pair(real_ct):
    from elastic_hypermorph_bundle.simulation.real_ct import load_real_ct, segment_lungs

    size, spacing = (40, 42, 55), (4.5, 4.5, 4.5)
    image, box = load_real_ct(real_ct(), size, spacing)
    lungs, body = segment_lungs(image, box)
    assert 0.15 < lungs.sum() / box.sum() < 0.6 and image[lungs].mean() < -600 and body.sum() > lungs.sum()
    pair = simulate_pair(size, spacing, seed=1, noise_std=0.0, real_ct=real_ct(), volume_change_range=(0.15, 0.15))
    assert pair.simulation["anatomy"] == "real_ct"
    np.testing.assert_array_equal(pair.fixed_mask.astype(bool), lungs)
    assert set(np.unique(pair.fixed_labels)) >= {2, 3, 4}  # both lungs and their vessels
    # keypoints: on vessels inside the lungs, mapped by the ground truth
    assert len(pair.fixed_keypoints) > 30
    nearest = tuple(np.rint(pair.fixed_keypoints).astype(int).T)
    assert lungs[nearest].all() and (pair.fixed_image[nearest] > np.median(pair.fixed_image[lungs])).all()
    sampled = np.stack([ndimage.map_coordinates(c, pair.fixed_keypoints.T, order=1) for c in pair.displacement], 1)
    np.testing.assert_allclose(pair.moving_keypoints, pair.fixed_keypoints + sampled, atol=1e-4)
    tre_before = np.linalg.norm((pair.moving_keypoints - pair.fixed_keypoints) * spacing, axis=1).mean()
    assert tre_before > 3.0
    # the inhale image warped back with the ground truth is the exhale image (interpolation aside)
    warped = Warp(mode="bilinear", padding_mode="border")(
        torch.as_tensor(pair.moving_image, dtype=torch.float32)[None, None],
        torch.as_tensor(pair.displacement)[None])[0, 0].numpy()
    inner = ndimage.binary_erosion(box, iterations=4)
    before = np.corrcoef(pair.moving_image[inner], pair.fixed_image[inner])[0, 1]
    after = np.corrcoef(warped[inner], pair.fixed_image[inner])[0, 1]
    assert after > 0.95 and after > before + 0.02, (before, after)
    assert 0.08 < pair.moving_mask.sum() / pair.fixed_mask.sum() - 1 < 0.3


def test_noisy_room_air_around_the_body_is_not_lung():
    """Air around the body with streaks (mean -940 HU: above the -950 of pure air, median -1000) reaches the scan's
    sides: it is room, not lung (before the median rule it was the "lung", the lungs themselves dropped as under
    10 % of it); lungs cut by the sides of a cropped scan (median -850) stay lungs."""
    from elastic_hypermorph_bundle.simulation.real_ct import segment_lungs

    shape = (40, 40, 30)
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    image = np.where(np.random.default_rng(0).random(shape) < 0.2, -700.0, -1000.0)
    body = (x / 17) ** 2 + (y / 14) ** 2 < 1
    image[body] = 40.0
    truth = np.zeros(shape, bool)
    for centre in (-7, 7):
        truth |= ((x - centre) / 5) ** 2 + (y / 8) ** 2 + (z / 12) ** 2 < 1
    image[truth] = -850.0
    assert -950 < image[~body].mean() < -930
    for crop in (slice(None), slice(9, 31)):  # the whole scan; a scan whose sides cut the lungs
        lungs, inside = segment_lungs(image[crop])
        found, expected = lungs[2:-2], truth[crop][2:-2]  # the closing's erosion thins the lungs at the scan's sides
        assert (found & expected).sum() / (found | expected).sum() > 0.9
        assert not (lungs & ~body[crop]).any() and (inside & ~body[crop]).sum() < 0.2 * (~body[crop]).sum()


def test_several_real_cts_share_the_real_ct_cases_in_turn(tmp_path, real_ct):
    folder = tmp_path / "cts"  # a folder means its NIfTI files in name order
    folder.mkdir()
    for name in ("lidc_idri_0001.nii.gz", "chest_ct_cropped.nii.gz"):
        (folder / name).symlink_to(real_ct(name))
    (folder / "README.md").write_text("not a CT")
    out = make_synthetic_dataset(tmp_path / "data", num_pairs=4, seed=5, spatial_size=(20, 20, 22),
                                 preset="realistic", real_ct=folder, real_ct_fraction=0.75)
    spec = json.loads((out / "LungCT_dataset.json").read_text())
    pairs = spec["training_paired_images"] + spec["registration_val"] + spec["registration_test"]
    # fraction 0.75 of 4: cases 1, 2, 3 (0-based) on a real CT, taking the two CTs in turn
    assert [p["simulation"]["anatomy"] for p in pairs] == ["phantom", "real_ct", "real_ct", "real_ct"]
    assert [p["simulation"].get("real_ct") for p in pairs[1:]] == [
        "chest_ct_cropped.nii.gz", "lidc_idri_0001.nii.gz", "chest_ct_cropped.nii.gz"]
    assert spec["generator"]["real_ct"] == [str(folder / "chest_ct_cropped.nii.gz"), str(folder / "lidc_idri_0001.nii.gz")]
    with pytest.raises(FileNotFoundError, match="holds no chest CT"):
        make_synthetic_dataset(tmp_path / "x", num_pairs=1, real_ct=tmp_path / "data" / "keypointsTr",
                               real_ct_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        make_synthetic_dataset(tmp_path / "x", num_pairs=1, real_ct=[real_ct(), folder / "missing.nii.gz"],
                               real_ct_fraction=1.0)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_mixes_phantom_and_real_ct_pairs(tmp_path, real_ct):
    out = tmp_path / "mixed"
    command = [sys.executable, "scripts/make_synthetic.py", "--output_dir", str(out), "--num_pairs", "2",
               "--spatial_size", "[24,24,26]", "--seed", "3", "--preset", "realistic", "--real_ct", str(real_ct()),
               "--real_ct_fraction", "0.5"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    spec = json.loads((out / "LungCT_dataset.json").read_text())
    pairs = spec["training_paired_images"] + spec["registration_val"] + spec["registration_test"]
    assert [p["simulation"]["anatomy"] for p in pairs] == ["phantom", "real_ct"]
    assert spec["generator"]["preset"] == "realistic" and spec["generator"]["real_ct_fraction"] == 0.5
    assert not any(p.suffix == ".nii" or p.name == real_ct().name for p in out.rglob("*"))


def test_pleural_load_makes_the_volume_change_follow_the_material():
    """With a drawn pleural load (not a drawn volume change) the solve with the case's material sets the volume
    change: the same case and load dilate the lungs less when less compressible (nu 0.45 vs 0.1), at the same
    maximum displacement; the realistic preset's volume-change draw is replaced, the rest of its draws kept."""
    def case(nu, **options):
        return simulate_pair(SIZE, seed=2, noise_std=0.0, preset="realistic", fixed_field_of_view=False,
                             poisson_range=(nu, nu), **options)

    soft, stiff = (case(nu, pleural_load_range=(1.0, 1.0)) for nu in (0.1, 0.45))
    for pair in (soft, stiff):
        record = pair.simulation
        assert record["pleural_load"] == 1.0 and "target_volume_change" not in record
        assert np.linalg.norm(_mm(pair), axis=0)[pair.moving_mask > 0].max() == pytest.approx(
            record["max_displacement_mm"], rel=0.05)
    assert soft.simulation["volume_change"] > 2 * stiff.simulation["volume_change"] > 0
    grown = [pair.moving_mask.sum() / pair.fixed_mask.sum() - 1 for pair in (soft, stiff)]
    assert grown[0] > grown[1]
    # the default (a drawn volume change) does not depend on the material: both reach the drawn target
    drawn = [case(nu).simulation for nu in (0.1, 0.45)]
    assert drawn[0]["target_volume_change"] == drawn[1]["target_volume_change"]
    assert "pleural_load" not in drawn[0]
    # the load takes the volume change's draw: the acquisition draws after it are unchanged
    assert soft.simulation["acquisition"] == case(0.1).simulation["acquisition"]
    with pytest.raises(ValueError, match="pleural_load_range"):
        simulate_pair((16, 16, 16), pleural_load_range=(2.0, 1.0))
