"""Warping with MONAI :class:`~monai.networks.blocks.Warp`, following the package's backward-warp convention
``warped(x) = moving(x + u(x))`` with ``u`` a DDF ``(B, D, *spatial)`` in voxels."""

from __future__ import annotations

import torch
from monai.networks.blocks import Warp

__all__ = ["warp_image", "warp_label"]


def warp_image(moving: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Warp an image ``(B, C, *spatial)`` with (bi/tri)linear interpolation; differentiable w.r.t. both inputs.
    ``padding_mode="border"`` repeats edge intensities for points that map outside the moving image."""
    return Warp(mode="bilinear", padding_mode=padding_mode)(moving, ddf)


def warp_label(label: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Warp a label map ``(B, C, *spatial)`` (integer or float label values) with nearest-neighbour interpolation,
    so no new label values appear; points that map outside the moving image get label 0. Keeps ``label.dtype``."""
    warped = Warp(mode="nearest", padding_mode="zeros")(label.to(ddf.dtype), ddf)
    return warped.to(label.dtype)
