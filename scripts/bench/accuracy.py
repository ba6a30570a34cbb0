"""Section 5 of the benchmark: accuracy and time of the bundle's model against classical registration on simulated
breathing-lung pairs with known ground truth (:mod:`elastic_hypermorph_bundle.data.synthetic`).

The bundle's network (HyperUNet) is trained here, on the training pairs, with the bundle's loss
(:class:`~elastic_hypermorph_bundle.losses.RegistrationLoss`, local NCC + regularizer) and per-sample hyperparameters
drawn from :class:`~elastic_hypermorph_bundle.hyperparams.HyperSpace`, for a fixed wall-clock budget; once with the
elastic regularizer (``[lam, mu]``) and once with the diffusion baseline (``[alpha]``). Each model is swept over its
hyperparameter grid on the validation pairs and evaluated on the held-out test pairs at the best value (lowest mean
keypoint TRE). The classical peers register the same test pairs.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from elastic_hypermorph_bundle.data.synthetic import simulate_pair
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.metrics import (
    dice_per_label, folding_percent, sd_log_jacobian, target_registration_error,
)
from elastic_hypermorph_bundle.networks import HyperUNet, warp_image, warp_label

from .classical import demons_register, elastix_available, elastix_register

__all__ = ["HU_WINDOW", "simulate_split", "evaluate_ddf", "train_model", "sweep_select", "classical_accuracy"]

HU_WINDOW = (-1000.0, 500.0)  # the bundle's intensity window, clipped and scaled to [0, 1]


def _normalise(image: np.ndarray) -> np.ndarray:
    low, high = HU_WINDOW
    return ((np.clip(image.astype(np.float32), low, high) - low) / (high - low)).astype(np.float32)


def simulate_split(spatial_size, counts: dict[str, int], seed: int) -> dict[str, list]:
    """Simulated pairs per split (disjoint seeds), e.g. ``counts={"train": 8, "val": 2, "test": 4}``."""
    splits, next_seed = {}, seed
    for split, count in counts.items():
        splits[split] = [simulate_pair(spatial_size, seed=next_seed + i) for i in range(count)]
        next_seed += count
    return splits


def _tensor_input(pair, device) -> torch.Tensor:
    moving = torch.from_numpy(_normalise(pair.moving_image))
    fixed = torch.from_numpy(_normalise(pair.fixed_image))
    return torch.stack([moving, fixed])[None].to(device)


def evaluate_ddf(ddf: np.ndarray | torch.Tensor, pair) -> dict:
    """Metrics of a DDF ``(3, X, Y, Z)`` (voxels, package convention) against a simulated pair's ground truth.

    ``tre_keypoints_mm``: mean TRE of the vessel-bifurcation keypoints; ``tre_dense_mm``: mean ``|u - u_gt|`` in mm
    over the fixed lung mask; ``dice``: mean Dice over the phantom labels (moving labels warped with nearest
    neighbour vs fixed labels); ``folding_percent``: % of ``J <= 0``; ``sd_log_j``: SDlogJ (whole field)."""
    ddf = torch.as_tensor(np.asarray(ddf, dtype=np.float32))[None]
    spacing = torch.tensor(pair.spacing, dtype=torch.float32)
    tre = target_registration_error(ddf[0], pair.fixed_keypoints, pair.moving_keypoints, spacing)
    error = (ddf[0] - torch.from_numpy(pair.displacement)) * spacing.view(3, 1, 1, 1)
    lung = torch.from_numpy(pair.fixed_mask > 0)
    warped = warp_label(torch.from_numpy(pair.moving_labels.astype(np.int64))[None, None], ddf)
    dice = dice_per_label(warped, torch.from_numpy(pair.fixed_labels.astype(np.int64))[None, None])
    return {
        "tre_keypoints_mm": float(tre.mean()),
        "tre_dense_mm": float(torch.linalg.vector_norm(error, dim=0)[lung].mean()),
        "dice": float(dice.mean()),
        "folding_percent": float(folding_percent(ddf)[0]),
        "sd_log_j": float(sd_log_jacobian(ddf)[0]),
    }


def train_model(regularizer: str, pairs: list, seconds: float, device, learning_rate: float, seed: int) -> dict:
    """Train a HyperUNet on ``pairs`` for ``seconds`` of wall clock (batch 1, Adam, per-sample hyperparameters
    from a uniform HyperSpace on [0, 1]); return the model, the space and the step count."""
    torch.manual_seed(seed)
    space = HyperSpace(regularizer)
    net = HyperUNet(hyper_dims=space.dims).to(device)
    loss_fn = RegistrationLoss(regularizer=regularizer)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    inputs = [_tensor_input(pair, device) for pair in pairs]
    steps, start = 0, time.perf_counter()
    net.train()
    while time.perf_counter() - start < seconds:
        x = inputs[steps % len(inputs)]
        hyper = space.sample(1, generator, device)
        ddf = net(x, hyper)
        loss = loss_fn(warp_image(x[:, :1], ddf), x[:, 1:], ddf, hyper)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return {"net": net.eval(), "space": space, "steps": steps, "seconds": time.perf_counter() - start,
            "final_loss": float(loss.detach())}


def _predict(net, weights, pair, device) -> np.ndarray:
    with torch.inference_mode():
        return net(_tensor_input(pair, device), weights=weights)[0].cpu().numpy()


def sweep_select(model: dict, pairs: list, grid: int, device) -> dict:
    """Sweep the model's hyperparameter grid on ``pairs``; return the row with the lowest mean keypoint TRE."""
    rows = model["space"].grid(grid).to(device)
    scores = []
    for row in rows:
        weights = model["net"].generate_weights(row[None])
        scores.append(np.mean([evaluate_ddf(_predict(model["net"], weights, p, device), p)["tre_keypoints_mm"]
                               for p in pairs]))
    best = int(np.argmin(scores))
    return {"names": list(model["space"].names), "best": rows[best].tolist(), "best_val_tre_mm": scores[best],
            "grid_points": len(rows)}


def _summarise(method: str, results: list[dict], seconds: list[float], extra: dict | None = None) -> dict:
    keys = results[0].keys()
    summary = {key: float(np.mean([r[key] for r in results])) for key in keys}
    summary.update({"method": method, "seconds_per_pair": float(np.median(seconds)), "pairs": len(results),
                    "per_pair": results})
    if extra:
        summary.update(extra)
    return summary


def evaluate_model(name: str, model: dict, selection: dict, pairs: list, device) -> dict:
    weights_row = torch.tensor([selection["best"]], device=device)
    results, seconds = [], []
    for pair in pairs:
        start = time.perf_counter()
        with torch.inference_mode():
            ddf = model["net"](_tensor_input(pair, device), weights_row)[0].cpu().numpy()
        seconds.append(time.perf_counter() - start)
        results.append(evaluate_ddf(ddf, pair))
    return _summarise(name, results, seconds, {
        "hyperparameters": dict(zip(selection["names"], selection["best"])),
        "training_steps": model["steps"], "training_seconds": model["seconds"],
    })


def classical_accuracy(pairs: list, elastix_iterations: int, demons_iterations: list[int]) -> list[dict]:
    """Identity, elastix B-spline (if itk-elastix is installed) and SimpleITK demons on ``pairs``."""
    methods = {"identity (no registration)": lambda f, m, s: np.zeros((3, *f.shape), np.float32)}
    if elastix_available():
        from .classical import elastix_lung_parameters

        methods["elastix B-spline (NCC + bending energy)"] = lambda f, m, s: elastix_register(
            f, m, s, elastix_lung_parameters(iterations=elastix_iterations))
    methods["SimpleITK demons (fast symmetric forces)"] = lambda f, m, s: demons_register(
        f, m, s, iterations=demons_iterations)
    rows = []
    for method, register in methods.items():
        results, seconds = [], []
        for pair in pairs:
            fixed, moving = _normalise(pair.fixed_image), _normalise(pair.moving_image)
            start = time.perf_counter()
            ddf = register(fixed, moving, pair.spacing)
            seconds.append(time.perf_counter() - start)
            results.append(evaluate_ddf(ddf, pair))
        rows.append(_summarise(method, results, seconds))
    if not elastix_available():
        rows.append({"method": "elastix B-spline", "skipped": "itk-elastix is not installed (pip install itk-elastix)"})
    return rows
