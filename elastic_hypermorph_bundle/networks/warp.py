"""Warping with MONAI :class:`~monai.networks.blocks.Warp`, following the package's backward-warp convention
``warped(x) = moving(x + u(x))`` with ``u`` a DDF ``(B, D, *spatial)`` in voxels.

The reference grid of a warp (``(B, D, *spatial)`` voxel coordinates, about 92 MB in float32 at 192x192x208) is
built once per shape, device and dtype and kept by one shared warp module per (mode, padding), so repeated warps
of one shape (training steps, sweeps, evaluation) reuse it, as VoxelMorph's modules keep their grid. (MONAI's
``Warp`` means to cache it too, but compares the grid's ``(D, *spatial)`` with the field's ``*spatial`` and so
rebuilds it on every call.)

On a CPU, torch's 3D ``grid_sample`` shares its work among threads by batch entry only, so a warp of one image
(the optimisation of a pair, training with batch 1) ran on one core whatever the thread count; the shared module
hands the output points of such a warp to the threads as that many batch entries of one image, with MONAI's
arithmetic, so the values are the same (0.61x of the time of a full-size optimisation step's warp and its backward
pass on 2 cores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp
from monai.networks.blocks import warp as monai_warp

__all__ = ["warp_image", "warp_label", "warp_cuts", "sample_points", "cached_warp"]


def _sampling_grid(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample``'s grid of voxel coordinates ``points`` ``(B, D, *out)`` in an image of spatial ``shape``:
    MONAI ``Warp``'s arithmetic, ``p * 2 / (n - 1) - 1`` per axis (corner-aligned), axes last and reversed,
    ``(B, *out, D)``; the one home of that arithmetic for the warps of this module that bypass ``Warp``."""
    size = torch.tensor([max(n - 1, 1) for n in shape], dtype=points.dtype, device=points.device)
    size = size.view(1, len(shape), *([1] * (points.ndim - 2)))
    return (points * 2 / size - 1).movedim(1, -1).flip(-1)


class _GridCachingWarp(Warp):
    """MONAI ``Warp`` that keeps its reference grid while the field's batch size, shape, device and dtype stay."""

    def get_reference_grid(self, ddf: torch.Tensor, jitter: bool = False, seed: int = 0) -> torch.Tensor:
        if jitter:
            return super().get_reference_grid(ddf, jitter, seed)
        key = (ddf.shape[0], tuple(ddf.shape[2:]), ddf.device, ddf.dtype)
        if getattr(self, "_grid_key", None) != key:
            self.ref_grid = None
            self._grid = super().get_reference_grid(ddf)
            self._grid_key = key
        return self._grid

    def _parts(self, image: torch.Tensor, ddf: torch.Tensor) -> int:
        """How many batch entries a 3D warp of one CPU image is cut into (1: MONAI's own path)."""
        if (image.device.type != "cpu" or image.ndim != 5 or image.shape[0] != 1 or self.jitter
                or monai_warp.USE_COMPILED or tuple(ddf.shape) != (1, 3, *image.shape[2:])):
            return 1
        return _thread_parts(math.prod(image.shape[2:]))

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        parts = self._parts(image, ddf)
        if parts == 1:
            return super().forward(image, ddf)
        grid = _sampling_grid(self.get_reference_grid(ddf) + ddf, image.shape[2:])
        return _split_grid_sample(image, grid, parts, self._interp_mode_native, self._padding_mode_native)


def _thread_parts(points: int) -> int:
    """The most batch entries, at most one per thread, that ``points`` output points divide into evenly."""
    return max(k for k in range(1, torch.get_num_threads() + 1) if points % k == 0)


def _split_grid_sample(image: torch.Tensor, grid: torch.Tensor, parts: int, mode, padding_mode) -> torch.Tensor:
    """``grid_sample`` of one 3D image ``(1, C, X, Y, Z)`` at ``grid`` ``(1, *out, 3)``, its points cut into
    ``parts`` batch entries of the same image, one per thread; ``(1, C, *out)``, the values of one call."""
    out = grid.shape[1:-1]
    sampled = F.grid_sample(image.expand(parts, *image.shape[1:]), grid.reshape(parts, -1, 1, 1, 3), mode=mode,
                            padding_mode=padding_mode, align_corners=True)
    return sampled.transpose(0, 1).reshape(1, image.shape[1], *out)


@lru_cache(maxsize=4)
def cached_warp(mode: str, padding_mode: str) -> Warp:
    """The shared warp module of one interpolation ``mode`` and ``padding_mode``."""
    return _GridCachingWarp(mode=mode, padding_mode=padding_mode)


def warp_image(moving: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Warp an image ``(B, C, *spatial)`` with (bi/tri)linear interpolation; differentiable w.r.t. both inputs.
    ``padding_mode="border"`` repeats edge intensities for points that map outside the moving image."""
    return cached_warp("bilinear", padding_mode)(moving, ddf)


def warp_label(label: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Warp a label map ``(B, C, *spatial)`` (integer or float label values) with nearest-neighbour interpolation,
    so no new label values appear; points that map outside the moving image get label 0. Keeps ``label.dtype``."""
    warped = cached_warp("nearest", "zeros")(label.to(ddf.dtype), ddf)
    return warped.to(label.dtype)


def sample_points(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The trilinear values of a 3D ``image`` ``(B, C, X, Y, Z)`` at voxel coordinates ``points`` ``(B, 3, *out)``
    (any ``out`` shape), edge values repeated, ``(B, C, *out)``: :func:`warp_image`'s values and gradients where
    ``points`` = the identity + the DDF, for a subset of the grid's points (the optimisation's strided similarity).
    One CPU image's points are shared among the threads as :func:`warp_image`'s are.

    Raises:
        ValueError: not a 3D image, or ``points`` not ``(B, 3, ...)``.
    """
    if image.ndim != 5 or points.ndim < 3 or points.shape[:2] != (image.shape[0], 3):
        raise ValueError(f"need a 3D image (B, C, X, Y, Z) and points (B, 3, ...), got {tuple(image.shape)} and "
                         f"{tuple(points.shape)}.")
    grid = _sampling_grid(points, image.shape[2:])
    if points.ndim != 5:
        grid = grid.reshape(grid.shape[0], -1, 1, 1, 3)
    parts = 1 if image.device.type != "cpu" or image.shape[0] != 1 else _thread_parts(math.prod(points.shape[2:]))
    if parts > 1:
        sampled = _split_grid_sample(image, grid, parts, "bilinear", "border")
    else:
        sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return sampled.reshape(*sampled.shape[:2], *points.shape[2:])


def warp_cuts(image: torch.Tensor, ddf: torch.Tensor, slices: Sequence[int]) -> list[torch.Tensor]:
    """:func:`warp_image` of a 3D ``image`` ``(B, C, X, Y, Z)`` by ``ddf`` ``(B, 3, X, Y, Z)`` at three planes only:
    ``x = slices[0]``, ``y = slices[1]``, ``z = slices[2]``, returned as ``(B, C, Y, Z)``, ``(B, C, X, Z)`` and
    ``(B, C, X, Y)``; each value is the one the whole warp gives there, with its arithmetic (the point
    ``(p + u(p)) * 2 / (n - 1) - 1`` per axis, trilinear, edge values repeated), at about ``(XY + XZ + YZ) / XYZ`` of
    its cost (a preview's three cuts of a full-size pair: 1.5 %).

    Raises:
        ValueError: ``ddf`` not ``(B, 3, *image spatial)``, or a slice outside its axis.
    """
    shape = tuple(image.shape[2:])
    if image.ndim != 5 or tuple(ddf.shape) != (image.shape[0], 3, *shape):
        raise ValueError(f"need a 3D image (B, C, X, Y, Z) and its ddf (B, 3, X, Y, Z), got {tuple(image.shape)} and "
                         f"{tuple(ddf.shape)}.")
    if len(slices) != 3 or any(not 0 <= int(s) < n for s, n in zip(slices, shape)):
        raise ValueError(f"slices must be 3 voxel indices inside {shape}, got {list(slices)}.")
    cuts = []
    for axis, index in enumerate(int(s) for s in slices):
        axes = [torch.arange(n, dtype=ddf.dtype, device=ddf.device) for n in shape]
        axes[axis] = axes[axis][index:index + 1]
        reference = torch.stack(torch.meshgrid(*axes, indexing="ij")).squeeze(axis + 1)  # (3, b, c)
        cuts.append(sample_points(image, reference + ddf.select(axis + 2, index)))
    return cuts
