"""Ignite metrics of registered pairs, computed from :class:`~.steps.RegisterStep` outputs.

Each metric is the mean over pairs of one value per pair (:mod:`elastic_hypermorph_bundle.metrics` on the network
grid); the running sum and count are all-reduced across processes, so the metrics are exact under distributed
evaluation. The per-pair functions (``pair_*``) are also what the evaluation writer reports for each pair.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.data import decollate_batch

from ..metrics import dice_per_label, folding_percent, sd_log_jacobian, target_registration_error

__all__ = [
    "as_pairs",
    "pair_dice",
    "pair_tre",
    "pair_folding_percent",
    "pair_sd_log_jacobian",
    "PairMeanMetric",
    "MaskDice",
    "PointTRE",
    "FoldingPercent",
    "SDLogJacobian",
]

logger = logging.getLogger("elastic_hypermorph_bundle")

POINT_KINDS = ("keypoints", "landmarks")


def as_pairs(output) -> list[dict]:
    """The engine output as one dict per pair: a decollated list is returned as is, a batched dict is decollated."""
    if isinstance(output, dict):
        return decollate_batch(output, detach=True)
    if isinstance(output, Sequence) and all(isinstance(item, dict) for item in output):
        return list(output)
    raise TypeError(f"expected the RegisterStep output (a dict or a list of dicts), got {type(output).__name__}.")


def _batched(tensor: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(tensor).unsqueeze(0)


def pair_dice(pair: dict, labels: Sequence[int] | None = None, warped_key: str = "warped_mask") -> torch.Tensor | None:
    """Dice per label ``(L,)`` of ``pair[warped_key]`` against ``pair["fixed_mask"]`` (None without masks).

    ``warped_key="moving_mask"`` gives the overlap before registration.
    """
    if warped_key not in pair or "fixed_mask" not in pair:
        return None
    target = _batched(pair["fixed_mask"]).round()
    return dice_per_label(_batched(pair[warped_key]).round(), target, labels)[0]


def pair_tre(pair: dict, kind: str = "keypoints", registered: bool = True) -> torch.Tensor | None:
    """TRE in mm per point ``(N,)`` of the pair's ``kind`` points on the network grid (None without them).

    ``p_fixed + u(p_fixed)`` against ``p_moving``, scaled by the network grid spacing (Learn2Reg convention, see
    :func:`~elastic_hypermorph_bundle.metrics.target_registration_error`); ``registered=False`` uses ``u = 0``
    (the error before registration).
    """
    if kind not in POINT_KINDS:
        raise ValueError(f"kind must be one of {POINT_KINDS}, got {kind!r}.")
    if f"fixed_{kind}" not in pair or f"moving_{kind}" not in pair:
        return None
    ddf = torch.as_tensor(pair["pred"]).float()
    if not registered:
        ddf = torch.zeros_like(ddf)
    return target_registration_error(ddf, pair[f"fixed_{kind}"], pair[f"moving_{kind}"], pair["spacing"])


def _region(pair: dict, masked: bool) -> torch.Tensor | None:
    return _batched(pair["fixed_mask"]) if masked and "fixed_mask" in pair else None


def pair_folding_percent(pair: dict, masked: bool = True) -> float:
    """Percentage of voxels with ``J <= 0``, inside the fixed mask when ``masked`` and the pair has one."""
    ddf = _batched(pair["pred"]).float()
    return float(folding_percent(ddf, _region(pair, masked))[0])


def pair_sd_log_jacobian(pair: dict, masked: bool = True) -> float:
    """SDlogJ, inside the fixed mask when ``masked`` and the pair has one (Learn2Reg "masked_evaluation")."""
    ddf = _batched(pair["pred"]).float()
    return float(sd_log_jacobian(ddf, _region(pair, masked))[0])


class PairMeanMetric(Metric):
    """Mean over pairs of :meth:`pair_value`; pairs without the needed data (value None) or NaN are skipped.

    Args:
        output_transform: maps the engine output to the RegisterStep output as one dict per pair (default
            :func:`as_pairs`, which accepts both the decollated list and a batched dict).
        device: where the running sum lives (the all-reduce uses it).
    """

    def __init__(self, output_transform: Callable = as_pairs, device: str | torch.device = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    def pair_value(self, pair: dict) -> float | None:
        raise NotImplementedError

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = 0

    @reinit__is_reduced
    def update(self, output) -> None:
        for pair in as_pairs(output):
            value = self.pair_value(pair)
            if value is None or math.isnan(float(value)):
                continue
            self._sum += float(value)
            self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        """The mean; NaN (with a warning) when no pair had the data, e.g. a dataset without masks or points."""
        if self._count == 0:
            logger.warning("%s: no pair had the data it needs; reporting NaN.", type(self).__name__)
            return math.nan
        return float(self._sum) / self._count


class MaskDice(PairMeanMetric):
    """Mean Dice of the warped moving mask and the fixed mask (mean over ``labels`` per pair, then over pairs).

    Args:
        labels: label values to score; default: the nonzero values of each fixed mask.
    """

    def __init__(self, labels: Sequence[int] | None = None, output_transform: Callable = as_pairs, device="cpu"):
        self.labels = labels
        super().__init__(output_transform, device)

    def pair_value(self, pair: dict) -> float | None:
        dice = pair_dice(pair, self.labels)
        return None if dice is None else float(dice.mean())


class PointTRE(PairMeanMetric):
    """Mean target registration error in mm (mean over the points of a pair, then over pairs).

    Args:
        kind: ``"keypoints"`` or ``"landmarks"``.
    """

    def __init__(self, kind: str = "keypoints", output_transform: Callable = as_pairs, device="cpu"):
        if kind not in POINT_KINDS:
            raise ValueError(f"kind must be one of {POINT_KINDS}, got {kind!r}.")
        self.kind = kind
        super().__init__(output_transform, device)

    def pair_value(self, pair: dict) -> float | None:
        tre = pair_tre(pair, self.kind)
        return None if tre is None else float(tre.mean())


class FoldingPercent(PairMeanMetric):
    """Mean percentage of folded voxels (``J <= 0``), inside the fixed mask when ``masked`` and available."""

    def __init__(self, masked: bool = True, output_transform: Callable = as_pairs, device="cpu"):
        self.masked = masked
        super().__init__(output_transform, device)

    def pair_value(self, pair: dict) -> float:
        return pair_folding_percent(pair, self.masked)


class SDLogJacobian(PairMeanMetric):
    """Mean standard deviation of the log Jacobian determinant, inside the fixed mask when ``masked``."""

    def __init__(self, masked: bool = True, output_transform: Callable = as_pairs, device="cpu"):
        self.masked = masked
        super().__init__(output_transform, device)

    def pair_value(self, pair: dict) -> float:
        return pair_sd_log_jacobian(pair, self.masked)
