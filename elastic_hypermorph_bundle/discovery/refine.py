"""Gradient refinement of hyperparameters through a frozen hypernetwork.

The trained network maps hyperparameters ``h`` to a field ``u(h)`` differentiably, so a supervised objective of
the registered pairs can be minimised over ``h`` directly. ``h`` stays inside the trained box by the
reparametrisation ``h = low + (high - low) * sigmoid(z)``, optimised over ``z`` with Adam (whose normalised steps
also move ``z`` near the box edges, where the sigmoid is flat). Objectives (mean over pairs, lower is better):

* ``"dice"``: soft Dice loss (MONAI :class:`~monai.losses.DiceLoss`) of the one-hot moving mask warped LINEARLY
  (a differentiable surrogate of the nearest-neighbour Dice of the sweep) against the one-hot fixed mask;
* ``"tre"``: mean target registration error in mm (linear interpolation of the field at the fixed points).

The result is the best point evaluated, the exact starting point included, so refinement never ends worse than
its start on its objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceLoss

from ..hyperparams import HyperSpace
from ..metrics import target_registration_error
from ..networks import warp_image
from .sweep import PreparedPair

__all__ = ["OBJECTIVES", "pair_objective", "objective_value", "refine_hyper"]

OBJECTIVES = ("dice", "tre")
_SOFT_DICE = DiceLoss(include_background=True, reduction="mean")


def _one_hot(mask: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """``(1, 1, *spatial)`` label map -> ``(1, L, *spatial)`` float indicator of each label."""
    values = torch.as_tensor(list(labels), dtype=mask.dtype, device=mask.device).view(1, -1, *([1] * (mask.ndim - 2)))
    return (mask.round() == values).to(torch.float32)


def pair_objective(ddf: torch.Tensor, pair: PreparedPair, objective: str, labels: Sequence[int] = ()) -> torch.Tensor:
    """Differentiable objective (0-d tensor, lower is better) of one pair's field ``(1, D, *spatial)``."""
    if objective == "dice":
        if pair.fixed_mask is None or pair.moving_mask is None or not labels:
            raise ValueError(f"the 'dice' objective needs masks and labels; pair {pair.pair_id} has none.")
        warped = warp_image(_one_hot(pair.moving_mask, labels), ddf, padding_mode="zeros")
        return _SOFT_DICE(warped, _one_hot(pair.fixed_mask, labels))
    if objective == "tre":
        if pair.fixed_points is None:
            raise ValueError(f"the 'tre' objective needs points; pair {pair.pair_id} has none.")
        return target_registration_error(ddf[0], pair.fixed_points, pair.moving_points, pair.spacing).mean()
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")


def objective_value(
    network: torch.nn.Module, hyper: torch.Tensor, pairs: Sequence[PreparedPair], objective: str, labels=()
) -> float:
    """Mean objective over ``pairs`` at one row ``hyper`` ``(1, H)``, without gradients."""
    with torch.no_grad():
        weights = network.generate_weights(hyper)
        values = [float(pair_objective(p.predict(network, weights), p, objective, labels)) for p in pairs]
    return sum(values) / len(values)


def refine_hyper(
    network: torch.nn.Module,
    space: HyperSpace,
    pairs: Sequence[PreparedPair],
    start: torch.Tensor,
    objective: str = "dice",
    labels: Sequence[int] = (),
    steps: int = 30,
    lr: float = 0.1,
    edge_margin: float = 1e-3,
) -> dict:
    """Minimise the mean ``objective`` over ``pairs`` with respect to the hyperparameters, from ``start``.

    Args:
        network: trained hyper-conditioned network; its parameters are not changed (gradients are switched off for
            them during the refinement and restored afterwards).
        space: the model's trained ranges (the refinement never leaves them).
        pairs: prepared pairs on the network's device.
        start: ``(1, H)`` starting row (e.g. the grid optimum), inside the trained ranges.
        objective: ``"dice"`` or ``"tre"`` (see module docstring).
        labels: mask labels for ``"dice"``.
        steps: Adam steps; each costs one forward and backward pass per pair.
        lr: Adam learning rate on ``z``.
        edge_margin: the sigmoid's starting point is kept this fraction of the range away from the box edges
            (``sigmoid(z)`` never reaches 0 or 1); the exact ``start`` is still evaluated as a candidate.

    Returns:
        ``start``/``refined`` rows (by name), ``start_objective``/``objective`` (mean over pairs),
        ``history`` (every evaluated row and its objective), ``network_evaluations`` (forward passes, each
        backward included), ``improved``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}.")
    device = pairs[0].fixed.device
    start = space.check(torch.as_tensor(start, dtype=torch.float32).reshape(1, -1)).to(device)
    low, high = space.low.to(device).view(1, -1), space.high.to(device).view(1, -1)
    fraction = ((start - low) / (high - low)).clamp(edge_margin, 1 - edge_margin)
    z = torch.logit(fraction).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)

    start_value = objective_value(network, start, pairs, objective, labels)
    history = [{**dict(zip(space.names, start[0].tolist())), "objective": start_value}]
    best_row, best_value = start, start_value
    evaluations = len(pairs)
    trainable = [p for p in network.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    network.eval()
    try:
        for step in range(steps + 1):
            # the clamp only absorbs float rounding at the edges: sigmoid keeps the row in [low, high]
            row = torch.minimum(torch.maximum(low + (high - low) * torch.sigmoid(z), low), high)
            if step == steps:  # the point after the last update: evaluate only
                value = objective_value(network, row.detach(), pairs, objective, labels)
            else:
                optimizer.zero_grad()
                weights = network.generate_weights(row)
                value = 0.0
                for pair in pairs:
                    loss = pair_objective(pair.predict(network, weights), pair, objective, labels)
                    (loss / len(pairs)).backward(retain_graph=True)  # keep the hypernetwork graph for the next pair
                    value += float(loss.detach()) / len(pairs)
                optimizer.step()
            evaluations += len(pairs)
            history.append({**dict(zip(space.names, row.detach()[0].tolist())), "objective": value})
            if value < best_value:
                best_row, best_value = row.detach(), value
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return {
        "objective_name": "soft_dice_loss" if objective == "dice" else "tre_mm",
        "start": dict(zip(space.names, start[0].tolist())),
        "start_objective": start_value,
        "refined": dict(zip(space.names, best_row[0].tolist())),
        "objective": best_value,
        "improved": best_value < start_value,
        "steps": steps,
        "lr": lr,
        "network_evaluations": evaluations,
        "history": history,
    }
