"""How two voxel grids relate in physical space: how far apart they lie (in voxels) and whether they overlap.

A grid is a spatial shape ``(X, Y, Z)`` and a ``4x4`` voxel -> world (mm) affine, as a NIfTI header gives them.
Fixed and moving images may lie on different grids (another session, field of view, spacing or orientation): the
moving image is resampled into the fixed grid before registration (:class:`~.transforms.ResampleToFixedd`), which
needs the two to overlap. A mask must lie on its own image's grid, up to the rounding of two exports of one scan.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["GRID_TOLERANCE_VOXELS", "corners", "grid_offset_voxels", "same_grid", "world_box", "boxes_overlap"]

#: the largest displacement (in voxels) between two grids that still counts as one grid: two exports of one scan
#: differ by rounding (e.g. 0.001 mm in the origin), far below a voxel, while any real resampling moves by more
GRID_TOLERANCE_VOXELS = 0.05


def corners(shape: Sequence[int]) -> np.ndarray:
    """Voxel coordinates ``(8, 3)`` of the centres of a grid's corner voxels (0-based)."""
    return np.array(list(itertools.product(*[(0.0, float(int(s) - 1)) for s in shape[:3]])), dtype=np.float64)


def _apply(affine, points: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


def grid_offset_voxels(shape, affine, reference_affine) -> float:
    """Largest distance, in voxels of the reference grid, between a grid's corner voxels and the reference grid's
    voxels of the same indices: ``max_c |A_ref^-1 A c - c|`` over the corners ``c`` of ``shape``. 0 for one grid;
    an affine map, so the corners bound every voxel."""
    voxels = corners(shape)
    mapped = _apply(np.linalg.solve(np.asarray(reference_affine, np.float64), np.asarray(affine, np.float64)), voxels)
    return float(np.abs(mapped - voxels).max())


def same_grid(shape, affine, reference_shape, reference_affine, tolerance: float = GRID_TOLERANCE_VOXELS) -> bool:
    """Whether two grids have one shape and lie within ``tolerance`` voxels of each other (:func:`grid_offset_voxels`)."""
    return tuple(int(s) for s in shape[:3]) == tuple(int(s) for s in reference_shape[:3]) and (
        grid_offset_voxels(shape, affine, reference_affine) <= tolerance
    )


def world_box(shape, affine) -> np.ndarray:
    """World (mm) bounding box ``(2, 3)`` (min row, max row) of the space a grid's voxels cover (each voxel its
    full extent, half a voxel beyond the corner centres)."""
    voxels = np.array(list(itertools.product(*[(-0.5, int(s) - 0.5) for s in shape[:3]])), dtype=np.float64)
    world = _apply(affine, voxels)
    return np.stack([world.min(0), world.max(0)])


def boxes_overlap(box, other) -> bool:
    """Whether two world boxes (:func:`world_box`) share a volume (touching faces do not count)."""
    return bool(np.all(np.maximum(box[0], other[0]) < np.minimum(box[1], other[1])))
