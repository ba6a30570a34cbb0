"""Warping with MONAI :class:`~monai.networks.blocks.Warp`, following the package's backward-warp convention
``warped(x) = moving(x + u(x))`` with ``u`` a DDF ``(B, D, *spatial)`` in voxels.

The reference grid of a warp (``(B, D, *spatial)`` voxel coordinates, about 92 MB in float32 at 192x192x208) is
built once per shape, device and dtype and kept by one shared warp module per (mode, padding), so repeated warps
of one shape (training steps, sweeps, evaluation) reuse it, as VoxelMorph's modules keep their grid. (MONAI's
``Warp`` means to cache it too, but compares the grid's ``(D, *spatial)`` with the field's ``*spatial`` and so
rebuilds it on every call.)
"""

from __future__ import annotations

from functools import lru_cache

import torch
from monai.networks.blocks import Warp

__all__ = ["warp_image", "warp_label", "cached_warp"]


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
