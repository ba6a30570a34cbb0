"""The forward pass of the bundle's networks on a pair of images: the network input, the network's field with
weights generated once for many pairs, and the terms of a training step. Every caller (the engines' steps, the sweep
and refinement, the benchmark) goes through these functions, so the input convention, the weighted call and the order
forward -> warp -> loss live here only.

Conventions (see the package docstring): images ``(B, 1, *spatial)`` on one grid, the network input
``x = cat([moving, fixed], dim=1)`` ``(B, 2, *spatial)`` (channel 0 moving, channel 1 fixed, as ``metadata.json``
states), the DDF ``(B, D, *spatial)`` in voxels, backward warp ``moving(x + u(x))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .networks import warp_image

__all__ = ["network_input", "weighted_ddf", "plain", "training_terms"]


def plain(tensor) -> torch.Tensor:
    """A MONAI ``MetaTensor`` as a plain ``torch.Tensor`` (inner loops, autograd graphs and writers need no metadata
    tracking); any other tensor as it is, an array or number as a tensor (``torch.as_tensor``)."""
    tensor = torch.as_tensor(tensor)
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def network_input(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """``cat([moving, fixed], dim=1)``: the ``(B, 2, *spatial)`` input of the hyper-conditioned networks.

    Raises:
        ValueError: the images are not ``(B, 1, *spatial)`` tensors of one shape.
    """
    if moving.shape != fixed.shape or moving.ndim < 3 or moving.shape[1] != 1:
        raise ValueError(
            f"moving and fixed must be (B, 1, *spatial) images of one shape, got {tuple(moving.shape)} and "
            f"{tuple(fixed.shape)}."
        )
    return torch.cat([moving, fixed], dim=1)


def weighted_ddf(network: torch.nn.Module, x: torch.Tensor, weights) -> torch.Tensor:
    """``network(x, weights=weights)``: the DDF ``(B, D, *spatial)`` (plain, float32) of a hyper-conditioned
    network on the input ``x`` (:func:`network_input`) with the weights it generated once for one hyperparameter
    row (``weights = network.generate_weights(hyper)``), so one generation serves every pair of a registration run,
    a sweep's grid point or a refinement step. Differentiable with respect to ``weights``."""
    return plain(network(x, weights=weights)).float()


def training_terms(
    network: torch.nn.Module,
    loss_function: Callable,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    hyper: torch.Tensor,
    *,
    inferer: Callable | None = None,
    amp: bool = False,
    amp_kwargs: Mapping | None = None,
    on_forward: Callable[[torch.Tensor], None] | None = None,
) -> dict:
    """Forward, warp and loss terms of one HyperMorph training step (no backward, no optimizer step).

    1. ``ddf, velocity = network(x, hyper, return_velocity=True)`` with ``x = network_input(moving, fixed)``,
       through ``inferer`` if given (e.g. a MONAI ``SimpleInferer``), under autocast if ``amp``;
    2. ``on_forward(ddf)`` if given (e.g. to fire an engine event or check the field);
    3. ``warped = warp_image(moving, ddf)`` and ``loss_function(warped, fixed, ddf, hyper, velocity=velocity,
       return_components=True)`` (a :class:`~elastic_hypermorph_bundle.losses.RegistrationLoss`), in float32
       (the local variances of LNCC lose too much precision in half precision).

    Args:
        network: a hyper-conditioned network (``forward(x, hyper, return_velocity=True)``).
        loss_function: the registration loss.
        moving, fixed: ``(B, 1, *spatial)`` images.
        hyper: ``(B, H)`` rows, one per sample (or ``(1, H)`` shared).

    Returns:
        ``"image"`` (network input), ``"pred"`` (the DDF as the network returned it), ``"warped"``, and the loss
        terms (``"loss"``, ``"similarity"``, ``"regularization"``: 0-d tensors, ``"loss"`` with its graph).
    """
    image = network_input(moving, fixed)
    with torch.autocast(image.device.type, enabled=bool(amp), **dict(amp_kwargs or {})):
        if inferer is None:
            ddf, velocity = network(image, hyper, return_velocity=True)
        else:
            ddf, velocity = inferer(image, network, hyper, return_velocity=True)
    if on_forward is not None:
        on_forward(ddf)
    field, velocity = ddf.float(), velocity.float()
    warped = warp_image(moving.float(), field)
    terms = loss_function(warped, fixed.float(), field, hyper, velocity=velocity, return_components=True)
    return {"image": image, "pred": ddf, "warped": warped, **terms}
