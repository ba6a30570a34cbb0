"""Spatial transforms of the test-time stages, in the package's conventions (DDF channel ``j`` = displacement along
spatial axis ``j`` in voxels, backward warp): global affine maps and their dense fields, their composition with a
DDF, and the resampling of images and fields between a grid and a coarser level of it (grids aligned at their corner
voxels).

An :class:`Affine` maps physical points ``p = x * spacing`` (mm) as ``q = A (p - c) + c + t`` about the image
centre ``c``; :func:`affine_ddf` turns it into a DDF on any level of its grid, :func:`compose_affine` puts it in
front of a non-rigid field (``x -> affine(x + u(x))``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d

__all__ = [
    "Affine", "affine_ddf", "compose_affine", "level_shape", "resize_image", "resize_field", "field_scale",
    "antialias_sigma", "antialias", "separable_replicate", "box_mean", "all_finite",
]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite. The sum, one pass, is finite exactly when every value is, unless
    it overflowed (then the full test decides): a tenth of the time of ``isfinite(tensor).all()`` on a full-size
    image on the CPU (it is a sync per call on a GPU, as any test is)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class Affine(NamedTuple):
    """A batch of affine maps ``q = matrix (p - c) + c + translation`` of physical points ``p`` (mm) about the image
    centre ``c``: ``matrix`` ``(B, 3, 3)``, ``translation`` ``(B, 3)`` in mm, ``spacing`` the voxel size (mm)."""

    matrix: torch.Tensor
    translation: torch.Tensor
    spacing: tuple[float, ...]

    @staticmethod
    def identity(batch: int, spacing: Sequence[float], device=None) -> Affine:
        eye = torch.eye(3, device=device).expand(batch, 3, 3).clone()
        return Affine(eye, torch.zeros(batch, 3, device=device), tuple(float(s) for s in spacing))

    def voxel_matrix(self) -> torch.Tensor:
        """The linear part in voxel units, ``diag(1/s) A diag(s)``, ``(B, 3, 3)``."""
        s = torch.as_tensor(self.spacing, dtype=self.matrix.dtype, device=self.matrix.device)
        return self.matrix * s[None, None, :] / s[None, :, None]


def level_shape(shape: Sequence[int], factor: float) -> tuple[int, ...]:
    """The grid ``factor`` times coarser than ``shape`` (rounded, at least 4 voxels per axis)."""
    return tuple(max(4, int(round(n / factor))) for n in shape)


def resize_image(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(B, C, *spatial)`` on a grid of ``shape``: area-averaged downsampling (anti-aliased), or trilinear
    resampling (corner-aligned) when a size grows or stays."""
    if tuple(image.shape[2:]) == tuple(shape):
        return image
    if all(m <= n for m, n in zip(shape, image.shape[2:])):
        return F.interpolate(image, size=tuple(shape), mode="area")
    return F.interpolate(image, size=tuple(shape), mode="trilinear", align_corners=True)


def antialias_sigma(spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[float, ...]:
    """The Gaussian pre-filter (standard deviation in voxels of ``spacing``) per axis before resampling to
    ``target_spacing`` (mm): ``sigma_i = max(0, (t_i / s_i - 1) / 2)``, 0 along an axis that is not coarsened. The
    simulator's real-CT resampling uses the same rule (``simulation.real_ct``), so the images the network is trained
    on and the images it is given at inference are filtered alike.

    Raises:
        ValueError: when the two do not hold the same number of positive voxel sizes.
    """
    if len(spacing) != len(target_spacing) or min(spacing) <= 0 or min(target_spacing) <= 0:
        raise ValueError(
            f"spacing {list(spacing)} and target_spacing {list(target_spacing)} must hold as many positive voxel "
            "sizes (mm)."
        )
    return tuple(max(0.0, (float(t) / float(s) - 1.0) / 2.0) for s, t in zip(spacing, target_spacing))


def antialias(image: torch.Tensor, spacing: Sequence[float], target_spacing: Sequence[float]) -> torch.Tensor:
    """``(B, C, *spatial)`` low-pass filtered for resampling from voxels of ``spacing`` to ``target_spacing`` mm:
    separable Gaussian of :func:`antialias_sigma` (truncated at 4 sigma, the edge values repeated beyond the border),
    so that detail finer than the target grid does not alias into it. The input itself when no axis coarsens."""
    sigma = antialias_sigma(spacing, target_spacing)
    if max(sigma) == 0:
        return image
    return separable_replicate(image, [gaussian_1d(s, truncated=4.0) if s > 0 else torch.ones(1) for s in sigma])


def separable_replicate(image: torch.Tensor, kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, C, *spatial)`` filtered by one odd-length 1D kernel per spatial axis in turn (``out[i] = sum_j k[j]
    x[i + j - r]``, ``r = (len(k) - 1) / 2``), edge values repeated beyond the border: MONAI's
    ``separable_filtering(mode="replicate")`` to float rounding, as the weighted window sums of
    :func:`_axis_window_sums` instead of convolutions (a 5-tap Gaussian of a full-size image: a tenth of their time
    on 2 CPU cores)."""
    if len(kernels) != image.ndim - 2 or any(len(k) % 2 == 0 for k in kernels):
        raise ValueError(f"need one odd-length kernel per spatial axis ({image.ndim - 2}), got lengths "
                         f"{[len(k) for k in kernels]}.")
    for axis, kernel in enumerate(kernels):
        weights = [float(w) for w in kernel]
        if weights != [1.0]:
            image = _axis_window_sums(image, axis + 2, weights, "replicate")
    return image


def field_scale(from_shape: Sequence[int], to_shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Per-axis factor ``(to - 1) / (from - 1)`` converting a displacement in voxels of ``from_shape`` into voxels of
    ``to_shape`` (grids aligned at their corner voxels), as a ``(1, 3, 1, 1, 1)`` tensor of ``like``'s dtype."""
    scale = [(t - 1) / (f - 1) for f, t in zip(from_shape, to_shape)]
    return torch.tensor(scale, dtype=like.dtype, device=like.device).reshape(1, 3, 1, 1, 1)


def resize_field(ddf: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A DDF ``(B, 3, *spatial)`` resampled (trilinear, corner-aligned) onto a grid of ``shape``, with its values
    converted to that grid's voxels."""
    if tuple(ddf.shape[2:]) == tuple(shape):
        return ddf
    resized = F.interpolate(ddf, size=tuple(shape), mode="trilinear", align_corners=True)
    return resized * field_scale(ddf.shape[2:], shape, ddf)


def affine_ddf(affine: Affine, shape: Sequence[int], full_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The DDF ``(B, 3, *shape)`` in voxels of ``shape`` of an :class:`Affine` defined on a grid of ``full_shape``
    voxels of size ``affine.spacing`` (``shape`` may be a coarser level of that grid, corner-aligned)."""
    full_shape = tuple(shape) if full_shape is None else tuple(full_shape)
    matrix, translation = affine.matrix, affine.translation
    s = torch.as_tensor(affine.spacing, dtype=matrix.dtype, device=matrix.device)
    # physical coordinates (mm) of the level's voxels, on the full grid's frame
    axes = [
        torch.linspace(0, (n_full - 1) * s_k, n, dtype=matrix.dtype, device=matrix.device)
        for n, n_full, s_k in zip(shape, full_shape, s)
    ]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).flatten(1)  # (3, N)
    centre = (torch.as_tensor(full_shape, dtype=matrix.dtype, device=matrix.device) - 1) / 2 * s
    moved = matrix @ (points - centre[:, None]) + (centre + translation)[:, :, None]  # (B, 3, N)
    ddf_full_voxels = (moved - points) / s[None, :, None]
    ddf = ddf_full_voxels.reshape(matrix.shape[0], 3, *shape)
    return ddf * field_scale(full_shape, shape, ddf)


def compose_affine(affine: Affine | None, ddf: torch.Tensor, affine_field: torch.Tensor | None = None) -> torch.Tensor:
    """The DDF of ``x -> affine(x + ddf(x))`` in voxels: ``u_A(x) + A_vox ddf(x)``, exact for an affine map
    (``None``: ``ddf`` itself). ``affine_field`` is ``affine_ddf(affine, ...)`` on ``ddf``'s grid when already
    computed."""
    if affine is None:
        return ddf
    if affine_field is None:
        affine_field = affine_ddf(affine, ddf.shape[2:])
    linear = torch.einsum("bij,bj...->bi...", affine.voxel_matrix().to(ddf), ddf)
    return affine_field + linear


def _axis_window_sums(image: torch.Tensor, axis: int, weights: Sequence[float], edge: str) -> torch.Tensor:
    """The sums ``sum_o weights[o + r] x[i + o]`` over the window offsets ``o = -r .. r`` (``r = len(weights) // 2``)
    along ``axis`` of ``image`` extended by ``r`` voxels at each end, with its edge values (``edge="replicate"``) or
    zeros (``"zeros"``): a new tensor, the terms added in place in the order of the window (offsets ``0, -r .. r``),
    so no padded copy and no intermediate sums are allocated (each would be a full-size tensor: a step of the
    optimisation filters a 3-channel field 18 times)."""
    n, radius = image.shape[axis], len(weights) // 2
    centre = weights[radius]
    total = image.clone() if centre == 1.0 else image * centre  # offset 0
    for offset in range(-radius, radius + 1):
        weight, inside = weights[offset + radius], n - abs(offset)
        if offset and inside > 0:  # voxels i whose neighbour i + offset lies inside the image
            total.narrow(axis, max(0, -offset), inside).add_(image.narrow(axis, max(0, offset), inside), alpha=weight)
        if edge == "replicate":  # the others take the edge value the clamped index repeats
            if offset < 0:
                total.narrow(axis, 0, min(-offset, n)).add_(image.narrow(axis, 0, 1), alpha=weight)
            elif offset > 0:
                total.narrow(axis, n - min(offset, n), min(offset, n)).add_(image.narrow(axis, n - 1, 1), alpha=weight)
    return total


class _BoxMean(torch.autograd.Function):
    """:func:`box_mean` with its adjoint as the backward pass: autograd through the shifted views of the forward
    pass fills and copies a padded tensor per view (27 per step of the optimisation's 3 filters of a 3D field, 40 %
    of a finest-level step on 2 CPU cores); the adjoint is the same kind of filter on the gradient."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, radius: int) -> torch.Tensor:
        ctx.radius = radius
        width = 2 * radius + 1
        for axis in range(2, image.ndim):
            image = _axis_window_sums(image, axis, [1.0] * width, "replicate")
        return image.div_(width ** (image.ndim - 2))  # the axes' 1 / width at once: one pass over the sums

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # per axis, y_i = sum_k x_clamp(i + k) / w: the adjoint is the zero-padded window sum of the gradient, plus,
        # at each end voxel, what the clamped (repeated) edge took: (r - i) g_i for the i-th voxel from that end
        radius, width = ctx.radius, 2 * ctx.radius + 1
        for axis in reversed(range(2, grad.ndim)):
            n = grad.shape[axis]
            total = _axis_window_sums(grad, axis, [1.0] * width, "zeros")
            first, last = total.narrow(axis, 0, 1), total.narrow(axis, n - 1, 1)
            for i in range(min(radius, n)):
                first += (radius - i) * grad.narrow(axis, i, 1)
                last += (radius - i) * grad.narrow(axis, n - 1 - i, 1)
            grad = total
        return grad.div_(width ** (grad.ndim - 2)), None


def box_mean(image: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """``(B, C, *spatial)`` through a box filter: the mean of each voxel's ``(2 radius + 1)^D`` neighbourhood, edge
    values repeated beyond the border, as one ``(2 radius + 1)``-voxel mean along each spatial axis in turn (the same
    filter as ``avg_pool3d`` of the replicate-padded image to float rounding, with ``3 (2 radius + 1)`` instead of
    ``(2 radius + 1)^3`` terms per voxel: a third of its time for a 3^3 box on 2 CPU cores, forward and backward;
    MONAI's ``separable_filtering`` by convolutions took 10x longer). Differentiable, with the filter's adjoint as
    its backward pass."""
    if radius < 0:
        raise ValueError(f"box_mean needs radius >= 0, got {radius}.")
    return _BoxMean.apply(image, radius)
