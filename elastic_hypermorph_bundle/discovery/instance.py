"""The test-time stages at the sweep's selected point, with the settings inference runs (the sweep's own rows may
use a shorter optimisation): the network alone and the whole registration
(:class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`) once per pair at the chosen ``(lam, mu)``."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ..workflow.instance import InstanceOptimization
from .sweep import PreparedPair, field_metrics, register_pair

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
        alone = [field_metrics(pair.predict(network, weights), pair, named, labels) for pair in pairs]
    for pair in pairs:
        start = time.perf_counter()
        ddf = register_pair(network, weights, row, pair, instance)
        seconds.append(time.perf_counter() - start)
        optimised.append(field_metrics(ddf, pair, named, labels))
    alone_mean, optimised_mean = _mean(alone), _mean(optimised)
    return {
        "point": named,
        "settings": {"steps": list(instance.steps), "similarity": instance.similarity, "levels": instance.levels,
                     "grid": instance.grid, "prealign": instance.prealign, "use_mask": instance.use_mask,
                     "coverage_mask": instance.coverage_mask},
        "network": alone_mean,
        "optimized": optimised_mean,
        "gain": {key: optimised_mean[key] - alone_mean[key] for key in alone_mean},
        "seconds_per_pair": float(np.mean(seconds)),
    }
