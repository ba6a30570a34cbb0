"""Figures of a registration pair: orthogonal slices of fixed, moving and warped images with mask outlines.

Built on :class:`matplotlib.figure.Figure` without ``pyplot`` (no global backend state, no display needed; PNG is
written by the Agg renderer). Images are spatial arrays ``(X, Y, Z)`` (numpy arrays or tensors) in the package's
array order; the displacement is ``(3, X, Y, Z)`` in voxels (package conventions). Slice ``a`` of a column cuts
axis ``a``; it is drawn with the larger remaining axis index vertical (for the lung data: z up), pixels shaped by
the voxel spacing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .metrics import JACOBIAN_BORDER, jacobian_determinant

__all__ = ["plot_pair", "save_pair_png"]

FIELDS = ("magnitude", "jacobian")
_AXIS_NAMES = ("x", "y", "z")


def _as_array(name: str, value, ndim: int) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}.")
    return array


def _field_map(ddf: np.ndarray, spacing: Sequence[float] | None, field: str) -> tuple[np.ndarray, str]:
    if field == "magnitude":
        scale = np.ones(3) if spacing is None else np.asarray(spacing, dtype=float)
        unit = "voxels" if spacing is None else "mm"
        return np.linalg.norm(ddf * scale[:, None, None, None], axis=0), f"|u| ({unit})"
    det = jacobian_determinant(torch.as_tensor(ddf, dtype=torch.float64)[None])[0].numpy()
    return np.pad(det, JACOBIAN_BORDER, mode="edge"), "det(I + grad u)"


def plot_pair(
    fixed,
    moving,
    warped=None,
    fixed_mask=None,
    moving_mask=None,
    ddf=None,
    spacing: Sequence[float] | None = None,
    field: str = "magnitude",
    slices: Sequence[int] | None = None,
    window: Sequence[float] | None = None,
    title: str | None = None,
) -> Figure:
    """Figure with one row per image (fixed, moving, optional warped, optional field) and one column per axis.

    Args:
        fixed, moving: images ``(X, Y, Z)``.
        warped: optional moving image warped to the fixed grid ``(X, Y, Z)``.
        fixed_mask, moving_mask: optional label maps ``(X, Y, Z)``; their outline (level 0.5) is drawn in red
            (fixed: on every image row, the reference) and cyan (moving: on the moving row).
        ddf: optional displacement ``(3, X, Y, Z)`` in voxels; adds a row with ``field``.
        spacing: voxel size per axis (mm); sets the pixel aspect ratio and the unit of the magnitude.
        field: ``"magnitude"`` (``|u|``, mm when ``spacing`` is given) or ``"jacobian"`` (``det(I + grad u)``
            of :func:`elastic_hypermorph_bundle.metrics.jacobian_determinant`, border values repeated).
        slices: voxel index of the cut along each axis; default the centre.
        window: display range ``(low, high)`` of the images; default the 1st-99th percentile of ``fixed``.
        title: figure title.
    """
    if field not in FIELDS:
        raise ValueError(f"field must be one of {FIELDS}, got {field!r}.")
    rows = [("fixed", _as_array("fixed", fixed, 3))]
    shape = rows[0][1].shape
    rows.append(("moving", _as_array("moving", moving, 3)))
    if warped is not None:
        rows.append(("warped", _as_array("warped", warped, 3)))
    masks = {"fixed": fixed_mask, "moving": moving_mask}
    masks = {name: None if mask is None else _as_array(f"{name}_mask", mask, 3) for name, mask in masks.items()}
    field_map = None
    if ddf is not None:
        ddf = _as_array("ddf", ddf, 4)
        if ddf.shape != (3, *shape):
            raise ValueError(f"ddf must have shape (3, *{shape}) to match the images, got {ddf.shape}.")
        field_map, field_label = _field_map(ddf, spacing, field)
    for name, array in [*rows, *((k, v) for k, v in masks.items() if v is not None)]:
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, but fixed has {shape}; all inputs share one grid.")
    slices = [n // 2 for n in shape] if slices is None else [int(s) for s in slices]
    if len(slices) != 3 or any(not 0 <= s < n for s, n in zip(slices, shape)):
        raise ValueError(f"slices must be 3 voxel indices inside {shape}, got {slices}.")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    low, high = np.percentile(rows[0][1], (1, 99)) if window is None else window

    num_rows = len(rows) + (field_map is not None)
    figure = Figure(figsize=(9, 3 * num_rows + (0.4 if title else 0)), layout="constrained")
    axes = figure.subplots(num_rows, 3, squeeze=False)

    def cut(array: np.ndarray, axis: int) -> np.ndarray:
        return np.take(array, slices[axis], axis=axis).T  # remaining axes (b, c): c vertical

    for col in range(3):
        b, c = (a for a in range(3) if a != col)
        aspect = spacing[c] / spacing[b]
        for row, (name, array) in enumerate(rows):
            ax = axes[row, col]
            ax.imshow(cut(array, col), cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect)
            for mask_name, color in (("fixed", "red"), ("moving", "cyan")):
                if masks[mask_name] is not None and (mask_name == "fixed" or name == "moving"):
                    mask_cut = cut(masks[mask_name], col).astype(float)
                    if mask_cut.min() < 0.5 < mask_cut.max():
                        ax.contour(mask_cut, levels=[0.5], colors=color, linewidths=0.8, origin="lower")
            ax.set_title(f"{name}, {_AXIS_NAMES[col]} = {slices[col]}", fontsize=9)
        if field_map is not None:
            ax = axes[-1, col]
            if field == "magnitude":
                kwargs = {"cmap": "magma"}
            else:  # diverging around 1 (volume preserving); J <= 0 (folding) saturates blue
                kwargs = {"cmap": "RdBu_r", "norm": TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=2.0)}
            shown = ax.imshow(cut(field_map, col), origin="lower", aspect=aspect, **kwargs)
            ax.set_title(f"{field_label}, {_AXIS_NAMES[col]} = {slices[col]}", fontsize=9)
            if col == 2:
                figure.colorbar(shown, ax=axes[-1, :], shrink=0.8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title)
    return figure


def save_pair_png(path: str | os.PathLike, *args, dpi: int = 100, **kwargs) -> Path:
    """Render :func:`plot_pair` (same arguments) to a PNG file (parent folders created); return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_pair(*args, **kwargs).savefig(path, dpi=dpi, format="png", metadata={"Software": None})
    return path
