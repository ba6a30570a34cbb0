"""Figures of a registration pair: orthogonal slices through the lungs of fixed, moving and warped images with
mask outlines and a legend, a checkerboard of fixed and warped, and the field's magnitude and Jacobian
determinant inside the body.

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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .metrics import JACOBIAN_BORDER, jacobian_determinant
from .networks.warp import warp_cuts

__all__ = ["plot_pair", "save_pair_png", "body_mask", "organ_slices", "checkerboard"]

FIELDS = ("magnitude", "jacobian")
_AXIS_NAMES = ("x", "y", "z")
_MASK_COLOURS = {"fixed": "red", "moving": "cyan"}


def _as_array(name: str, value, ndim: int) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}.")
    return array


def _cut(array: np.ndarray, axis: int, index: int | slice) -> np.ndarray:
    """``array`` at ``index`` along ``axis``, a view: ``np.take`` copies a whole array that is not C-ordered (a
    loaded volume often is Fortran-ordered) for each cut, 1 s of a full-size preview's 2."""
    return array[(slice(None),) * axis + (index,)]


def _field_cut(ddf: np.ndarray, spacing: Sequence[float] | None, field: str, axis: int, index: int) -> np.ndarray:
    """The field map in the cut ``index`` along ``axis`` only (a full-volume map costs seconds at full size):
    ``|u|`` there, or ``det J`` of a slab of 5 cuts around it (the central-difference stencil with the Jacobian
    metrics' border; the cut's own border values repeated). Returns ``(b, c)``, the two remaining axes."""
    if field == "magnitude":
        scale = np.ones(3) if spacing is None else np.asarray(spacing, dtype=float)
        return np.linalg.norm(_cut(ddf, axis + 1, index) * scale[:, None, None], axis=0)
    width = 2 * JACOBIAN_BORDER + 1
    start = min(max(index - JACOBIAN_BORDER, 0), ddf.shape[axis + 1] - width)
    slab = _cut(ddf, axis + 1, slice(start, start + width))
    det = jacobian_determinant(torch.as_tensor(slab, dtype=torch.float64)[None])[0].numpy()
    return np.pad(_cut(det, axis, 0), JACOBIAN_BORDER, mode="edge")


def _field_label(field: str, spacing) -> str:
    return f"|u| ({'voxels' if spacing is None else 'mm'})" if field == "magnitude" else "det J = det(I + grad u)"


def body_mask(image: np.ndarray, threshold: float, mask: np.ndarray | None = None) -> np.ndarray:
    """The body: voxels of ``image`` above ``threshold`` (soft tissue, not air) joined with ``mask`` (e.g. the lung
    mask) when given, holes filled in every axial (last-axis) slice, or in the image itself if it is one 2D cut,
    so that the lungs and airways inside count."""
    from scipy.ndimage import binary_fill_holes

    inside = image > threshold
    if mask is not None:  # before filling: lungs that reach a cropped field of view would open the body's outline
        inside |= mask > 0.5
    if inside.ndim == 2:  # one cut
        return binary_fill_holes(inside)
    for z in range(inside.shape[2]):
        inside[:, :, z] = binary_fill_holes(inside[:, :, z])
    return inside


def organ_slices(mask: np.ndarray | None, shape: Sequence[int]) -> list[int]:
    """Slices that cut the organ of ``mask`` (e.g. both lungs): its centre of mass along axes 1 and 2, and along
    axis 0 (sagittal cut) the centre of the larger half of the mask on either side of its middle, so the cut goes
    through one lung instead of the mediastinum between them. The volume's centre without a mask."""
    inside = None if mask is None else mask > 0.5
    if inside is None or not inside.any():
        return [n // 2 for n in shape]
    # from the mask's voxel counts per index of each axis (its projections): no list of a whole lung's voxels
    counts = [inside.sum(axis=tuple(b for b in range(3) if b != a), dtype=np.int64) for a in range(3)]
    slices = [int(round(float(np.arange(len(c)) @ c) / c.sum())) for c in counts]
    occupied = np.flatnonzero(counts[0])
    middle = (occupied[0] + occupied[-1]) / 2
    index = np.arange(len(counts[0]))
    halves = [np.where(index < middle, counts[0], 0), np.where(index >= middle, counts[0], 0)]
    larger = max(halves, key=lambda half: half.sum())
    slices[0] = int(round(float(index @ larger) / larger.sum()))
    return slices


def checkerboard(first: np.ndarray, second: np.ndarray, tiles: int = 8) -> np.ndarray:
    """``first`` and ``second`` in alternating cubes, ``tiles`` per axis (a misalignment shows as broken edges)."""
    index = np.indices(first.shape)
    sizes = np.maximum(np.asarray(first.shape) // tiles, 1)
    odd = sum(index[a] // sizes[a] for a in range(first.ndim)) % 2 == 1
    return np.where(odd, second, first)


def plot_pair(
    fixed,
    moving,
    warped=None,
    fixed_mask=None,
    moving_mask=None,
    ddf=None,
    spacing: Sequence[float] | None = None,
    fields: Sequence[str] = FIELDS,
    slices: Sequence[int] | None = None,
    window: Sequence[float] | None = None,
    title: str | None = None,
    body: bool | np.ndarray = True,
) -> Figure:
    """Figure with one column per axis and rows: fixed, moving, [warped, checkerboard of fixed and warped], [one row
    per field of ``ddf``].

    Args:
        fixed, moving: images ``(X, Y, Z)``.
        warped: optional moving image warped to the fixed grid ``(X, Y, Z)``, or ``True``: ``moving`` warped by
            ``ddf`` at the shown cuts only (:func:`~elastic_hypermorph_bundle.networks.warp.warp_cuts`: the values
            of the whole warp there, linear, edge values repeated, at 1.5 % of its cost for a full-size pair); adds it
            and a checkerboard of fixed and warped (:func:`checkerboard`).
        fixed_mask, moving_mask: optional label maps ``(X, Y, Z)``; their outline (level 0.5) is drawn in red
            (fixed: on every image row, the reference) and cyan (moving: on the moving row), named in a legend.
        ddf: optional displacement ``(3, X, Y, Z)`` in voxels; adds a row per entry of ``fields``.
        spacing: voxel size per axis (mm); sets the pixel aspect ratio and the unit of the magnitude.
        fields: of :data:`FIELDS`: ``"magnitude"`` (``|u|``, mm when ``spacing`` is given) and ``"jacobian"``
            (``det(I + grad u)`` of :func:`elastic_hypermorph_bundle.metrics.jacobian_determinant`, border values
            repeated; diverging around 1, folding (<= 0) saturates blue).
        slices: voxel index of the cut along each axis; default :func:`organ_slices` of ``fixed_mask`` (the lungs).
        window: display range ``(low, high)`` of the images; default the 1st-99th percentile of ``fixed``.
        title: figure title.
        body: where the field rows are drawn: True (default) the body of the fixed image (:func:`body_mask` at a
            third of the display window, e.g. -500 HU for [-1000, 500]; the air around it, where a field means
            nothing, is left blank), False everywhere, or a boolean array ``(X, Y, Z)``.
    """
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ValueError(f"field must be one of {FIELDS}, got {unknown[0]!r}.")
    rows = [("fixed", _as_array("fixed", fixed, 3))]
    shape = rows[0][1].shape
    rows.append(("moving", _as_array("moving", moving, 3)))
    if warped is True and ddf is None:
        raise ValueError("warped=True warps the moving image by ddf at the shown cuts: give ddf.")
    if warped is not None and warped is not True:
        rows.append(("warped", _as_array("warped", warped, 3)))
    masks = {"fixed": fixed_mask, "moving": moving_mask}
    masks = {name: None if mask is None else _as_array(f"{name}_mask", mask, 3) for name, mask in masks.items()}
    if ddf is not None:
        ddf = _as_array("ddf", ddf, 4)
        if ddf.shape != (3, *shape):
            raise ValueError(f"ddf must have shape (3, *{shape}) to match the images, got {ddf.shape}.")
    for name, array in [*rows, *((k, v) for k, v in masks.items() if v is not None)]:
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, but fixed has {shape}; all inputs share one grid.")
    slices = organ_slices(masks["fixed"], shape) if slices is None else [int(s) for s in slices]
    if len(slices) != 3 or any(not 0 <= s < n for s, n in zip(slices, shape)):
        raise ValueError(f"slices must be 3 voxel indices inside {shape}, got {slices}.")
    spacing_given = spacing is not None
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    low, high = np.percentile(rows[0][1], (1, 99)) if window is None else window
    # every row as its three cuts (b, c): only the shown slices are computed
    cuts = [(name, [_cut(array, a, slices[a]) for a in range(3)]) for name, array in rows]
    if warped is True:
        image, field = (torch.as_tensor(v).float()[None] for v in (rows[1][1][None], ddf))
        cuts.insert(2, ("warped", [c[0, 0].numpy() for c in warp_cuts(image, field, slices)]))
    if warped is not None:
        cuts.append(("checkerboard fixed | warped", [checkerboard(f, w) for f, w in zip(cuts[0][1], cuts[2][1])]))
    field_maps = []
    for field in fields if ddf is not None else ():
        values = [_field_cut(ddf, spacing if spacing_given else None, field, a, slices[a]) for a in range(3)]
        if body is not False:
            for a in range(3):
                if body is True:
                    mask_cut = None if masks["fixed"] is None else _cut(masks["fixed"], a, slices[a])
                    inside = body_mask(cuts[0][1][a], low + (high - low) / 3, mask_cut)
                else:
                    inside = _cut(np.asarray(body, bool), a, slices[a])
                values[a] = np.where(inside, values[a], np.nan)
        field_maps.append((field, values, _field_label(field, spacing if spacing_given else None)))
    rows = cuts

    num_rows = len(rows) + len(field_maps)
    handles = [Line2D([], [], color=color, linewidth=1.5, label=f"{name} mask")
               for name, color in _MASK_COLOURS.items() if masks[name] is not None]
    if field_maps and body is not False:
        handles.append(Patch(facecolor="white", edgecolor="grey", label="field rows: outside the body left blank"))
    # fixed margins in inches (title, legend, a cut's title) instead of a layout engine: matplotlib's constrained
    # layout measured every axis' extent and took half of a full-size preview's 1.4 s
    top, bottom = (0.45 if title else 0.0) + 0.3, 0.35 if handles else 0.1
    height = 2.6 * num_rows + top + bottom
    figure = Figure(figsize=(9, height))
    axes = figure.subplots(num_rows, 3, squeeze=False, gridspec_kw={
        "left": 0.02, "right": 0.98, "top": 1 - top / height, "bottom": bottom / height, "wspace": 0.05,
        "hspace": 0.3 / 2.3})

    def cut(array: np.ndarray, axis: int) -> np.ndarray:
        return _cut(array, axis, slices[axis]).T  # remaining axes (b, c): c vertical

    for col in range(3):
        b, c = (a for a in range(3) if a != col)
        aspect = spacing[c] / spacing[b]
        for row, (name, row_cuts) in enumerate(rows):
            ax = axes[row, col]
            ax.imshow(row_cuts[col].T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect)
            for mask_name, color in _MASK_COLOURS.items():
                if masks[mask_name] is not None and (mask_name == "fixed" or name == "moving"):
                    mask_cut = cut(masks[mask_name], col).astype(float)
                    if mask_cut.min() < 0.5 < mask_cut.max():
                        ax.contour(mask_cut, levels=[0.5], colors=color, linewidths=0.8, origin="lower")
            ax.set_title(f"{name}, {_AXIS_NAMES[col]} = {slices[col]}", fontsize=9)
        for offset, (field, values, label) in enumerate(field_maps):
            ax = axes[len(rows) + offset, col]
            if field == "magnitude":
                top = max(float(np.nanpercentile(np.concatenate([v.ravel() for v in values]), 99.5)), 1e-6)
                kwargs = {"cmap": "magma", "vmin": 0.0, "vmax": top}
            else:  # diverging around 1 (volume preserving); J <= 0 (folding) saturates blue
                kwargs = {"cmap": "RdBu_r", "norm": TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=2.0)}
            ax.set_facecolor("white")
            shown = ax.imshow(values[col].T, origin="lower", aspect=aspect, **kwargs)
            ax.set_title(f"{label.split(' = ')[0]}, {_AXIS_NAMES[col]} = {slices[col]}", fontsize=9)
            if col == 2:
                figure.colorbar(shown, ax=axes[len(rows) + offset, :], shrink=0.8).set_label(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if handles:
        figure.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title)
    return figure


def save_pair_png(path: str | os.PathLike, *args, dpi: int = 100, **kwargs) -> Path:
    """Render :func:`plot_pair` (same arguments) to a PNG file (parent folders created); return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1 (Pillow's default is 6): a full-size pair's figure encodes in 0.6 instead of 0.84 s, 12 % larger
    plot_pair(*args, **kwargs).savefig(path, dpi=dpi, format="png", metadata={"Software": None},
                                       pil_kwargs={"compress_level": 1})
    return path
