"""The shipped release model: registers a pair right after install with the README's one-pair command, and the
zoo's large_files.yml lists it with the right hash."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from elastic_hypermorph_bundle.data import read_points
from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
from elastic_hypermorph_bundle.metrics import target_registration_error
from elastic_hypermorph_bundle.model_card import ModelCard

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "model.pt"


def test_large_files_lists_the_committed_release_with_its_sha256():
    listed = {entry["path"]: entry for entry in yaml.safe_load((ROOT / "large_files.yml").read_text())["large_files"]}
    assert set(listed) == {"models/model.pt", "models/model.json"}
    for path, entry in listed.items():
        assert entry["hash_type"] == "sha256"
        assert hashlib.sha256((ROOT / path).read_bytes()).hexdigest() == entry["hash_val"], path
    assert MODEL.stat().st_size <= 16 * 2**20


@pytest.mark.slow
def test_shipped_model_registers_a_pair_out_of_the_box(tmp_path):
    card = ModelCard.load(MODEL.with_name("model.json"))
    # a held-out simulated pair at the grid the release model was trained on (seed disjoint from its training set)
    data = make_synthetic_dataset(tmp_path / "LungCT", num_pairs=1, spatial_size=(48, 48, 52), seed=777)
    fixed, moving = data / "imagesTr" / "LungCT_0001_0000.nii.gz", data / "imagesTr" / "LungCT_0001_0001.nii.gz"
    out = tmp_path / "one_pair"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--fixed", str(fixed), "--moving", str(moving), "--lam", "0.2", "--mu", "0.1",
               "--output_dir", str(out), "--device", "cpu", "--write_submission", "true"]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    submission = nib.load(next((out / "submission").glob("disp_*.nii.gz")))
    field = np.asarray(submission.dataobj, dtype=np.float32)
    assert field.shape == (48, 48, 52, 3) and np.isfinite(field).all()
    assert card.preprocessing["pixdim"] is not None  # the release runs on its own coarse grid by default
    spacing = nib.load(fixed).header.get_zooms()[:3]
    fixed_points = read_points(data / "keypointsTr" / "LungCT_0001_0000.csv")
    moving_points = read_points(data / "keypointsTr" / "LungCT_0001_0001.csv")
    ddf = torch.from_numpy(np.moveaxis(field, -1, 0))
    registered = target_registration_error(ddf, fixed_points, moving_points, spacing).mean().item()
    before = target_registration_error(torch.zeros_like(ddf), fixed_points, moving_points, spacing).mean().item()
    assert registered < 0.7 * before, (registered, before)
