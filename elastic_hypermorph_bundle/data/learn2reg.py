"""Discovery, validation and train/val/test splits of Learn2Reg registration datasets.

Three folder layouts are read (fixed = expiration, moving = inspiration for the lung task):

* ``"json"`` (Learn2Reg 2021+, also NLST): a ``*_dataset.json`` in the root whose paths are relative to it
  (``"./imagesTr/LungCT_0001_0000.nii.gz"``). Pairs come from ``training_paired_images``, ``registration_val``
  and ``registration_test`` (``{"fixed": ..., "moving": ...}`` entries); without these lists, the per-image
  ``training``/``test`` entries are paired by the ``_0000``/``_0001`` rule. Masks and points come from the
  per-image entries (``mask``, ``keypoints``, ``landmarks``), else from sibling folders (see below).
* ``"zenodo2020"`` (Learn2Reg 2020 task 2): ``scans/case_XXX_exp|insp.nii.gz``,
  ``lungMasks/case_XXX_exp|insp.nii.gz``, ``keypoints/case_XXX.csv`` (6 columns: fixed xyz, moving xyz).
* ``"plain"``: no JSON; images ``<prefix>_<case>_0000`` (fixed) and ``<prefix>_<case>_0001`` (moving) in
  ``imagesTr``/``imagesTs`` or in the root itself.

Sibling rule: the companion files of ``<base>/images<S>/<name>.nii.gz`` are ``<base>/masks<S>/<name>.nii.gz``,
``<base>/keypoints<S>/<name>.csv`` and ``<base>/landmarks<S>/<name>.csv`` (``S`` is ``Tr``, ``Ts`` or empty for
images in the root itself, whose companions are in ``masks/``, ``keypoints/``, ``landmarks/``).

Each pair is a dict with absolute paths ``fixed_image``, ``moving_image`` and, when present, ``fixed_mask``,
``moving_mask``, ``fixed_keypoints``, ``moving_keypoints``, ``fixed_landmarks``, ``moving_landmarks``, plus
``pair_id`` (``"XXXX_YYYY"``: fixed and moving case ids, 4 digits, naming the submission
``disp_XXXX_YYYY.nii.gz``) and ``case`` (dict: the JSON pair entry's keys other than ``fixed``/``moving``,
e.g. ``{"simulation": {"lam": ..., "mu": ...}}``; empty otherwise).

Splits (:func:`split_pairs`): the JSON's ``registration_val``/``registration_test`` pairs form val/test and are
removed from train. Splits the dataset does not define are drawn from the remaining pairs with a seeded
permutation, sized by :func:`split_sizes` (paper: 20/4/6 train/val/test lung pairs).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from .grids import GRID_TOLERANCE_VOXELS, boxes_overlap, grid_offset_voxels, world_box
from .io import Learn2RegDataError, Learn2RegFileNotFoundError, check_voxels, read_points, volume_grid

__all__ = [
    "SPLITS",
    "PAPER_SPLIT_WEIGHTS",
    "Learn2RegDataset",
    "discover_pairs",
    "split_sizes",
    "split_pairs",
    "validate_pairs",
    "save_split",
    "read_split",
    "load_pairs",
]

logger = logging.getLogger("elastic_hypermorph_bundle")

#: the NIfTI files of a pair whose voxel data :func:`validate_pairs` reads
VOLUME_KEYS = ("fixed_image", "moving_image", "fixed_mask", "moving_mask")

SPLITS = ("train", "val", "test")
#: relative sizes of train/val/test: 20/4/6 lung CT pairs as in the paper
PAPER_SPLIT_WEIGHTS = (20, 4, 6)

_PHASE_NAME = re.compile(r"^(?P<prefix>.+)_(?P<case>\d+)_(?P<phase>000[01])(?P<ext>\.nii(\.gz)?)$")
_ZENODO_NAME = re.compile(r"^case_(?P<case>\d+)_(?P<phase>exp|insp)(?P<ext>\.nii(\.gz)?)$")
_PAIR_LISTS = {"training_paired_images": "train", "registration_val": "val", "registration_test": "test"}
_COMPANIONS = {"mask": ("masks", None), "keypoints": ("keypoints", ".csv"), "landmarks": ("landmarks", ".csv")}


@dataclass
class Learn2RegDataset:
    """A discovered dataset: its pairs (sorted by ``pair_id``) and the splits its JSON defines.

    ``predefined_splits`` maps ``"train"``/``"val"``/``"test"`` to pair ids for each pair list found in the
    dataset JSON; ``image_shape`` is ``tensorImageShape`` of the JSON, if given.
    """

    root: Path
    layout: str
    pairs: list[dict]
    predefined_splits: dict[str, list[str]] = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None


def _absolute(path: str | Path) -> Path:
    """Absolute, normalised path; symlinks are kept (a linked image must not turn into its target's name)."""
    return Path(os.path.abspath(path))


def _nifti_stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _companion_files(image: Path) -> dict[str, Path]:
    """Existing mask/keypoint/landmark files next to ``image`` by the sibling rule (module docstring)."""
    folder = image.parent
    if folder.name.startswith("images"):
        base, suffix = folder.parent, folder.name[len("images"):]
    else:
        base, suffix = folder, ""
    extension = image.name[len(_nifti_stem(image)):]
    found = {}
    for kind, (prefix, file_ext) in _COMPANIONS.items():
        candidate = base / f"{prefix}{suffix}" / f"{_nifti_stem(image)}{file_ext or extension}"
        if candidate.is_file():
            found[kind] = candidate
    return found


def case_id(image: Path, strict: bool = True) -> str:
    """Four-digit case id of a Learn2Reg image name (``LungCT_0001_0000.nii.gz``, ``case_001_exp.nii.gz``).

    A name that does not follow either pattern raises, or with ``strict=False`` gives the file name without its
    NIfTI extension (used for user-given single pairs)."""
    image = Path(image)
    match = _PHASE_NAME.match(image.name) or _ZENODO_NAME.match(image.name)
    if match is None:
        if not strict:
            return _nifti_stem(image)
        raise Learn2RegDataError(
            f"cannot read a case id from {image}: expected <prefix>_<case>_000[01].nii[.gz] or case_<case>_exp|insp."
        )
    return f"{int(match['case']):04d}"


def _make_pair(fixed: Path, moving: Path, fixed_files: dict, moving_files: dict, case: dict | None = None) -> dict:
    """Pair dict; a companion present for one image only is reported as the other's missing file."""
    pair = {"fixed_image": str(fixed), "moving_image": str(moving)}
    for kind in _COMPANIONS:
        present = {role: files.get(kind) for role, files in (("fixed", fixed_files), ("moving", moving_files))}
        if all(path is None for path in present.values()):
            continue
        for role, path in present.items():
            if path is None:
                other = "moving" if role == "fixed" else "fixed"
                raise Learn2RegFileNotFoundError(
                    f"{role} {kind} file missing for pair ({fixed.name}, {moving.name}); the {other} image has "
                    f"{present[other]}."
                )
            pair[f"{role}_{kind}"] = str(path)
    pair["pair_id"] = f"{case_id(fixed)}_{case_id(moving)}"
    pair["case"] = dict(case or {})
    return pair


def _add_pair(pairs: dict[str, dict], pair: dict) -> dict:
    """Add ``pair`` to ``pairs`` (by ``pair_id``) and return the pair kept under its id: the first one, when the
    same images (by name: a case in ``imagesTr`` and ``imagesTs``, a pair in two lists of a dataset JSON) come
    again; two different image pairs with one id are refused, naming both (one would silently replace the
    other)."""
    kept = pairs.setdefault(pair["pair_id"], pair)
    names = [(Path(p["fixed_image"]).name, Path(p["moving_image"]).name) for p in (kept, pair)]
    if names[0] != names[1]:
        raise Learn2RegDataError(
            f"two pairs give the case id {pair['pair_id']}: ({kept['fixed_image']}, {kept['moving_image']}) and "
            f"({pair['fixed_image']}, {pair['moving_image']}); the output files and metrics are named by these ids, "
            "so each pair needs its own: rename one pair's files (<prefix>_<case>_000[01]) to another case number."
        )
    return kept


def _phase_pairs(images: Sequence[Path], files: dict[Path, dict]) -> list[dict]:
    """Pair ``<prefix>_<case>_0000`` (fixed) with ``<prefix>_<case>_0001`` (moving)."""
    phases: dict[tuple[Path, str, str], dict[str, Path]] = {}
    for image in images:
        match = _PHASE_NAME.match(image.name)
        if match is not None:
            phases.setdefault((image.parent, match["prefix"], match["case"]), {})[match["phase"]] = image
    pairs = []
    for (folder, prefix, case), by_phase in sorted(phases.items()):
        for present, absent in (("0000", "0001"), ("0001", "0000")):
            if absent not in by_phase:
                ext = _PHASE_NAME.match(by_phase[present].name)["ext"]
                raise Learn2RegFileNotFoundError(
                    f"image {by_phase[present]} has no partner: expected {folder / f'{prefix}_{case}_{absent}{ext}'}."
                )
        fixed, moving = by_phase["0000"], by_phase["0001"]
        pairs.append(_make_pair(fixed, moving, files.get(fixed, {}), files.get(moving, {})))
    return pairs


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))


def _discover_json(root: Path, dataset_json: Path) -> Learn2RegDataset:
    try:
        spec = json.loads(dataset_json.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise Learn2RegDataError(f"cannot read dataset JSON {dataset_json}: {error}") from error
    base = dataset_json.parent

    def resolve(relative: str) -> Path:
        return _absolute(base / relative)

    # per-image entries give the companion files explicitly; kept even if missing so validation names them
    files: dict[Path, dict] = {}
    for entry in list(spec.get("training", [])) + list(spec.get("test", [])):
        if isinstance(entry, str):  # some releases list bare image paths under "test"
            entry = {"image": entry}
        image = resolve(entry["image"])
        files[image] = {kind: resolve(entry[kind]) for kind in _COMPANIONS if entry.get(kind)}

    def companions(image: Path) -> dict:
        return files[image] if image in files else _companion_files(image)

    pairs: dict[str, dict] = {}
    predefined: dict[str, list[str]] = {}
    for list_key, split in _PAIR_LISTS.items():
        if list_key not in spec:
            continue
        predefined[split] = []
        for entry in spec[list_key]:
            if not {"fixed", "moving"} <= set(entry):
                raise Learn2RegDataError(f"{dataset_json}: entry {entry} of {list_key!r} needs 'fixed' and 'moving'.")
            fixed, moving = resolve(entry["fixed"]), resolve(entry["moving"])
            extra = {k: v for k, v in entry.items() if k not in ("fixed", "moving")}
            pair = _make_pair(fixed, moving, companions(fixed), companions(moving), extra)
            _add_pair(pairs, pair)["case"].update(extra)
            predefined[split].append(pair["pair_id"])
    if not predefined:
        for pair in _phase_pairs(list(files), files):
            _add_pair(pairs, pair)
    if "train" in predefined:  # val/test pairs never train
        held_out = set(predefined.get("val", [])) | set(predefined.get("test", []))
        predefined["train"] = [pair_id for pair_id in predefined["train"] if pair_id not in held_out]
    shape = spec.get("tensorImageShape")
    if isinstance(shape, dict):  # {"0": [X, Y, Z]}
        shape = next(iter(shape.values()), None)
    return Learn2RegDataset(
        root=root,
        layout="json",
        pairs=[pairs[k] for k in sorted(pairs)],
        predefined_splits={k: sorted(set(v)) for k, v in predefined.items()},
        image_shape=tuple(int(s) for s in shape) if shape else None,
    )


def _discover_zenodo2020(root: Path) -> Learn2RegDataset:
    cases: dict[str, dict[str, Path]] = {}
    for image in _nifti_files(root / "scans"):
        match = _ZENODO_NAME.match(image.name)
        if match is not None:
            cases.setdefault(match["case"], {})[match["phase"]] = image
    pairs = []
    for case, phases in sorted(cases.items()):
        for present, absent in (("exp", "insp"), ("insp", "exp")):
            if absent not in phases:
                raise Learn2RegFileNotFoundError(
                    f"image {phases[present]} has no partner: expected {root / 'scans' / f'case_{case}_{absent}.nii.gz'}."
                )
        fixed, moving = phases["exp"], phases["insp"]
        fixed_files, moving_files = {}, {}
        for image, found in ((fixed, fixed_files), (moving, moving_files)):
            mask = root / "lungMasks" / image.name
            if mask.is_file():
                found["mask"] = mask
        keypoints = root / "keypoints" / f"case_{case}.csv"
        if keypoints.is_file():  # one 6-column file: the transforms pick the half by role
            fixed_files["keypoints"] = moving_files["keypoints"] = keypoints
        pairs.append(_make_pair(fixed, moving, fixed_files, moving_files))
    return Learn2RegDataset(root=root, layout="zenodo2020", pairs=pairs)


def _discover_plain(root: Path) -> Learn2RegDataset:
    folders = [root / name for name in ("imagesTr", "imagesTs") if (root / name).is_dir()] or [root]
    images = [image for folder in folders for image in _nifti_files(folder)]
    pairs = _phase_pairs(images, {image: _companion_files(image) for image in images})
    unique: dict[str, dict] = {}
    for pair in pairs:  # the same case in imagesTr and imagesTs: keep Tr
        _add_pair(unique, pair)
    pairs = unique
    return Learn2RegDataset(root=root, layout="plain", pairs=[pairs[k] for k in sorted(pairs)])


def discover_pairs(root: str | Path, dataset_json: str | Path | None = None) -> Learn2RegDataset:
    """Find all registration pairs of a Learn2Reg dataset folder (layouts in the module docstring).

    Args:
        root: dataset folder.
        dataset_json: the dataset JSON to use; by default the single ``*_dataset.json`` in ``root`` if any.

    Raises:
        Learn2RegFileNotFoundError: ``root`` or a required partner/companion file does not exist.
        Learn2RegDataError: several dataset JSONs, a malformed JSON, or no pairs at all.
    """
    root = _absolute(root)
    if not root.is_dir():
        raise Learn2RegFileNotFoundError(f"dataset folder not found: {root}")
    if dataset_json is None:
        candidates = sorted(root.glob("*_dataset.json"))
        if len(candidates) > 1:
            raise Learn2RegDataError(f"several dataset JSONs in {root}: {[c.name for c in candidates]}; pass one.")
        dataset_json = candidates[0] if candidates else None
    if dataset_json is not None:
        dataset_json = _absolute(dataset_json)
        if not dataset_json.is_file():
            raise Learn2RegFileNotFoundError(f"dataset JSON not found: {dataset_json}")
        dataset = _discover_json(root, dataset_json)
    elif (root / "scans").is_dir():
        dataset = _discover_zenodo2020(root)
    else:
        dataset = _discover_plain(root)
    if not dataset.pairs:
        raise Learn2RegDataError(f"no registration pairs found in {root} (layout {dataset.layout!r}).")
    return dataset


def split_sizes(num_pairs: int, weights: Sequence[float] = PAPER_SPLIT_WEIGHTS) -> tuple[int, int, int]:
    """Train/val/test sizes for ``num_pairs`` pairs, proportional to ``weights``.

    Rule: ``val = round(n * w_val / sum(w))`` and likewise ``test`` (half up); when ``n >= 3`` a split with a
    positive weight gets at least 1 pair; train gets the rest. With fewer than 3 pairs all pairs are train.
    ``n = 30`` with the paper weights ``(20, 4, 6)`` gives ``(20, 4, 6)``.
    """
    if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0:
        raise ValueError(f"weights must be 3 non-negative numbers (train, val, test) with train > 0, got {weights}.")
    if num_pairs < 3:
        return num_pairs, 0, 0
    total = float(sum(weights))
    held_out = [int(np.floor(num_pairs * w / total + 0.5)) for w in weights[1:]]
    held_out = [max(size, 1) if w > 0 else size for size, w in zip(held_out, weights[1:])]
    val, test = held_out
    return num_pairs - val - test, val, test


def split_pairs(
    dataset: Learn2RegDataset, weights: Sequence[float] = PAPER_SPLIT_WEIGHTS, seed: int = 0
) -> dict[str, list[dict]]:
    """Deterministic ``{"train", "val", "test"}`` split of ``dataset.pairs`` (each list sorted by ``pair_id``).

    Splits defined by the dataset JSON are used as given (val/test pairs are never in train). The others are
    drawn from the remaining pairs by ``numpy.random.default_rng(seed).permutation`` with sizes from
    :func:`split_sizes` of the total pair count (test first, then val; train is the rest).
    """
    by_id = {pair["pair_id"]: pair for pair in dataset.pairs}
    chosen = {split: list(ids) for split, ids in dataset.predefined_splits.items() if split != "train"}
    held_out = {pair_id for ids in chosen.values() for pair_id in ids}
    pool = sorted(set(dataset.predefined_splits.get("train", by_id)) - held_out)
    pool = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    sizes = dict(zip(SPLITS, split_sizes(len(by_id), weights)))
    for split in ("test", "val"):
        if split not in chosen:
            take = min(sizes[split], max(len(pool) - 1, 0))  # keep at least one training pair
            chosen[split], pool = pool[:take], pool[take:]
    chosen["train"] = pool
    return {split: [by_id[pair_id] for pair_id in sorted(chosen[split])] for split in SPLITS}


def save_split(
    splits: dict[str, list[dict]], output_dir: str | Path, filename: str = "split.json", **info
) -> Path:
    """Write the pair ids of each split (plus ``info``, e.g. seed and weights) to ``output_dir/filename``
    (atomically); log it."""
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**info, **{split: [pair["pair_id"] for pair in splits[split]] for split in SPLITS}}
    atomic_write_text(path, json.dumps(record, indent=2))
    logger.info(
        "data split (%s) written to %s: %s",
        ", ".join(f"{split} {len(splits[split])}" for split in SPLITS),
        path,
        {split: record[split] for split in SPLITS},
    )
    return path


def read_split(path: str | Path, dataset: Learn2RegDataset) -> dict[str, list[dict]]:
    """Re-create a split saved by :func:`save_split` from ``dataset``; unknown pair ids raise."""
    path = Path(path)
    if not path.is_file():
        raise Learn2RegFileNotFoundError(f"split file not found: {path}")
    record = json.loads(path.read_text())
    by_id = {pair["pair_id"]: pair for pair in dataset.pairs}
    unknown = sorted({pair_id for split in SPLITS for pair_id in record.get(split, [])} - set(by_id))
    if unknown:
        raise Learn2RegDataError(f"split file {path} names pairs not in {dataset.root}: {unknown}.")
    return {split: [by_id[pair_id] for pair_id in record.get(split, [])] for split in SPLITS}


def validate_pairs(
    pairs: Sequence[dict],
    expected_shape: Sequence[int] | None = None,
    voxels: bool = True,
) -> None:
    """Check the files of each pair before any work starts: first every header and point file, then (``voxels``)
    the voxel data of every image and mask.

    Checks: every listed file exists and is readable; images and masks are 3D volumes (not a 2D slice or a 4D
    series); masks lie on the grid of their image (same shape, within :data:`~.grids.GRID_TOLERANCE_VOXELS` of a
    voxel); fixed and moving overlap in physical space (their grids may differ: the moving image is resampled into
    the fixed grid by the transforms, :class:`~.transforms.ResampleToFixedd`); images have ``expected_shape``
    if given; fixed and moving point files of a kind have the same number of rows; with ``voxels``, the data of
    each image and mask reads in full (a truncated ``.nii.gz`` has a readable header) and is finite (no NaN/inf).

    Raises:
        Learn2RegDataError: empty ``pairs``, or a check fails (the message names the file).
        Learn2RegFileNotFoundError: a file is missing.
    """
    if len(pairs) == 0:
        raise Learn2RegDataError("no pairs to validate (empty dataset or split).")
    for pair in pairs:
        grids = {}
        for role in ("fixed", "moving"):
            if f"{role}_image" not in pair:
                raise Learn2RegDataError(f"pair {pair.get('pair_id')} has no '{role}_image'.")
            shape, affine = grids[role] = volume_grid(pair[f"{role}_image"])
            if expected_shape is not None and tuple(shape[:3]) != tuple(expected_shape):
                raise Learn2RegDataError(
                    f"image {pair[f'{role}_image']} has shape {shape}, the dataset declares {tuple(expected_shape)}."
                )
            if f"{role}_mask" in pair:
                _check_mask_grid(pair[f"{role}_mask"], *volume_grid(pair[f"{role}_mask"]), pair[f"{role}_image"], shape, affine)
        _check_overlap(pair["moving_image"], *grids["moving"], pair["fixed_image"], *grids["fixed"])
        for kind in ("keypoints", "landmarks"):
            present = [f"{role}_{kind}" for role in ("fixed", "moving") if f"{role}_{kind}" in pair]
            if len(present) == 1:
                raise Learn2RegDataError(f"pair {pair.get('pair_id')} has {present[0]} but not its counterpart.")
            if present:
                fixed = read_points(pair[f"fixed_{kind}"], role="fixed")
                moving = read_points(pair[f"moving_{kind}"], role="moving")
                if len(fixed) != len(moving):
                    raise Learn2RegDataError(
                        f"{kind} row counts differ: {pair[f'fixed_{kind}']} has {len(fixed)}, "
                        f"{pair[f'moving_{kind}']} has {len(moving)}."
                    )
                for role, points in (("fixed", fixed), ("moving", moving)):
                    _check_points_inside(pair[f"{role}_{kind}"], points, pair[f"{role}_image"], grids[role][0])
    if voxels:
        volumes = list(dict.fromkeys(pair[key] for pair in pairs for key in VOLUME_KEYS if key in pair))
        logger.info("checking the voxel data of %d image/mask file(s)", len(volumes))
        for path in volumes:
            check_voxels(path)


def _check_points_inside(path, points: np.ndarray, image, shape) -> None:
    """Refuse points (0-based voxel xyz) outside the voxels of their image, ``[-0.5, n - 0.5]`` per axis: a point
    there has no image content, and its error would enter the TRE as a large outlier."""
    outside = np.flatnonzero(((points < -0.5) | (points > np.asarray(shape[:3]) - 0.5)).any(axis=1))
    if outside.size:
        first = outside[0]
        raise Learn2RegDataError(
            f"{outside.size} of {len(points)} points in {path} lie outside the {tuple(shape[:3])} voxel grid of "
            f"{image} (point {first + 1}: {points[first].tolist()}, 0-based voxel x, y, z): they would distort the "
            "TRE; correct or remove those rows."
        )


def _check_mask_grid(path, shape, affine, image_path, image_shape, image_affine) -> None:
    remedy = "resample the mask onto its image's grid (nearest neighbour, e.g. MONAI ResampleToMatch)."
    if tuple(shape) != tuple(image_shape):
        raise Learn2RegDataError(f"mask {path} has shape {shape}, but its image {image_path} has {image_shape}: {remedy}")
    offset = grid_offset_voxels(shape, affine, image_affine)
    if offset > GRID_TOLERANCE_VOXELS:
        raise Learn2RegDataError(
            f"mask {path} lies up to {offset:.3g} voxels off the grid of its image {image_path} "
            f"(tolerance {GRID_TOLERANCE_VOXELS}): {remedy}"
        )


def _check_overlap(moving_path, moving_shape, moving_affine, fixed_path, fixed_shape, fixed_affine) -> None:
    moving_box, fixed_box = world_box(moving_shape, moving_affine), world_box(fixed_shape, fixed_affine)
    if not boxes_overlap(moving_box, fixed_box):
        span = lambda box: " x ".join(f"[{lo:.0f}, {hi:.0f}]" for lo, hi in zip(*box))  # noqa: E731
        raise Learn2RegDataError(
            f"moving image {moving_path} (world {span(moving_box)} mm) and fixed image {fixed_path} "
            f"({span(fixed_box)} mm) do not overlap: check their affines (origin, orientation) or the pairing."
        )


def load_pairs(
    root: str | Path,
    split: str,
    seed: int = 0,
    weights: Sequence[float] = PAPER_SPLIT_WEIGHTS,
    dataset_json: str | Path | None = None,
    split_file: str | Path | None = None,
    output_dir: str | Path | None = None,
    validate: bool = True,
) -> list[dict]:
    """Pairs of one split of the dataset in ``root``: discover, split, optionally save the split, validate.

    Args:
        root: dataset folder (any layout of the module docstring).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        seed, weights: passed to :func:`split_pairs`.
        dataset_json: passed to :func:`discover_pairs`.
        split_file: reuse a split saved by :func:`save_split` instead of computing one.
        output_dir: if given, the split used is saved there as ``split.json`` (and logged).
        validate: run :func:`validate_pairs` on the returned pairs (with the JSON's ``tensorImageShape``).

    Raises:
        ValueError: unknown ``split``. Learn2RegDataError: the split is empty or a check fails.
    """
    if split not in SPLITS + ("all",):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}.")
    dataset = discover_pairs(root, dataset_json)
    if split_file is not None:
        splits = read_split(split_file, dataset)
    else:
        splits = split_pairs(dataset, weights=weights, seed=seed)
    pairs = dataset.pairs if split == "all" else splits[split]
    if not pairs:
        holding = [s for s in SPLITS if splits[s]]
        where = (f"its {len(dataset.pairs)} pair(s) are in split(s) {', '.join(holding)} (sizes "
                 f"{ {s: len(splits[s]) for s in SPLITS} }: val and test need >= 3 pairs); pass --split "
                 f"{holding[0] if len(holding) == 1 else 'all'}" if holding else "it has no pairs")
        raise Learn2RegDataError(f"split {split!r} of {dataset.root} is empty: {where}.")
    if validate:
        validate_pairs(pairs, expected_shape=dataset.image_shape)
    # written only once the pairs are known to be usable: a refused dataset leaves no output behind
    if output_dir is not None:
        save_split(splits, output_dir, root=str(dataset.root), layout=dataset.layout, seed=seed, weights=list(weights))
    return pairs
