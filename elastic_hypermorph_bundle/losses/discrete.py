"""A coarse discrete displacement search: a start for the instance optimisation that captures large motion without a
network (the coupled convex step of ConvexAdam, Siebert, Hansen & Heinrich, MICCAI 2021, re-derived here).

On a grid ``factor`` times coarser than the image, MIND-SSC descriptors ``F`` (fixed) and ``M`` (moving) are
compared for every integer displacement ``d`` of a window ``[-radius, radius]^3`` (coarse voxels):
``C(x, d) = sum_c (F_c(x) - M_c(x + d))^2``, smoothed over ``x`` (two 3^3 box filters, so that a control point
looks at its neighbourhood). The field is then chosen per control point, coupled to its smoothed self with growing
weights ``w``: ``d_{k+1}(x) = argmin_d C(x, d) + w_k |d - S(d_k)(x)|^2`` with ``S`` a 3^3 box filter, starting from
the plain per-point minimum. Each step is an exact minimisation over the window (a convex relaxation of a smooth
discrete labelling), so motion up to ``radius * factor`` image voxels is found without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mind import mind_ssc

__all__ = ["COUPLING_WEIGHTS", "discrete_search"]

#: the coupling weights of the successive argmin steps (cost units: summed squared MIND differences, 12 descriptors)
COUPLING_WEIGHTS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def _box(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool3d(F.pad(x, (1,) * 6, mode="replicate"), 3, stride=1)


def discrete_search(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    factor: int = 4,
    radius: int = 4,
    coupling=COUPLING_WEIGHTS,
    chunk: int = 81,
) -> torch.Tensor:
    """The discrete search of the module docstring for each pair.

    Args:
        fixed, moving: ``(B, 1, X, Y, Z)`` images on one grid (e.g. the moving image already pre-aligned).
        factor: coarsening of the search grid (4 = quarter resolution).
        radius: half-width of the displacement window, in coarse voxels.
        coupling: the weights ``w_k`` of the coupled steps.
        chunk: displacements evaluated at once (memory: ``chunk`` cost volumes of the coarse grid).

    Returns:
        ``(B, 3, X, Y, Z)`` displacement in voxels of the image grid (package convention), trilinear between the
        control points.

    Raises:
        ValueError: images of different shapes, ``factor`` < 1 or ``radius`` < 1.
    """
    if fixed.shape != moving.shape or fixed.ndim != 5 or fixed.shape[1] != 1:
        raise ValueError(f"discrete_search needs fixed and moving (B, 1, X, Y, Z) of one shape, got "
                         f"{tuple(fixed.shape)} and {tuple(moving.shape)}.")
    if int(factor) < 1 or int(radius) < 1:
        raise ValueError(f"discrete_search needs factor >= 1 and radius >= 1, got {factor} and {radius}.")
    shape = tuple(fixed.shape[2:])
    level = tuple(max(4, n // int(factor)) for n in shape)
    with torch.no_grad():
        f = F.adaptive_avg_pool3d(mind_ssc(fixed), level)
        m = F.pad(F.adaptive_avg_pool3d(mind_ssc(moving), level), (radius,) * 6, mode="replicate")
        window = torch.arange(-radius, radius + 1, device=fixed.device)
        offsets = torch.stack(torch.meshgrid(window, window, window, indexing="ij")).reshape(3, -1)  # (3, K)
        cost = torch.empty(fixed.shape[0], offsets.shape[1], *level, dtype=fixed.dtype, device=fixed.device)
        for k, (i, j, l) in enumerate((offsets + radius).T.tolist()):
            shifted = m[:, :, i : i + level[0], j : j + level[1], l : l + level[2]]
            cost[:, k] = (f - shifted).square().sum(1)
        batch = cost.shape[0]
        cost = _box(_box(cost.reshape(-1, 1, *level))).reshape(batch, -1, *level)
        offsets = offsets.to(fixed.dtype)

        def best(weight: float, target: torch.Tensor | None) -> torch.Tensor:
            # running minimum over chunks of displacements: no (K, *level) penalty volume at once
            value = index = None
            for start in range(0, offsets.shape[1], chunk):
                part = cost[:, start : start + chunk]
                if target is not None:
                    d = offsets[:, start : start + chunk]
                    part = part + weight * (d.T[None, :, :, None, None, None] - target[:, None]).square().sum(2)
                low, arg = part.min(1)
                if value is None:
                    value, index = low, arg + start
                else:
                    better = low < value
                    value, index = torch.where(better, low, value), torch.where(better, arg + start, index)
            return _box(offsets[:, index].permute(1, 0, 2, 3, 4))

        field = best(0.0, None)
        for weight in coupling:
            field = best(float(weight), field)
        scale = torch.tensor([(n - 1) / max(c - 1, 1) for n, c in zip(shape, level)], dtype=fixed.dtype,
                             device=fixed.device).view(1, 3, 1, 1, 1)
        return F.interpolate(field, size=shape, mode="trilinear", align_corners=True) * scale
