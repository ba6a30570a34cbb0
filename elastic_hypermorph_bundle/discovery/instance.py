"""The instance optimisation's gain at the sweep's selected point: the sweep itself stays amortised (network
passes only), and the test-time stages (:class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`) run once
per pair at the chosen ``(lam, mu)``, as inference would run them."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ..forward import network_input, weighted_ddf
from ..workflow.instance import InstanceOptimization
from .sweep import PreparedPair, field_metrics

__all__ = ["instance_gain"]


def _mean(rows: list[dict]) -> dict[str, float]:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def instance_gain(
    network: torch.nn.Module,
    row: torch.Tensor,
    names: Sequence[str],
    pairs: Sequence[PreparedPair],
    labels: Sequence[int],
    instance: InstanceOptimization,
) -> dict:
    """Mean metrics (:func:`~.sweep.field_metrics`) of the network alone and of the network with the test-time
    stages at one hyperparameter row ``(1, H)``, their difference (``gain``: optimised minus network, e.g. a
    negative ``tre_mm``) and the stages' seconds per pair."""
    named = dict(zip(names, row[0].tolist()))
    alone, optimised, seconds = [], [], []
    with torch.no_grad():
        weights = network.generate_weights(row)
    for pair in pairs:

        def predict(moving: torch.Tensor, pair=pair) -> torch.Tensor:
            with torch.no_grad():
                return weighted_ddf(network, network_input(moving, pair.fixed), weights)

        alone.append(field_metrics(predict(pair.moving), pair, named, labels))
        mask = None if not instance.use_mask else pair.fixed_mask
        if instance.use_mask and mask is None:
            raise ValueError("--use_mask true needs fixed masks for every pair of the split.")
        start = time.perf_counter()
        ddf = instance.register(predict, pair.fixed.float(), pair.moving.float(), row, pair.spacing, mask)
        seconds.append(time.perf_counter() - start)
        optimised.append(field_metrics(ddf, pair, named, labels))
    alone_mean, optimised_mean = _mean(alone), _mean(optimised)
    return {
        "point": named,
        "settings": {"steps": instance.steps, "similarity": instance.similarity, "levels": instance.levels,
                     "grid": instance.grid, "prealign": instance.prealign, "use_mask": instance.use_mask},
        "network": alone_mean,
        "optimized": optimised_mean,
        "gain": {key: optimised_mean[key] - alone_mean[key] for key in alone_mean},
        "seconds_per_pair": float(np.mean(seconds)),
    }
