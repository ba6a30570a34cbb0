"""Datalists of the bundle workflows: one split of a Learn2Reg dataset folder as a list of pair dicts.

A thin layer over :mod:`elastic_hypermorph_bundle.data.learn2reg` that turns its errors into messages naming the
config id to change (``--dataset_dir``, ``--split``) and writes the split only when asked, after every check has
passed, so a run that fails on its data leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.io import Learn2RegDataError
from ..data.learn2reg import PAPER_SPLIT_WEIGHTS, SPLITS, discover_pairs, load_pairs, read_split, save_split, split_pairs

__all__ = ["pair_datalist", "write_split", "check_split"]


def pair_datalist(
    dataset_dir: str | Path,
    split: str,
    seed: int = 0,
    split_file: str | Path | None = None,
    keys: Sequence[str] | None = None,
    weights: Sequence[float] = PAPER_SPLIT_WEIGHTS,
) -> list[dict]:
    """Validated pair dicts of one split of the dataset in ``dataset_dir`` (any layout of
    :func:`~elastic_hypermorph_bundle.data.learn2reg.discover_pairs`).

    Args:
        dataset_dir: dataset folder.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        seed, weights: seeded split of the pairs the dataset does not assign (see ``split_pairs``).
        split_file: a ``split.json`` written by an earlier run (:func:`write_split`), to reuse its split.
        keys: keep only these keys (plus ``"pair_id"``) of each pair dict, e.g. the files a workflow loads;
            ``None`` keeps all. Dropping unused keys keeps batches collatable (``"case"`` metadata may differ
            between pairs).

    Raises:
        FileNotFoundError: ``dataset_dir`` (or a file it lists) does not exist.
        ValueError: the split is unknown or empty, or a file fails validation.
    """
    if dataset_dir is None or not str(dataset_dir).strip():
        raise ValueError("dataset_dir is not set; pass --dataset_dir /path/to/Learn2Reg/dataset.")
    if not Path(dataset_dir).is_dir():
        raise FileNotFoundError(
            f"dataset_dir {str(dataset_dir)!r} is not a folder (resolved: {Path(dataset_dir).resolve()}); "
            "pass --dataset_dir with a Learn2Reg dataset (e.g. made by scripts/make_synthetic.py)."
        )
    try:
        pairs = load_pairs(dataset_dir, split, seed=seed, weights=weights, split_file=split_file)
    except Learn2RegDataError as error:  # also Learn2RegFileNotFoundError: keep the type, add the context
        raise type(error)(f"{error} (--dataset_dir {dataset_dir}, split {split!r})") from error
    if keys is None:
        return pairs
    wanted = {"pair_id", *keys}
    return [{key: value for key, value in pair.items() if key in wanted} for pair in pairs]


def write_split(
    dataset_dir: str | Path,
    output_dir: str | Path,
    seed: int = 0,
    split_file: str | Path | None = None,
    weights: Sequence[float] = PAPER_SPLIT_WEIGHTS,
) -> Path:
    """Record the split that :func:`pair_datalist` uses for these arguments as ``output_dir/split.json``, so that
    evaluation and later runs can reuse it (``--split_file``). Returns the path written."""
    dataset, splits = _splits(dataset_dir, seed, split_file, weights)
    return save_split(
        {split: splits[split] for split in SPLITS},
        output_dir,
        root=str(dataset.root),
        layout=dataset.layout,
        seed=seed,
        weights=list(weights),
        split_file=None if split_file is None else str(split_file),
    )


def _splits(dataset_dir, seed=0, split_file=None, weights=PAPER_SPLIT_WEIGHTS):
    dataset = discover_pairs(dataset_dir)
    splits = read_split(split_file, dataset) if split_file is not None else split_pairs(dataset, weights, seed)
    return dataset, splits


def check_split(recorded: str | Path, dataset_dir: str | Path, **options) -> Path:
    """Check that a run with these arguments (``options``: ``seed``, ``split_file``, ``weights`` as for
    :func:`write_split`) uses the split recorded in ``recorded`` (a :func:`write_split` file), e.g. a resumed training
    the split its checkpoints were trained on. Returns ``recorded``.

    Raises:
        ValueError: a split (train, val or test) differs; the message names the pairs and the way out.
    """
    recorded = Path(recorded)
    _, splits = _splits(dataset_dir, **options)
    record = read_split(recorded, discover_pairs(dataset_dir))
    differing = {
        split: (sorted(p["pair_id"] for p in record[split]), sorted(p["pair_id"] for p in splits[split]))
        for split in SPLITS
        if {p["pair_id"] for p in record[split]} != {p["pair_id"] for p in splits[split]}
    }
    if differing:
        shown = "; ".join(f"{split}: recorded {old}, this run {new}" for split, (old, new) in differing.items())
        raise ValueError(
            f"this run's data split differs from {recorded}, the split of the model in that folder ({shown}); pass "
            f"--split_file {recorded} (or that run's --seed) to go on with it."
        )
    return recorded
