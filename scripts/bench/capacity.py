"""Section 6 of the benchmark: how much conditioning capacity the registration needs. Variants of the HyperUNet that
differ only in how (lam, mu) conditions the convolutions are trained on the same pairs, for the same number of
steps, from the same seed, and scored on the same held-out pairs.

Variants (:func:`build_variant`): the plain twin (no conditioning: one field for every (lam, mu), the floor),
conditional instance normalisation (``conditioning="instance_norm"``), the rank-limited kernel map for a few
``hyper_rank`` K, and the full map (``hyper_rank=0``, HyperMorph's dense map to every kernel entry).

Measures, per variant: trainable parameters; the median seconds of a training step and of an inference during the
run (ratios to the plain twin of the same run); on the held-out pairs, the training objective (LNCC + elastic
energy at that (lam, mu), :class:`~elastic_hypermorph_bundle.losses.RegistrationLoss`) averaged over a grid of
(lam, mu) covering the trained range (what conditioning is for: the optimum of every (lam, mu)'s objective, not one
compromise field), the ground-truth TRE and lung Dice at the bundle's default (lam, mu), and the mean change of the
field between the range's corners (0 for the plain twin: the conditioning must move the field).
"""

from __future__ import annotations

import itertools
import statistics
import time

import numpy as np
import torch

from elastic_hypermorph_bundle.forward import training_terms
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.networks import HyperUNet

from .accuracy import evaluate_ddf, normalise
from .nets import PlainTwin, count_parameters

__all__ = ["VARIANTS", "build_variant", "train_and_score"]

VARIANTS = {
    "plain": {"name": "plain twin (no conditioning)"},
    "instance_norm": {"name": "conditional instance norm", "kwargs": {"conditioning": "instance_norm",
                                                                     "hyper_rank": None}},
    "rank": {"name": "kernel map, rank {K}"},
    "full": {"name": "kernel map, full (HyperMorph)", "kwargs": {"hyper_rank": 0}},
}


def build_variant(variant: str, seed: int) -> tuple[str, torch.nn.Module]:
    """``(name, network)`` of one variant: ``"plain"``, ``"instance_norm"``, ``"full"`` or ``"rank<K>"``."""
    torch.manual_seed(seed)
    if variant.startswith("rank"):
        rank = int(variant[4:])
        return VARIANTS["rank"]["name"].format(K=rank), HyperUNet(in_channels=2, hyper_dims=2, hyper_rank=rank)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)} or 'rank<K>', got {variant!r}.")
    if variant == "plain":
        # the twin of the default network; its layout does not depend on the hypernetwork
        return VARIANTS["plain"]["name"], PlainTwin(HyperUNet(in_channels=2, hyper_dims=2))
    return VARIANTS[variant]["name"], HyperUNet(in_channels=2, hyper_dims=2, **VARIANTS[variant]["kwargs"])


def _images(pair) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(normalise(image))[None, None] for image in (pair.moving_image, pair.fixed_image))


def train_and_score(variant: str, train_pairs: list, test_pairs: list, steps: int, hyper_grid: list,
                    default_hyper: list, learning_rate: float = 1e-3, seed: int = 0) -> dict:
    """Train one variant ``steps`` Adam steps (batch 1, pairs in turn, ``[lam, mu]`` uniform in [0, 1]^2 from a
    generator seeded by ``seed``, so every variant sees the same pairs and the same rows), then score it on
    ``test_pairs`` (module docstring). Returns the variant's row."""
    name, net = build_variant(variant, seed)
    space = HyperSpace("elastic")
    loss_fn = RegistrationLoss(regularizer="elastic")
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    train = [_images(p) for p in train_pairs]
    net.train()
    step_seconds, losses = [], []
    for step in range(steps):
        moving, fixed = train[step % len(train)]
        hyper = space.sample(1, generator)
        start = time.perf_counter()
        loss = training_terms(net, loss_fn, moving, fixed, hyper)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))

    net.eval()
    grid = torch.tensor(hyper_grid, dtype=torch.float32)
    objective, inference_seconds, tre, dice, change = [], [], [], [], []
    low, high = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    with torch.inference_mode():
        for pair in test_pairs:
            moving, fixed = _images(pair)
            for row in grid:
                objective.append(float(training_terms(net, loss_fn, moving, fixed, row[None])["loss"]))
            start = time.perf_counter()
            ddf = training_terms(net, loss_fn, moving, fixed, torch.tensor([default_hyper]))["pred"]
            inference_seconds.append(time.perf_counter() - start)
            scores = evaluate_ddf(ddf[0], pair)
            tre.append(scores["tre_mm"])
            dice.append(scores["dice_mean"])
            corners = [training_terms(net, loss_fn, moving, fixed, h)["pred"][0] for h in (low, high)]
            spacing = torch.tensor(pair.spacing, dtype=torch.float32).view(3, 1, 1, 1)
            change.append(float(torch.linalg.vector_norm((corners[1] - corners[0]) * spacing, dim=0).mean()))
    tail = max(1, steps // 10)
    return {
        "variant": variant, "name": name, "parameters": count_parameters(net), "steps": steps,
        "train_seconds": float(sum(step_seconds)), "step_median_s": statistics.median(step_seconds),
        "inference_median_s": statistics.median(inference_seconds),
        "final_train_loss": float(np.mean(losses[-tail:])),
        "heldout_objective": float(np.mean(objective)), "tre_mm": float(np.mean(tre)),
        "dice_mean": float(np.mean(dice)), "field_change_mm": float(np.mean(change)),
    }


def hyper_grid(points: int) -> list[list[float]]:
    """``points x points`` (lam, mu) rows spanning the trained range [0, 1]^2, corners included."""
    axis = np.linspace(0.0, 1.0, points).tolist()
    return [[lam, mu] for lam, mu in itertools.product(axis, axis)]


def run(options: dict, train_pairs: list, test_pairs: list, log=print) -> dict:
    """Every variant of ``options["variants"]`` on the same pairs; ratios to the plain twin's step and inference
    times (the twin must be among the variants)."""
    grid = hyper_grid(options["grid_points"])
    rows = []
    for variant in options["variants"]:
        rows.append(train_and_score(variant, train_pairs, test_pairs, options["steps"], grid,
                                    options["default_hyper"], options["learning_rate"], options["seed"]))
        row = rows[-1]
        log(f"  {row['name']}: {row['parameters']:,} parameters, {row['train_seconds']:.0f} s, held-out objective "
            f"{row['heldout_objective']:.4f}, TRE {row['tre_mm']:.2f} mm")
    plain = next((r for r in rows if r["variant"] == "plain"), None)
    for row in rows:
        row["step_ratio"] = row["step_median_s"] / plain["step_median_s"] if plain else None
        row["inference_ratio"] = row["inference_median_s"] / plain["inference_median_s"] if plain else None
    before = [evaluate_ddf(np.zeros_like(pair.displacement), pair)["tre_mm"] for pair in test_pairs]
    return {"setup": {**options, "hyper_grid": grid, "tre_before_mm": float(np.mean(before))}, "rows": rows}
