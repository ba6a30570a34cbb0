"""A baseline / follow-up pair of one patient on a real chest CT: breath-hold motion, a new position on the couch,
another scanner field of view and voxel grid (``preset="followup"`` of :func:`.generator.simulate_pair`).

:func:`simulate_followup_pair`:

1. The breath-hold pair of :func:`.real_ct.simulate_real_ct_pair` with the realistic preset's options (mass
   conservation, sliding, per-phase noise/blur/intensity shift, 20-30 mm diaphragm motion, lung volume +12-22 %):
   the real CT is the FIXED (baseline) image on the grid ``spatial_size`` x ``spacing`` (affine ``A_f`` =
   ``diag(spacing)``), ``u_b`` its backward breathing field (fixed voxels).
2. The patient lies elsewhere at the follow-up: a rigid map of the scanner's world (mm)
   ``T(p) = R (p - c) + c + t`` with ``c`` the fixed grid's centre, ``|t|`` drawn from ``offset_range`` (mm) in a
   mostly cranio-caudal direction and ``R`` a rotation about a random axis by an angle drawn from
   ``rotation_range`` (degrees).
3. The follow-up scan has its own grid (affine ``A_m``): each voxel size the fixed one times a factor drawn from
   ``spacing_factor_range``, each extent of the field of view the fixed one times a factor drawn from
   ``field_of_view_range``, centred on the moved anatomy ``T(c)`` up to a shift drawn from ``centre_shift_mm``
   per axis, axes 0 and 1 stored reversed when ``reverse_xy`` (an LPS export of an RAS baseline). The MOVING image
   is the breath-hold inhale image seen through ``T``: ``moving(k) = I_b(A_f^-1 T^-1 A_m k)`` (trilinear; air,
   -1000 HU, outside the baseline scan), masks and labels likewise (nearest).
4. Ground truth, Learn2Reg convention on the fixed grid (the bundle resamples the moving image into the fixed
   grid through both affines): the fixed voxel ``x`` corresponds to the follow-up's physical point
   ``T(A_f (x + u_b(x)))``, written in voxels of the fixed grid: ``u(x) = A_f^-1 T A_f (x + u_b(x)) - x``. Moving
   keypoints are in the follow-up's own voxels, ``A_m^-1 T A_f m_b``, kept where they lie inside its grid.

The appearance changes are those of the breath-hold pair, applied on the baseline grid before the follow-up's
resampling (which smooths the noise slightly, as a scanner's reconstruction kernel would).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .real_ct import HU_AIR, simulate_real_ct_pair

__all__ = ["FOLLOWUP_OPTIONS", "followup_geometry", "simulate_followup_pair", "on_fixed_grid"]

FOLLOWUP_OPTIONS = {
    "offset_range": (20.0, 50.0),
    "rotation_range": (0.0, 10.0),
    "spacing_factor_range": (0.8, 1.25),
    "field_of_view_range": (0.85, 1.05),
    "centre_shift_mm": 15.0,
    "reverse_xy": True,
}
"""Defaults of the follow-up's draws (module docstring): rigid offset (mm), rotation (degrees), voxel size and
field-of-view factors per axis, the field of view's shift from the moved anatomy (mm, per axis), LPS storage."""


def followup_geometry(spatial_size: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
                      **options) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], dict]:
    """Draw the patient's rigid motion ``T`` (4x4, world mm) and the follow-up grid (affine ``A_m``, shape).

    Returns ``(T, A_m, shape, record)``; ``record`` lists the draws for the case's ``simulation`` entry.
    ``options`` override :data:`FOLLOWUP_OPTIONS`.
    """
    unknown = set(options) - set(FOLLOWUP_OPTIONS)
    if unknown:
        raise ValueError(f"unknown follow-up options {sorted(unknown)}; known: {sorted(FOLLOWUP_OPTIONS)}.")
    o = {**FOLLOWUP_OPTIONS, **options}
    spacing = np.asarray(spacing, dtype=float)
    size = np.asarray(spatial_size, dtype=float)
    centre = (size - 1) * spacing / 2
    direction = np.array([rng.normal(0, 0.4), rng.normal(0, 0.4), rng.choice([-1.0, 1.0])])
    translation = direction / np.linalg.norm(direction) * rng.uniform(*o["offset_range"])
    angle = rng.uniform(*o["rotation_range"])
    axis = rng.normal(size=3)
    rotation = Rotation.from_rotvec(np.deg2rad(angle) * axis / np.linalg.norm(axis)).as_matrix()
    motion = np.eye(4)
    motion[:3, :3], motion[:3, 3] = rotation, centre + translation - rotation @ centre
    voxel = spacing * rng.uniform(*o["spacing_factor_range"], size=3)
    extent = size * spacing * rng.uniform(*o["field_of_view_range"], size=3)
    shape = tuple(int(n) for n in np.maximum(np.rint(extent / voxel), 8))
    grid_centre = rotation @ centre + motion[:3, 3] + rng.uniform(-o["centre_shift_mm"], o["centre_shift_mm"], 3)
    signs = np.array([-1.0, -1.0, 1.0]) if o["reverse_xy"] else np.ones(3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * voxel)
    affine[:3, 3] = grid_centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    record = {
        "followup_offset_mm": [float(v) for v in translation],
        "followup_rotation_deg": float(angle),
        "followup_spacing": [float(v) for v in voxel],
        "followup_shape": list(shape),
        "followup_reverse_xy": bool(o["reverse_xy"]),
    }
    return motion, affine, shape, record


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def simulate_followup_pair(path: str | os.PathLike, spatial_size: Sequence[int], spacing: Sequence[float], seed: int,
                           options: dict, poisson_range: Sequence[float], mu_range: Sequence[float],
                           padding_fraction: float, **followup):
    """One baseline / follow-up pair on the real CT at ``path`` (module docstring); ``options`` are the checked
    realism options of :func:`.generator.simulate_pair`, ``followup`` overrides :data:`FOLLOWUP_OPTIONS`. Returns a
    :class:`.case.SimulatedPair` whose ``moving_affine`` is the follow-up's grid."""
    base = simulate_real_ct_pair(path, spatial_size, spacing, seed, options, poisson_range, mu_range, padding_fraction)
    motion, moving_affine, shape, record = followup_geometry(
        spatial_size, spacing, np.random.default_rng([int(seed), 2]), **followup
    )
    fixed_affine = base.affine
    # follow-up voxel k -> baseline (fixed-grid) voxel A_f^-1 T^-1 A_m k
    to_base = np.linalg.solve(fixed_affine, np.linalg.solve(motion, moving_affine))
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    source = np.einsum("ij,j...->i...", to_base[:3, :3].astype(np.float32), grid) + to_base[:3, 3, None, None, None]

    def resample(volume: np.ndarray, order: int, outside: float) -> np.ndarray:
        values = ndimage.map_coordinates(volume.astype(np.float32), source, order=order, mode="constant", cval=outside)
        return values.astype(volume.dtype) if order == 0 else np.rint(values).astype(volume.dtype)

    moving_image = resample(base.moving_image, 1, HU_AIR)
    moving_mask, moving_labels = resample(base.moving_mask, 0, 0), resample(base.moving_labels, 0, 0)

    # ground truth on the fixed grid: u(x) = A_f^-1 T A_f (x + u_b(x)) - x
    fixed_to_fixed = np.linalg.solve(fixed_affine, motion @ fixed_affine)
    voxels = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in spatial_size), indexing="ij"))
    target = voxels + base.displacement
    mapped = np.einsum("ij,j...->i...", fixed_to_fixed[:3, :3].astype(np.float32), target)
    displacement = (mapped + fixed_to_fixed[:3, 3, None, None, None] - voxels).astype(np.float32)

    moving_points = _apply(np.linalg.solve(moving_affine, motion @ fixed_affine), base.moving_keypoints)
    inside = np.all((moving_points >= 0) & (moving_points <= np.subtract(shape, 1)), axis=1)
    return replace(
        base,
        moving_image=moving_image,
        moving_mask=moving_mask,
        moving_labels=moving_labels,
        displacement=displacement,
        fixed_keypoints=base.fixed_keypoints[inside],
        moving_keypoints=moving_points[inside],
        moving_grid_affine=moving_affine,
        simulation={**base.simulation, "preset": "followup", **record},
    )


def on_fixed_grid(pair):
    """The pair as the bundle registers it: a follow-up's moving image, mask and labels resampled into the fixed grid
    through both affines (MONAI ``ResampleToMatch``: trilinear image, air outside the follow-up scan; nearest masks
    and labels) and its keypoints written in fixed-grid voxels (``A_f^-1 A_m k``), so that methods that take arrays
    on one grid (the benchmark's peers) see what :class:`~elastic_hypermorph_bundle.data.transforms.ResampleToFixedd`
    gives the bundle. A pair already on one grid is returned as it is."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    if pair.moving_grid_affine is None:
        return pair
    fixed = MetaTensor(torch.zeros(1, *pair.fixed_image.shape), affine=torch.as_tensor(pair.affine))

    def resample(volume: np.ndarray, mode: str, outside: float) -> np.ndarray:
        moving = MetaTensor(torch.as_tensor(volume.astype(np.float32) - outside)[None],
                            affine=torch.as_tensor(pair.moving_grid_affine))
        values = ResampleToMatch(mode=mode, padding_mode="zeros")(moving, img_dst=fixed)[0].numpy() + outside
        return (np.rint(values) if mode == "bilinear" else values).astype(volume.dtype)

    return replace(
        pair,
        moving_image=resample(pair.moving_image, "bilinear", HU_AIR),
        moving_mask=resample(pair.moving_mask, "nearest", 0.0),
        moving_labels=resample(pair.moving_labels, "nearest", 0.0),
        moving_keypoints=_apply(np.linalg.solve(pair.affine, pair.moving_grid_affine), pair.moving_keypoints),
        moving_grid_affine=None,
    )
