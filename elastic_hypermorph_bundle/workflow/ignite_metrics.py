"""Ignite metrics of registered pairs, computed from :class:`~.steps.RegisterStep` outputs.

Every per-pair value is one entry of :func:`elastic_hypermorph_bundle.metrics.pair_metrics` (the bundle's one
vocabulary of metric names) on the network grid, computed once per pair (:func:`registered_pair_metrics`) and shared
by every metric and the evaluation writer. :class:`PairMean` is the mean over pairs of one entry, each pair counted
once: under distributed evaluation the per-pair values of all processes are gathered and a pair that a padding
sampler gave to two processes (``DistributedSampler(even_divisible=True)``) counts once, so the score that picks
the best checkpoint is the plain mean over the validation pairs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from monai.data import decollate_batch

from ..metrics import POINT_KINDS, pair_metrics

__all__ = ["as_pairs", "points_kind", "registered_pair_metrics", "PairMean"]

logger = logging.getLogger("elastic_hypermorph_bundle")


def as_pairs(output) -> list[dict]:
    """The engine output as one dict per pair: a decollated list is returned as is, a batched dict is decollated."""
    if isinstance(output, dict):
        return decollate_batch(output, detach=True)
    if isinstance(output, Sequence) and all(isinstance(item, dict) for item in output):
        return list(output)
    raise TypeError(f"expected the RegisterStep output (a dict or a list of dicts), got {type(output).__name__}.")


def points_kind(pair: dict) -> str | None:
    """The point kind of a pair (or datalist entry) that TRE scores: the first of ``POINT_KINDS`` it has."""
    return next((kind for kind in POINT_KINDS if f"fixed_{kind}" in pair and f"moving_{kind}" in pair), None)


def registered_pair_metrics(
    pair: dict, hyper_names: Sequence[str] | None = None, labels: Sequence[int] | None = None, masked: bool = True
) -> dict[str, float]:
    """:func:`~elastic_hypermorph_bundle.metrics.pair_metrics` of one RegisterStep output pair (with the values
    before registration), cached in ``pair["metrics"]`` so that each pair is scored once per setting.

    Args:
        pair: one decollated pair: ``"pred"``, and whichever of masks, points, images, ``"warped_mask"``,
            ``"spacing"``, ``"hyper"`` it has (LNCC warps its ``"moving_image"``).
        hyper_names: names of the ``"hyper"`` row (e.g. ``("lam", "mu")``), for ``elastic_energy``.
        labels: mask labels to score (default: the nonzero labels of the fixed mask).
        masked: Jacobian metrics inside the fixed mask.
    """
    key = (tuple(hyper_names or ()), None if labels is None else tuple(int(v) for v in labels), bool(masked))
    cache = pair.setdefault("metrics", {})
    if key not in cache:
        kind = points_kind(pair)
        hyper = None
        if hyper_names and "hyper" in pair:
            hyper = dict(zip(hyper_names, torch.as_tensor(pair["hyper"]).flatten().tolist()))
        cache[key] = pair_metrics(
            pair["pred"],
            fixed_mask=pair.get("fixed_mask"),
            moving_mask=pair.get("moving_mask"),
            warped_mask=pair.get("warped_mask"),
            labels=labels,
            fixed_points=pair.get(f"fixed_{kind}") if kind else None,
            moving_points=pair.get(f"moving_{kind}") if kind else None,
            spacing=pair.get("spacing"),
            fixed_image=pair.get("fixed_image"),
            moving_image=pair.get("moving_image"),
            hyper=hyper,
            masked=masked,
            before=True,
        )
    return cache[key]


class PairMean(Metric):
    """Mean over pairs of one :func:`~elastic_hypermorph_bundle.metrics.pair_metrics` entry, e.g. ``"dice_mean"``,
    ``"tre_mm"``, ``"folding_percent"``, ``"sd_log_jacobian"``; pairs without it (no masks, no points) or with NaN
    are skipped, and a pair seen more than once (same ``pair_id``, on any process) counts once.

    Args:
        metric: the entry's name.
        labels, masked: see :func:`registered_pair_metrics`.
        output_transform: maps the engine output to one dict per pair (default :func:`as_pairs`).
        device: where the running sum lives (the all-reduce uses it).
    """

    def __init__(
        self,
        metric: str,
        labels: Sequence[int] | None = None,
        masked: bool = True,
        output_transform: Callable = as_pairs,
        device: str | torch.device = "cpu",
    ) -> None:
        self.metric, self.labels, self.masked = str(metric), labels, masked
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._values: dict[str, float] = {}

    @reinit__is_reduced
    def update(self, output) -> None:
        for pair in as_pairs(output):
            value = registered_pair_metrics(pair, labels=self.labels, masked=self.masked).get(self.metric)
            if value is None or math.isnan(float(value)):
                continue
            key = str(pair.get("pair_id") or f"rank{idist.get_rank()}_{len(self._values)}")
            self._values[key] = float(value)

    def compute(self) -> float:
        """The mean; NaN (with a warning) when no pair had the data, e.g. a dataset without masks or points."""
        values = dict(self._values)
        if idist.get_world_size() > 1:  # every process takes part, also one without pairs
            for gathered in idist.all_gather(self._values):
                values.update(gathered)
        if not values:
            logger.warning("%s(%r): no pair had the data it needs; reporting NaN.", type(self).__name__, self.metric)
            return math.nan
        return float(sum(values.values()) / len(values))
