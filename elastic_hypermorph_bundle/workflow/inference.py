"""Inputs of the inference and evaluation workflows: which pairs to register, and the trained model's
hyperparameter row.

A single pair comes from ``--fixed``/``--moving`` (and optional masks/points) and is checked before anything
runs (files exist, 3D volumes that read in full and are finite, fixed and moving overlapping in physical space,
masks on their image's grid; a moving image on another grid is resampled into the fixed grid by the transforms); otherwise the pairs of ``--split`` of ``--dataset_dir``, checked the same way. What the model was
trained for (hyperparameters and ranges, network, preprocessing) is in its card,
:mod:`elastic_hypermorph_bundle.model_card`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..data.learn2reg import case_id, validate_pairs
from ..data.transforms import PAIR_KEYS
from ..hyperparams import HyperSpace
from . import parse_flag
from .datalists import pair_datalist

__all__ = [
    "single_pair",
    "inference_datalist",
    "hyper_row",
]

logger = logging.getLogger("elastic_hypermorph_bundle")


def single_pair(
    fixed: str,
    moving: str,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    fixed_keypoints: str | None = None,
    moving_keypoints: str | None = None,
    pair_id: str | None = None,
) -> list[dict]:
    """A one-pair datalist from file paths, validated (see ``validate_pairs``: headers, then voxel data) before the
    run starts.

    Raises:
        ValueError: only one of fixed/moving (or of a mask/point pair) is given, images that do not overlap, a mask off
            its image's grid, an unreadable file.
        FileNotFoundError: a file does not exist.
    """
    given = {
        "fixed_image": fixed,
        "moving_image": moving,
        "fixed_mask": fixed_mask,
        "moving_mask": moving_mask,
        "fixed_keypoints": fixed_keypoints,
        "moving_keypoints": moving_keypoints,
    }
    for kind in ("image", "mask", "keypoints"):
        pair_given = [given[f"{role}_{kind}"] is not None for role in ("fixed", "moving")]
        if any(pair_given) and not all(pair_given):
            role = "moving" if pair_given[0] else "fixed"
            flag = {"image": role, "mask": f"{role}_mask", "keypoints": f"{role}_points"}[kind]
            raise ValueError(f"--{flag} is missing: give both the fixed and the moving {kind}.")
    pair = {key: str(Path(value).resolve()) for key, value in given.items() if value is not None}
    pair["pair_id"] = pair_id or f"{case_id(fixed, strict=False)}_{case_id(moving, strict=False)}"
    validate_pairs([pair])
    return [pair]


def inference_datalist(
    dataset_dir: str | None = None,
    split: str = "test",
    fixed: str | None = None,
    moving: str | None = None,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    seed: int = 0,
    split_file: str | None = None,
    fixed_points: str | None = None,
    moving_points: str | None = None,
) -> list[dict]:
    """The pairs to register: the ``--fixed``/``--moving`` pair if given (with its optional masks and
    ``--fixed_points``/``--moving_points``, corresponding point CSVs in the Learn2Reg voxel convention, which give
    the pair its TRE), else ``split`` of ``dataset_dir``.

    Only the keys that every pair has are kept (images always; masks and points if all pairs have them).
    """
    if fixed is not None or moving is not None:
        pairs = single_pair(fixed, moving, fixed_mask, moving_mask, fixed_points, moving_points)
    else:
        given = [name for name, value in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask),
                                          ("fixed_points", fixed_points), ("moving_points", moving_points)) if value]
        if given:
            raise ValueError(f"--{'/--'.join(given)} need --fixed and --moving (single-pair inference); a dataset's "
                             "masks and points come from its folder.")
        pairs = pair_datalist(dataset_dir, split, seed=seed, split_file=split_file, keys=PAIR_KEYS)
    common = [key for key in PAIR_KEYS if all(key in pair for pair in pairs)]
    dropped = sorted({key for pair in pairs for key in pair if key in PAIR_KEYS} - set(common))
    if dropped:
        logger.warning("ignoring %s: not every pair has them.", dropped)
    return [{key: pair[key] for key in (*common, "pair_id")} for pair in pairs]


def hyper_row(space: HyperSpace, lam=None, mu=None, alpha=None, allow_extrapolation=False, init="network"):
    """The ``(1, H)`` row of ``space`` for the named values (``--lam``, ``--mu``, ``--alpha``), refused outside the
    trained ranges unless ``allow_extrapolation`` (``true``/``false``, see :func:`~.parse_flag` and
    :meth:`HyperSpace.point`). With ``init="identity"`` no network reads the row (the instance optimisation
    alone uses its (lam, mu)): any finite, non-negative values are taken."""
    allow = parse_flag("allow_extrapolation", allow_extrapolation)
    return space.point(lam, mu, alpha, allow_extrapolation=allow, trained=init != "identity")
