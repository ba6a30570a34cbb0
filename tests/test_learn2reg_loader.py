"""Learn2Reg dataset discovery, validation and splits: real sample files and small generated layouts."""

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from elastic_hypermorph_bundle.data import (
    Learn2RegDataError,
    Learn2RegFileNotFoundError,
    discover_pairs,
    load_pairs,
    read_nifti_grid,
    read_points,
    read_split,
    save_split,
    split_pairs,
    split_sizes,
    validate_pairs,
    write_points,
)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "learn2reg_lungct_sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real Learn2Reg sample not found at {SAMPLE}")
AFFINE = np.diag([1.75, 1.25, 1.75, 1.0])


def write_nifti(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def make_case(root, name, split="Tr", shape=(6, 5, 4), rows=4, seed=0):
    """Write images/masks/keypoints of ``name`` (e.g. LungCT_0003) in the 2021+ folder layout."""
    rng = np.random.default_rng(seed)
    for phase in ("0000", "0001"):
        write_nifti(root / f"images{split}" / f"{name}_{phase}.nii.gz", rng.uniform(-1000, 200, shape).astype(np.float32))
        write_nifti(root / f"masks{split}" / f"{name}_{phase}.nii.gz", np.ones(shape, np.uint8))
        write_points(root / f"keypoints{split}" / f"{name}_{phase}.csv", rng.uniform(0, 3, (rows, 3)))


def link_sample(root):
    """Dataset folder whose images are the real lung masks (no CT images are available)."""
    (root / "imagesTr").mkdir(parents=True)
    for folder in ("masksTr", "keypointsTr", "landmarksTr"):
        (root / folder).symlink_to(SAMPLE / folder)
    for mask in sorted((SAMPLE / "masksTr").iterdir()):
        (root / "imagesTr" / mask.name).symlink_to(mask)
    return root


# ---------------------------------------------------------------- real sample files


@needs_sample
def test_sample_headers_and_spacing():
    for mask in sorted((SAMPLE / "masksTr").glob("*.nii.gz")):
        shape, affine = read_nifti_grid(mask)
        assert shape == (192, 192, 208)
        np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [1.75, 1.25, 1.75])


@needs_sample
@pytest.mark.parametrize("case, expected_tre, num_landmarks", [("0001", 20.2, 81), ("0002", 15.6, 100)])
def test_sample_point_convention_gives_published_initial_tre(case, expected_tre, num_landmarks):
    fixed = read_points(SAMPLE / "landmarksTr" / f"LungCT_{case}_0000.csv")
    moving = read_points(SAMPLE / "landmarksTr" / f"LungCT_{case}_0001.csv")
    assert fixed.shape == moving.shape == (num_landmarks, 3)
    spacing = np.array([1.75, 1.25, 1.75])
    tre = np.linalg.norm((moving - fixed) * spacing, axis=1).mean()  # zero displacement field
    assert tre == pytest.approx(expected_tre, abs=0.05)


@needs_sample
def test_sample_initial_lung_dice():
    fixed = nib.load(str(SAMPLE / "masksTr" / "LungCT_0001_0000.nii.gz")).get_fdata() > 0
    moving = nib.load(str(SAMPLE / "masksTr" / "LungCT_0001_0001.nii.gz")).get_fdata() > 0
    dice = 2 * (fixed & moving).sum() / (fixed.sum() + moving.sum())
    assert dice == pytest.approx(0.71, abs=0.01)


@needs_sample
def test_sample_plain_layout(tmp_path):
    root = link_sample(tmp_path / "lung")
    dataset = discover_pairs(root)
    assert dataset.layout == "plain"
    assert [p["pair_id"] for p in dataset.pairs] == ["0001_0001", "0002_0002"]
    pair = dataset.pairs[1]
    assert pair["fixed_image"] == str(root / "imagesTr" / "LungCT_0002_0000.nii.gz")
    assert pair["moving_landmarks"] == str(root / "landmarksTr" / "LungCT_0002_0001.csv")
    assert pair["fixed_keypoints"].endswith("keypointsTr/LungCT_0002_0000.csv") and pair["case"] == {}
    validate_pairs(dataset.pairs, expected_shape=(192, 192, 208))
    with pytest.raises(Learn2RegDataError, match="LungCT_0001_0000.nii.gz has shape"):
        validate_pairs(dataset.pairs, expected_shape=(224, 192, 224))


@needs_sample
def test_sample_json_layout_relative_paths(tmp_path):
    root = link_sample(tmp_path / "lung")
    entries = [
        {"image": f"./imagesTr/LungCT_000{c}_000{p}.nii.gz", "mask": f"./masksTr/LungCT_000{c}_000{p}.nii.gz",
         "landmarks": f"./landmarksTr/LungCT_000{c}_000{p}.csv"}
        for c in (1, 2) for p in (0, 1)
    ]
    pairs = [{"fixed": f"./imagesTr/LungCT_000{c}_0000.nii.gz", "moving": f"./imagesTr/LungCT_000{c}_0001.nii.gz"}
             for c in (1, 2)]
    spec = {"name": "LungCT", "tensorImageShape": {"0": [192, 192, 208]}, "training": entries,
            "training_paired_images": pairs, "registration_val": pairs[1:]}
    (root / "LungCT_dataset.json").write_text(json.dumps(spec))
    dataset = discover_pairs(root)
    assert dataset.layout == "json" and dataset.image_shape == (192, 192, 208)
    assert dataset.predefined_splits == {"train": ["0001_0001"], "val": ["0002_0002"]}
    pair = dataset.pairs[0]
    assert pair["fixed_landmarks"] == str(root / "landmarksTr" / "LungCT_0001_0000.csv")
    assert "fixed_keypoints" not in pair  # the JSON entries list no keypoints
    val = load_pairs(root, "val", output_dir=tmp_path / "out")
    assert [p["pair_id"] for p in val] == ["0002_0002"]
    saved = json.loads((tmp_path / "out" / "split.json").read_text())
    assert saved["train"] == ["0001_0001"] and saved["val"] == ["0002_0002"] and saved["test"] == []


# ---------------------------------------------------------------- generated layouts


def test_json_layout_pairs_splits_and_case_metadata(tmp_path):
    for i in range(1, 7):
        make_case(tmp_path, f"LungCT_{i:04d}", seed=i)
    pair = lambda i, **extra: {"fixed": f"./imagesTr/LungCT_{i:04d}_0000.nii.gz",
                               "moving": f"./imagesTr/LungCT_{i:04d}_0001.nii.gz", **extra}
    spec = {
        "training_paired_images": [pair(i, simulation={"lam": float(i), "mu": 1.0}) for i in range(1, 7)],
        "registration_val": [pair(2)],
        "registration_test": [pair(5)],
    }
    (tmp_path / "LungCT_dataset.json").write_text(json.dumps(spec))
    dataset = discover_pairs(tmp_path)
    assert len(dataset.pairs) == 6
    assert dataset.pairs[2]["case"] == {"simulation": {"lam": 3.0, "mu": 1.0}}
    # companions found by the sibling rule (no per-image entries in this JSON)
    assert dataset.pairs[0]["moving_mask"] == str(tmp_path / "masksTr" / "LungCT_0001_0001.nii.gz")
    splits = split_pairs(dataset, seed=3)
    assert [p["pair_id"] for p in splits["val"]] == ["0002_0002"]
    assert [p["pair_id"] for p in splits["test"]] == ["0005_0005"]
    assert [p["pair_id"] for p in splits["train"]] == ["0001_0001", "0003_0003", "0004_0004", "0006_0006"]
    validate_pairs(dataset.pairs)


def test_zenodo2020_layout(tmp_path):
    rng = np.random.default_rng(0)
    for case in ("001", "002", "003"):
        for phase in ("exp", "insp"):
            write_nifti(tmp_path / "scans" / f"case_{case}_{phase}.nii.gz", rng.uniform(0, 1500, (5, 5, 4)))
            write_nifti(tmp_path / "lungMasks" / f"case_{case}_{phase}.nii.gz", np.ones((5, 5, 4), np.uint8))
        (tmp_path / "keypoints").mkdir(exist_ok=True)
        np.savetxt(tmp_path / "keypoints" / f"case_{case}.csv", rng.uniform(0, 3, (7, 6)), delimiter=",")
    dataset = discover_pairs(tmp_path)
    assert dataset.layout == "zenodo2020"
    assert [p["pair_id"] for p in dataset.pairs] == ["0001_0001", "0002_0002", "0003_0003"]
    pair = dataset.pairs[0]
    assert pair["fixed_image"].endswith("scans/case_001_exp.nii.gz")
    assert pair["moving_mask"].endswith("lungMasks/case_001_insp.nii.gz")
    table = np.loadtxt(pair["fixed_keypoints"], delimiter=",")
    np.testing.assert_array_equal(read_points(pair["fixed_keypoints"], role="fixed"), table[:, :3])
    np.testing.assert_array_equal(read_points(pair["moving_keypoints"], role="moving"), table[:, 3:])
    with pytest.raises(Learn2RegDataError, match="role must be"):
        read_points(pair["fixed_keypoints"])
    validate_pairs(dataset.pairs)


def test_plain_root_folder_and_json_without_pair_lists(tmp_path):
    rng = np.random.default_rng(1)
    for i in (7, 8, 9):
        for phase in ("0000", "0001"):
            write_nifti(tmp_path / "flat" / f"NLST_{i:04d}_{phase}.nii.gz", rng.uniform(-1000, 0, (4, 4, 4)))
    dataset = discover_pairs(tmp_path / "flat")
    assert dataset.layout == "plain" and [p["pair_id"] for p in dataset.pairs] == ["0007_0007", "0008_0008", "0009_0009"]
    assert set(dataset.pairs[0]) == {"fixed_image", "moving_image", "pair_id", "case"}
    # a JSON with per-image entries only: paired by the _0000/_0001 rule, split by seed
    spec = {"training": [{"image": f"./NLST_{i:04d}_{p}.nii.gz"} for i in (7, 8, 9) for p in ("0000", "0001")]}
    (tmp_path / "flat" / "NLST_dataset.json").write_text(json.dumps(spec))
    dataset = discover_pairs(tmp_path / "flat")
    assert dataset.layout == "json" and len(dataset.pairs) == 3 and dataset.predefined_splits == {}
    assert {s: len(v) for s, v in split_pairs(dataset).items()} == {"train": 1, "val": 1, "test": 1}


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("n, expected", [(30, (20, 4, 6)), (15, (10, 2, 3)), (3, (1, 1, 1)), (4, (2, 1, 1)),
                                         (2, (2, 0, 0)), (60, (40, 8, 12))])
def test_split_sizes_rule(n, expected):
    assert split_sizes(n) == expected
    assert sum(split_sizes(n)) == n


def test_seeded_split_is_deterministic_disjoint_and_saved(tmp_path, caplog):
    dataset = discover_pairs(_plain_dataset(tmp_path / "d", 30))
    first, again, other = split_pairs(dataset, seed=0), split_pairs(dataset, seed=0), split_pairs(dataset, seed=1)
    ids = {s: [p["pair_id"] for p in v] for s, v in first.items()}
    assert ids == {s: [p["pair_id"] for p in v] for s, v in again.items()}
    assert ids != {s: [p["pair_id"] for p in v] for s, v in other.items()}
    assert {s: len(v) for s, v in ids.items()} == {"train": 20, "val": 4, "test": 6}
    assert sorted(sum(ids.values(), [])) == sorted(p["pair_id"] for p in dataset.pairs)
    with caplog.at_level(logging.INFO, logger="elastic_hypermorph_bundle"):
        path = save_split(first, tmp_path / "out", seed=0)
    assert "train 20, val 4, test 6" in caplog.text and str(path) in caplog.text
    assert json.loads(path.read_text())["seed"] == 0
    assert read_split(path, dataset) == first
    assert load_pairs(tmp_path / "d", "test", split_file=path, validate=False) == first["test"]


def _plain_dataset(root, num_cases):
    for i in range(1, num_cases + 1):
        for phase in ("0000", "0001"):
            (root / "imagesTr").mkdir(parents=True, exist_ok=True)
            (root / "imagesTr" / f"LungCT_{i:04d}_{phase}.nii.gz").touch()  # discovery reads names only
    return root


# ---------------------------------------------------------------- errors


def test_error_empty_dataset_and_empty_split(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Learn2RegDataError, match="no registration pairs"):
        discover_pairs(tmp_path / "empty")
    with pytest.raises(Learn2RegFileNotFoundError, match="dataset folder not found"):
        discover_pairs(tmp_path / "absent")
    make_case(tmp_path / "two", "LungCT_0001")
    make_case(tmp_path / "two", "LungCT_0002")
    assert len(load_pairs(tmp_path / "two", "train")) == 2
    with pytest.raises(Learn2RegDataError, match="split 'val' .* is empty: its 2 pair\\(s\\) are in split\\(s\\) train .* pass --split train"):
        load_pairs(tmp_path / "two", "val")
    with pytest.raises(ValueError, match="split must be one of"):
        load_pairs(tmp_path / "two", "validation")
    with pytest.raises(Learn2RegDataError, match="no pairs to validate"):
        validate_pairs([])


def test_error_missing_files(tmp_path):
    make_case(tmp_path, "LungCT_0001")
    (tmp_path / "imagesTr" / "LungCT_0001_0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="LungCT_0001_0001.nii.gz"):
        discover_pairs(tmp_path)
    make_case(tmp_path, "LungCT_0001")
    (tmp_path / "masksTr" / "LungCT_0001_0000.nii.gz").unlink()
    with pytest.raises(Learn2RegFileNotFoundError, match="fixed mask file missing"):
        discover_pairs(tmp_path)
    # a JSON that names a file which is absent: reported by validation
    make_case(tmp_path, "LungCT_0001")
    spec = {"training": [{"image": f"./imagesTr/LungCT_0001_000{p}.nii.gz", "mask": f"./masksTr/LungCT_0001_000{p}.nii.gz",
                          "keypoints": f"./keypointsTr/LungCT_0001_000{p}.csv"} for p in (0, 1)]}
    (tmp_path / "LungCT_dataset.json").write_text(json.dumps(spec))
    (tmp_path / "keypointsTr" / "LungCT_0001_0001.csv").unlink()
    pairs = discover_pairs(tmp_path).pairs
    with pytest.raises(Learn2RegFileNotFoundError, match="keypointsTr/LungCT_0001_0001.csv"):
        validate_pairs(pairs)
    (tmp_path / "Other_dataset.json").write_text("{}")
    with pytest.raises(Learn2RegDataError, match="several dataset JSONs"):
        discover_pairs(tmp_path)


def test_error_grid_mismatch(tmp_path):
    make_case(tmp_path, "LungCT_0001")
    pairs = discover_pairs(tmp_path).pairs
    for folder in ("imagesTr", "masksTr"):  # moving image and its mask on another grid than the fixed image: accepted
        write_nifti(tmp_path / folder / "LungCT_0001_0001.nii.gz", np.zeros((6, 5, 4)), np.diag([2.0, 1.25, 1.75, 1]))
    validate_pairs(pairs)
    write_nifti(tmp_path / "masksTr" / "LungCT_0001_0000.nii.gz", np.zeros((6, 5, 3)))
    with pytest.raises(Learn2RegDataError, match="masksTr/LungCT_0001_0000.nii.gz has shape"):
        validate_pairs(pairs)


def test_error_unreadable_nifti_and_bad_points(tmp_path):
    make_case(tmp_path, "LungCT_0001")
    pairs = discover_pairs(tmp_path).pairs
    write_points(tmp_path / "keypointsTr" / "LungCT_0001_0001.csv", np.zeros((3, 3)))
    with pytest.raises(Learn2RegDataError, match="row counts differ.*has 4.*has 3"):
        validate_pairs(pairs)
    (tmp_path / "keypointsTr" / "LungCT_0001_0001.csv").write_text("1,2\n3,4\n")
    with pytest.raises(Learn2RegDataError, match="LungCT_0001_0001.csv must have 3"):
        validate_pairs(pairs)
    (tmp_path / "keypointsTr" / "LungCT_0001_0001.csv").write_text("x,y,z\n1,2,nan\n")
    with pytest.raises(Learn2RegDataError, match="non-finite"):
        read_points(tmp_path / "keypointsTr" / "LungCT_0001_0001.csv")
    (tmp_path / "keypointsTr" / "LungCT_0001_0001.csv").write_text("x,y,z\n1,2,3\n4,5,6\n7,8,9\n0,0,0\n")
    assert read_points(tmp_path / "keypointsTr" / "LungCT_0001_0001.csv").shape == (4, 3)  # header skipped
    (tmp_path / "imagesTr" / "LungCT_0001_0000.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(Learn2RegDataError, match="cannot read NIfTI header of .*LungCT_0001_0000.nii.gz"):
        validate_pairs(pairs)
