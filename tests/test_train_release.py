"""scripts/train_release.sh: one command builds the realistic training set, trains on the coarse release grid,
scores the held-out test split, and leaves the committed models/ alone unless INSTALL=1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from elastic_hypermorph_bundle.model_card import ModelCard

ROOT = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_train_release_builds_data_trains_and_scores_without_touching_models(tmp_path):
    work = tmp_path / "release"
    shipped = {name: _digest(ROOT / "models" / name) for name in ("model.pt", "model.json")}
    env = {**os.environ, "WORK": str(work), "PAIRS": "3", "EPOCHS": "1", "VAL_INTERVAL": "1", "THREADS": "1",
           "REAL_CT_FRACTION": "0.34"}
    completed = subprocess.run(["bash", "scripts/train_release.sh"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    spec = json.loads((work / "data" / "LungCT_dataset.json").read_text())
    assert spec["generator"]["preset"] == "realistic" and spec["tensorImageShape"] == {"0": [48, 48, 52]}
    if "real_ct" in spec["generator"]:  # the held-out anatomy is never a training anatomy
        assert len(spec["generator"]["real_ct"]) == 4 and not any("nsclc" in p for p in spec["generator"]["real_ct"])
    card = ModelCard.load(work / "models" / "model.json")
    assert card.hyper_space.sampling == "log_uniform"  # the 0.5.0 recipe
    assert card.preprocessing["pixdim"] == [7.0, 5.0, 7.0] and list(card.preprocessing["spatial_size"]) == [48, 48, 64]
    assert (work / "models" / "model.pt").is_file()
    metrics = json.loads((work / "test" / "metrics.json").read_text())
    assert metrics, "no held-out metrics written"
    assert {name: _digest(ROOT / "models" / name) for name in shipped} == shipped  # no INSTALL: models/ untouched
    # a second run refuses to replace the first one's work folder
    again = subprocess.run(["bash", "scripts/train_release.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


@pytest.mark.parametrize("name", ["AMORTISED_TARGETS", "SPLIT_FILE"])
def test_train_release_refuses_a_missing_cache_or_split_before_any_work(tmp_path, name):
    env = {**os.environ, "WORK": str(tmp_path / "release"), name: str(tmp_path / "missing.npz")}
    completed = subprocess.run(["bash", "scripts/train_release.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert completed.returncode != 0 and f"{name}={tmp_path / 'missing.npz'} is not a file" in completed.stderr
    assert not (tmp_path / "release").exists()
