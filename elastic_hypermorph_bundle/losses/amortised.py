"""Amortised optimisation: a supervised term that pulls the hypernetwork's field at a cached ``(lam, mu)`` towards
the instance optimisation's field at the same ``(lam, mu)`` (issue 19, item 3a).

The unsupervised loss alone teaches the network little of how ``(lam, mu)`` change the minimiser (on the release
data its field changed 1.1 mm from (0, 0) to (1, 1), the optimisation's 5.5 mm). Here, on part of the training
batches, the sampled row is replaced by a grid point whose optimised field was computed once per training pair
(:func:`~elastic_hypermorph_bundle.workflow.amortised.build_targets`, an ``.npz`` cache), and the term

    A_b = w * mean_{j, x} (u_b(x)_j - t_b(x)_j)²     (voxels², over the D components and every voxel)

is added to the registration loss (``u_b`` the network's DDF, ``t_b`` the cached field, ``w`` ``amortised_weight``).
Over the whole grid the air and soft tissue outside the lungs weigh as much as the lungs, and there the targets are
the optimisation's least determined part (MIND sees no structure in air; at (0, 0) Adam's jitter). With
``amortised_mask`` the mean is taken over the fixed image's (lung) mask ``m_b`` instead:

    A_b = w * sum_x m_b(x) sum_j (u_b(x)_j - t_b(x)_j)² / (D * sum_x m_b(x))     (voxels²)

which equals the unmasked term for a mask of ones and ignores everything outside the mask.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..flags import parse_flag

__all__ = ["amortised_error", "AmortisedTargets", "amortised_targets"]


def amortised_error(ddf: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` mean over components and voxels of ``(ddf - target)²`` (voxels²); 0 where the fields agree.

    Args:
        ddf, target: ``(B, D, *spatial)`` displacement fields in voxels.
        mask: ``(B, 1, *spatial)`` weights (a 0/1 lung mask), or ``None`` for every voxel: the mean is then over
            the components and the voxels where the mask is on, ``sum m (ddf - target)² / (D sum m)``.

    Raises:
        ValueError: the fields differ in shape, the mask does not fit them, or a sample's mask is empty.
    """
    if ddf.shape != target.shape:
        raise ValueError(f"the network's DDF {tuple(ddf.shape)} and the cached target {tuple(target.shape)} differ "
                         "in shape: the targets were built on another grid (--spatial_size, --pixdim).")
    squared = (ddf.float() - target.float()).square()
    if mask is None:
        return squared.flatten(1).mean(1)
    if mask.shape != (ddf.shape[0], 1, *ddf.shape[2:]):
        raise ValueError(f"the amortised term's mask {tuple(mask.shape)} does not fit the DDF {tuple(ddf.shape)}: "
                         f"expected (B, 1, *spatial) = {(ddf.shape[0], 1, *ddf.shape[2:])}.")
    mask = mask.to(squared)
    volume = mask.flatten(1).sum(1)
    if bool((volume <= 0).any()):
        empty = [int(b) for b in torch.nonzero(volume <= 0).flatten()]
        raise ValueError(f"the fixed mask of batch sample(s) {empty} is empty: the masked amortised term has no "
                         "voxel to average over (check the dataset's masks, or --amortised_mask false).")
    return (squared * mask).flatten(1).sum(1) / (ddf.shape[1] * volume)


class AmortisedTargets:
    """The cached optimised fields of the training pairs at a few ``(lam, mu)`` grid points, and the term that
    pulls the network towards them.

    The ``.npz`` holds ``pair_ids`` ``(P,)`` (the datalist's ``pair_id``), ``hyper`` ``(G, 2)`` (the grid points,
    ``[lam, mu]``) and ``fields`` ``(P, G, 3, X, Y, Z)`` (DDFs in voxels of the network grid, any float type).

    Args:
        path: the cache (:func:`~elastic_hypermorph_bundle.workflow.amortised.build_targets`).
        weight: ``w`` of the term (> 0).
        fraction: the probability that a training batch whose pairs are all cached is trained at a grid point with
            the term (the other batches keep their sampled rows and the unsupervised loss alone).
        mask: average the error over the fixed image's mask (``"fixed_mask"`` of the batch, the lung mask) instead
            of the whole grid (``true``/``false``, as :func:`~elastic_hypermorph_bundle.flags.parse_flag` reads it).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: a weight <= 0, a fraction outside (0, 1], a cache whose arrays do not fit together, or a mask
            flag that is not a boolean.
    """

    def __init__(self, path: str | Path, weight: float = 1.0, fraction: float = 0.5, mask=False) -> None:
        self.masked = parse_flag("amortised_mask", mask)
        weight, fraction = float(weight), float(fraction)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"amortised_weight must be a finite number > 0, got {weight}.")
        if not 0 < fraction <= 1:
            raise ValueError(f"amortised_fraction must be in (0, 1], got {fraction}.")
        if not Path(path).is_file():
            raise FileNotFoundError(f"amortised_targets {str(path)!r} is not a file (build it with "
                                    "scripts/amortised_targets.py).")
        with np.load(path) as cache:
            missing = {"pair_ids", "hyper", "fields"} - set(cache.files)
            if missing:
                raise ValueError(f"amortised_targets {str(path)!r} lacks {sorted(missing)}.")
            pair_ids, hyper, fields = [str(p) for p in cache["pair_ids"]], cache["hyper"], cache["fields"]
        if hyper.ndim != 2 or hyper.shape[1] != 2 or fields.ndim != 6 or fields.shape[:3] != (len(pair_ids), len(hyper), 3):
            raise ValueError(f"amortised_targets {str(path)!r}: fields {fields.shape} do not match {len(pair_ids)} "
                             f"pairs x hyper {hyper.shape} x 3 components.")
        self.path, self.weight, self.fraction = str(path), weight, fraction
        self.hyper = torch.as_tensor(hyper, dtype=torch.float32)
        self.fields = torch.from_numpy(fields)  # kept in the cache's (compact) type, converted per batch
        self.index = {pair: i for i, pair in enumerate(pair_ids)}

    def draw(self, pair_ids, generator: torch.Generator, device: torch.device | str = "cpu"):
        """For a batch of ``pair_ids``: with probability ``fraction`` (and only when every pair is cached), one grid
        point per sample, drawn uniformly; returns ``(hyper (B, 2), targets (B, 3, X, Y, Z))`` on ``device``, else
        ``None``."""
        if pair_ids is None or isinstance(pair_ids, str):
            pair_ids = [pair_ids]
        if any(pair not in self.index for pair in pair_ids):
            return None
        if torch.rand((), generator=generator).item() >= self.fraction:
            return None
        points = torch.randint(len(self.hyper), (len(pair_ids),), generator=generator)
        rows = torch.tensor([self.index[pair] for pair in pair_ids])
        targets = self.fields[rows, points].to(device=device, dtype=torch.float32)
        return self.hyper[points].to(device), targets

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The pair keys a training batch needs besides the images: the fixed mask when the term is masked."""
        return ("fixed_mask",) if self.masked else ()

    def __call__(self, ddf: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The term ``w * mean_b A_b`` (a 0-d tensor with the graph of ``ddf``); ``mask`` ``(B, 1, *spatial)``, the
        batch's fixed mask, is used when the term is masked and required then.

        Raises:
            ValueError: the term is masked and ``mask`` is ``None`` (a batch without ``"fixed_mask"``).
        """
        if not self.masked:
            return self.weight * amortised_error(ddf, targets).mean()
        if mask is None:
            raise ValueError("--amortised_mask is true but the training batch has no 'fixed_mask': train on a "
                             "dataset whose pairs have masks (Learn2Reg masksTr) or set --amortised_mask false.")
        return self.weight * amortised_error(ddf, targets, mask).mean()


def amortised_targets(path: str | Path | None = None, weight: float = 0.0, fraction: float = 0.5,
                      mask=False) -> AmortisedTargets | None:
    """The ``amortised`` component of ``configs/train.json``: ``None`` (off, the default) when ``path`` is unset or
    ``weight`` is 0, else :class:`AmortisedTargets` (``mask`` is parsed either way: ``--amortised_mask maybe`` is
    refused even when the term is off)."""
    mask = parse_flag("amortised_mask", mask)
    if path is None or not str(path).strip() or float(weight) == 0:
        return None
    return AmortisedTargets(path, weight, fraction, mask)
