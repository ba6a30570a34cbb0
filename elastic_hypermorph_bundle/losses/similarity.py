"""The similarity table: every image similarity of the bundle, by name, as the training loss and the test-time
optimisation use it. A row says what is compared (``prepare``: the images themselves, or descriptors of them) and
how (``compare``: a per-voxel dissimilarity, lower is better), so the two users need no branch per similarity:

* training (:class:`~elastic_hypermorph_bundle.losses.RegistrationLoss`, ``--similarity``) compares
  ``prepare(warped)`` with ``prepare(fixed)`` on the network's grid, window :data:`LNCC_WINDOW`;
* the optimisation (:mod:`elastic_hypermorph_bundle.optimize`) prepares the images once on the image grid, warps
  the moving image's ``prepare`` by the field being optimised, and compares on each level, the window scaled with
  the level (ConvexAdam's design for MIND: descriptors of the full-resolution images, averaged onto the level).

Rows: ``"lncc"``, MONAI's local NCC (squared, negated: in [-1, 0]) over a ``window^D`` box, the paper's training
similarity; ``"mind"``, the squared difference of MIND-SSC descriptors (:mod:`.mind`) averaged over its 12
channels (in [0, 1], the range of the LNCC term, so (lam, mu) weigh a similarity of the same range), insensitive to
the lung's density change between breathing phases. A new similarity is one more row here (plus its test).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from .mind import mind_ssc

__all__ = ["Similarity", "SIMILARITIES", "LNCC_WINDOW", "get_similarity"]

#: the local NCC window of training (9 voxels per axis, as in the paper)
LNCC_WINDOW = 9


class Similarity(NamedTuple):
    """One row of the similarity table.

    Attributes:
        prepare: image ``(B, 1, *spatial)`` -> what is compared, ``(B, C, *spatial)``.
        compare: ``(warped, fixed, window)`` -> per-voxel dissimilarity ``(B, 1, *spatial)``, lower is better, of
            two prepared tensors of one shape; ``window`` is the local window (voxels per axis) of a windowed
            similarity, unused by a voxel-wise one.
        spatial_dims: the numbers of spatial dimensions it supports.
        windowed: whether a voxel's dissimilarity depends on its neighbours (``window``), so that it cannot be
            computed on a subset of the voxels alone (the optimisation's similarity stride needs a voxel-wise row).
    """

    prepare: Callable[[torch.Tensor], torch.Tensor]
    compare: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    spatial_dims: tuple[int, ...]
    windowed: bool


@lru_cache(maxsize=16)
def _lncc_loss(spatial_dims: int, window: int) -> LocalNormalizedCrossCorrelationLoss:
    # the module holds only its box kernel (moved to the inputs' device and dtype on each call): one per window
    return LocalNormalizedCrossCorrelationLoss(spatial_dims, kernel_size=window, reduction="none")


def _lncc(warped: torch.Tensor, fixed: torch.Tensor, window: int) -> torch.Tensor:
    return _lncc_loss(warped.ndim - 2, int(window))(warped, fixed)


def _descriptor_ssd(warped: torch.Tensor, fixed: torch.Tensor, window: int) -> torch.Tensor:
    # mean over the descriptor channels: in [0, 1] like the LNCC term (the sum over MIND's 12 channels made the
    # optimised fields rough at the paper's (lam, mu))
    return (warped - fixed).square().mean(dim=1, keepdim=True)


def _unchanged(image: torch.Tensor) -> torch.Tensor:
    return image


SIMILARITIES: dict[str, Similarity] = {
    "lncc": Similarity(prepare=_unchanged, compare=_lncc, spatial_dims=(1, 2, 3), windowed=True),
    "mind": Similarity(prepare=mind_ssc, compare=_descriptor_ssd, spatial_dims=(3,), windowed=False),
}


def get_similarity(name: str, spatial_dims: int = 3) -> Similarity:
    """The row of ``name``.

    Raises:
        ValueError: for a name not in :data:`SIMILARITIES`, or one that does not support ``spatial_dims``.
    """
    if name not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {tuple(SIMILARITIES)}, got {name!r}.")
    row = SIMILARITIES[name]
    if spatial_dims not in row.spatial_dims:
        dims = " or ".join(f"{d}D" for d in row.spatial_dims)
        raise ValueError(f"similarity {name!r} works on {dims} images, not on {spatial_dims}D ones.")
    return row
