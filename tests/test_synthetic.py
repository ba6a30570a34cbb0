"""Simulated breathing lung dataset: physics (Navier–Lamé), ground-truth consistency, layout, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from elastic_hypermorph_bundle.data.io import read_points
from elastic_hypermorph_bundle.data.learn2reg import discover_pairs, split_sizes
from elastic_hypermorph_bundle.metrics import sample_field_at_points
from elastic_hypermorph_bundle.simulation import dataset as dataset_writer
from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
from elastic_hypermorph_bundle.simulation.generator import simulate_pair
from elastic_hypermorph_bundle.simulation.options import LUNG_FIELD_OF_VIEW_MM
from elastic_hypermorph_bundle.simulation.navier import navier_lame_operator, solve_navier_lame

REPO = Path(__file__).resolve().parents[1]
SIZE = (40, 40, 40)


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("synthetic") / "lung"
    root = make_synthetic_dataset(output_dir, num_pairs=3, spatial_size=SIZE, seed=7, noise_std=0.0)
    return root, json.loads((root / "LungCT_dataset.json").read_text())


def _pairs(spec: dict) -> list[dict]:
    return spec["training_paired_images"] + spec["registration_val"] + spec["registration_test"]


# --- discrete elasticity -------------------------------------------------------------------------------------------


def test_solver_inverts_the_discrete_operator_exactly():
    rng = np.random.default_rng(0)
    force = rng.normal(size=(3, 12, 10, 14))
    force -= force.mean(axis=(1, 2, 3), keepdims=True)
    spacing = (1.5, 1.0, 2.0)
    u = solve_navier_lame(force, lam=4.0, mu=1.3, spacing=spacing)
    np.testing.assert_allclose(navier_lame_operator(u, 4.0, 1.3, spacing), -force, atol=1e-10)
    np.testing.assert_allclose(u.mean(axis=(1, 2, 3)), 0, atol=1e-12)


def test_operator_matches_the_continuous_navier_lame_operator():
    # u = (sin(k x), 0, 0): mu lap u + (lam + mu) grad div u = -(lam + 2 mu) k^2 u (longitudinal wave)
    n, h, lam, mu = 64, 0.5, 3.0, 2.0
    k = 2 * np.pi / (n * h)
    x = np.arange(n)[:, None, None] * h * np.ones((n, 4, 4))
    u = np.stack([np.sin(k * x), np.zeros_like(x), np.zeros_like(x)])
    result = navier_lame_operator(u, lam, mu, (h, h, h))
    np.testing.assert_allclose(result, -(lam + 2 * mu) * k**2 * u, atol=1e-3 * (lam + 2 * mu) * k**2)


def test_solver_rejects_a_net_force_and_bad_parameters():
    force = np.ones((3, 4, 4, 4))
    with pytest.raises(ValueError, match="zero mean"):
        solve_navier_lame(force, 1.0, 1.0, (1, 1, 1))
    with pytest.raises(ValueError, match="mu > 0"):
        solve_navier_lame(force - 1, 1.0, 0.0, (1, 1, 1))
    with pytest.raises(ValueError, match=r"\(3, X, Y, Z\)"):
        solve_navier_lame(force[:2], 1.0, 1.0, (1, 1, 1))


# --- one simulated case --------------------------------------------------------------------------------------------


def test_stored_field_solves_navier_lame_and_is_reproducible_from_its_seed(dataset):
    root, spec = dataset
    entry = spec["training_paired_images"][0]
    record = entry["simulation"]
    pair = simulate_pair(SIZE, seed=record["seed"], noise_std=0.0)
    stored = _load(root / record["displacement"])
    assert stored.shape == (*SIZE, 3) and stored.dtype == np.float32
    np.testing.assert_array_equal(np.moveaxis(stored, -1, 0), pair.displacement)
    np.testing.assert_array_equal(_load(root / entry["fixed"]), pair.fixed_image)

    u_mm = pair.displacement.astype(np.float64) * np.asarray(pair.spacing)[:, None, None, None]
    residual = navier_lame_operator(u_mm, record["lam"], record["mu"], pair.spacing) + pair.force
    interior = (slice(None),) + (slice(1, -1),) * 3  # the periodic stencil wraps at the crop border
    assert np.abs(residual[interior]).max() < 1e-4 * np.abs(pair.force).max()
    # the field depends on the material: another Poisson ratio gives another solution
    other = navier_lame_operator(u_mm, 4 * record["lam"], record["mu"], pair.spacing) + pair.force
    assert np.abs(other[interior]).max() > 1e-2 * np.abs(pair.force).max()


def test_magnitudes_are_breathing_like(dataset):
    root, spec = dataset
    for entry in _pairs(spec):
        record = entry["simulation"]
        u_mm = _load(root / record["displacement"]) * np.asarray(spec["spacing"])
        lung = _load(root / entry["moving"].replace("imagesTr", "masksTr")).astype(bool)
        magnitude = np.linalg.norm(u_mm, axis=-1)
        assert 12.0 <= record["max_displacement_mm"] <= 20.0
        np.testing.assert_allclose(magnitude[lung].max(), record["max_displacement_mm"], rtol=1e-4)
        z = np.nonzero(lung.any(axis=(0, 1)))[0]
        third = (z.max() - z.min()) // 3
        lower = magnitude[:, :, z.min() : z.min() + third][lung[:, :, z.min() : z.min() + third]].mean()
        upper = magnitude[:, :, z.max() - third :][lung[:, :, z.max() - third :]].mean()
        assert lower > 2 * upper
        assert (u_mm[..., 2][lung] < 0).mean() > 0.9  # inhale: the lungs move caudally (-z)


def test_ground_truth_maps_fixed_onto_moving_keypoints(dataset):
    root, spec = dataset
    for entry in _pairs(spec):
        fixed_points = read_points(root / "keypointsTr" / Path(entry["fixed"]).name.replace(".nii.gz", ".csv"))
        moving_points = read_points(root / "keypointsTr" / Path(entry["moving"]).name.replace(".nii.gz", ".csv"))
        assert len(fixed_points) == len(moving_points) == entry["simulation"]["num_keypoints"] > 100
        stored = _load(root / entry["simulation"]["displacement"])
        ddf = torch.as_tensor(np.moveaxis(stored, -1, 0), dtype=torch.float64)
        mapped = fixed_points + sample_field_at_points(ddf, fixed_points).numpy()
        np.testing.assert_allclose(mapped, moving_points, atol=1e-5)
        assert np.linalg.norm((moving_points - fixed_points) * spec["spacing"], axis=1).mean() > 2.0
        # fixed keypoints are vessel bifurcations inside the fixed lung: brighter than the average lung voxel
        fixed_image = _load(root / entry["fixed"]).astype(np.float64)
        fixed_lung = _load(root / entry["fixed"].replace("imagesTr", "masksTr")).astype(bool)
        assert fixed_lung[tuple(np.rint(fixed_points).astype(int).T)].all()
        at_points = fixed_image[tuple(np.rint(fixed_points).astype(int).T)]
        assert at_points.mean() > fixed_image[fixed_lung].mean() + 50


def test_warping_moving_with_ground_truth_reproduces_fixed(dataset):
    root, spec = dataset
    warp = Warp(mode="bilinear", padding_mode="border")
    for entry in _pairs(spec):
        ddf = torch.as_tensor(np.moveaxis(_load(root / entry["simulation"]["displacement"]), -1, 0))[None]
        fixed, moving = (_load(root / entry[k]).astype(np.float32) for k in ("fixed", "moving"))
        masks = [_load(root / entry[k].replace("imagesTr", "masksTr")).astype(np.float32) for k in ("fixed", "moving")]
        warped = warp(torch.as_tensor(moving)[None, None], ddf)[0, 0].numpy()
        warped_mask = warp(torch.as_tensor(masks[1])[None, None], ddf)[0, 0].numpy() > 0.5
        body = _load(root / entry["fixed"].replace("imagesTr", "labelsTr")) > 0
        error, unwarped_error = np.abs(warped - fixed)[body].mean(), np.abs(moving - fixed)[body].mean()
        assert error < 0.6 * unwarped_error
        assert np.corrcoef(warped[body], fixed[body])[0, 1] > 0.9
        fixed_mask = masks[0].astype(bool)
        assert _dice(warped_mask, fixed_mask) > 0.96 > _dice(masks[1].astype(bool), fixed_mask) + 0.01


def test_different_seeds_give_different_cases(dataset):
    root, spec = dataset
    first, second = _pairs(spec)[:2]
    assert first["simulation"]["seed"] != second["simulation"]["seed"]
    assert first["simulation"]["lam"] != second["simulation"]["lam"]
    assert not np.array_equal(_load(root / first["moving"]), _load(root / second["moving"]))
    fields = [_load(root / entry["simulation"]["displacement"]) for entry in (first, second)]
    assert not np.array_equal(*fields)


def test_noise_has_the_requested_level():
    clean, noisy = (simulate_pair((24, 24, 24), seed=1, noise_std=s) for s in (0.0, 30.0))
    difference = noisy.moving_image.astype(np.float64) - clean.moving_image
    assert 25.0 < difference[clean.moving_image > -1000].std() < 35.0
    np.testing.assert_array_equal(noisy.displacement, clean.displacement)


# --- dataset layout ------------------------------------------------------------------------------------------------


def test_dataset_json_and_files_follow_learn2reg(dataset):
    root, spec = dataset
    num_train, num_val, num_test = split_sizes(3)
    assert spec["name"] == "LungCT" and spec["tensorImageSize"] == "3D" and spec["modality"]["0"] == "CT"
    assert spec["tensorImageShape"] == {"0": list(SIZE)}
    assert spec["numTraining"] == len(spec["training"]) == 6
    assert [len(spec[k]) for k in ("training_paired_images", "registration_val", "registration_test")] == [
        num_train,
        num_val,
        num_test,
    ]
    np.testing.assert_allclose(spec["spacing"], np.divide(LUNG_FIELD_OF_VIEW_MM, SIZE))
    for i, entry in enumerate(_pairs(spec), start=1):
        assert entry["fixed"] == f"./imagesTr/LungCT_{i:04d}_0000.nii.gz"
        assert entry["moving"] == f"./imagesTr/LungCT_{i:04d}_0001.nii.gz"
        record = entry["simulation"]
        np.testing.assert_allclose(record["poisson_ratio"], record["lam"] / (2 * (record["lam"] + record["mu"])))
        np.testing.assert_allclose(record["youngs_modulus"], 2 * record["mu"] * (1 + record["poisson_ratio"]))
        assert 0.3 <= record["poisson_ratio"] <= 0.45 and 1.5 <= record["mu"] <= 8.0
    for image_entry in spec["training"]:
        image = nib.load(str(root / image_entry["image"]))
        assert image.shape == SIZE and image.get_data_dtype() == np.int16
        np.testing.assert_allclose(image.affine, np.diag([*spec["spacing"], 1.0]))
        mask = _load(root / image_entry["mask"])
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert set(np.unique(_load(root / image_entry["label"]))) <= set(range(8))
        first_line = (root / image_entry["keypoints"]).read_text().splitlines()[0].split(",")
        assert len(first_line) == 3 and all(float(v) >= 0 for v in first_line)  # no header, 0-based voxels
        hu = _load(root / image_entry["image"])
        assert hu.min() <= -990 and hu.max() >= 600  # outside air and bone


def test_loader_reads_the_dataset_without_special_cases(dataset):
    root, spec = dataset
    found = discover_pairs(root)
    assert found.layout == "json" and [p["pair_id"] for p in found.pairs] == ["0001_0001", "0002_0002", "0003_0003"]
    assert found.predefined_splits["val"] == ["0002_0002"] and found.predefined_splits["test"] == ["0003_0003"]
    pair = found.pairs[0]
    assert Path(pair["fixed_mask"]) == root / "masksTr" / "LungCT_0001_0000.nii.gz"
    assert Path(pair["moving_keypoints"]) == root / "keypointsTr" / "LungCT_0001_0001.csv"
    assert pair["case"]["simulation"] == spec["training_paired_images"][0]["simulation"]


def test_same_seed_gives_the_same_bytes_and_refuses_to_overwrite(tmp_path):
    options = {"num_pairs": 1, "spatial_size": (24, 24, 24), "seed": 3}
    first, second = (make_synthetic_dataset(tmp_path / name, **options) for name in ("a", "b"))
    assert _hashes(first) == _hashes(second) and len(_hashes(first)) == 10
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_dataset(first, **options)
    make_synthetic_dataset(first, **{**options, "seed": 4}, overwrite=True)
    assert _hashes(first) != _hashes(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging folder left


def test_interrupted_run_leaves_no_partial_dataset(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return simulate_pair(*args, **kwargs)

    monkeypatch.setattr(dataset_writer, "simulate_pair", failing)  # the writer draws every case through it
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(tmp_path / "lung", num_pairs=2, spatial_size=(16, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_invalid_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="poisson_range"):
        simulate_pair((16, 16, 16), poisson_range=(0.3, 0.6))
    with pytest.raises(ValueError, match="spatial_size"):
        simulate_pair((16, 16))
    with pytest.raises(ValueError, match="num_pairs"):
        make_synthetic_dataset(tmp_path / "x", num_pairs=0)


@pytest.mark.slow
def test_cli_writes_a_dataset_with_previews(tmp_path):
    output = tmp_path / "cli"
    command = [sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "--output_dir", str(output)]
    command += ["--num_pairs", "1", "--spatial_size", "[24,24,24]", "--seed", "5", "--preview"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
    spec = json.loads((output / "LungCT_dataset.json").read_text())
    assert spec["tensorImageShape"] == {"0": [24, 24, 24]} and spec["generator"]["seed"] == 5
    preview = output / "previews" / "LungCT_0001.png"
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and preview.stat().st_size > 20_000
