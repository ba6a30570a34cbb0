"""Simulated breathing lung CT pairs with a known, physically meaningful displacement (Learn2Reg 2021+ layout).

One case (:func:`simulate_pair`):

1. An analytic thorax phantom ``P`` (:mod:`.phantom`: body, fat, ribs, spine, heart, lungs with vessel trees,
   airways) with per-case random shape. The MOVING image (inhale, ``_0001``) is ``P`` sampled on the grid.
2. A breathing body force ``f`` inside the lungs: a caudal pull strongest at the lung bases (diaphragm) plus an
   outward lateral/anterior push (rib cage). The displacement ``u`` (mm) solves the discrete linear elastic
   equilibrium ``mu * laplace(u) + (lam + mu) * grad(div(u)) + f = 0`` (:mod:`.navier`) with the case's Lamé
   parameters on a periodic grid padded by ``padding_fraction`` of the image on each side; the force, and with it
   ``u``, is scaled so that ``max |u|`` over the inhale lung mask equals a sampled target (mm). The force
   returned is the one actually balanced: the padded force minus its mean (the periodic domain admits no net
   force), cropped to the image.
3. The FIXED image (exhale, ``_0000``) is the phantom at the displaced points: ``fixed(x) = P(x + u(x))``, so
   ``u`` is the ground-truth backward field of the package conventions (``moving(x + u(x)) = fixed(x)``; warping
   the moving image with ``u`` reproduces the fixed one up to interpolation and noise). Masks and labels follow
   the same way. Both images get independent, slightly correlated Gaussian noise and are rounded to int16 HU.
4. Keypoints: the vessel bifurcations ``y`` of the phantom, mapped to the fixed grid by solving ``x + u(x) = y``
   (fixed-point iteration, trilinear ``u``), kept inside the fixed lung mask; moving keypoints are
   ``x + u(x)`` with the same trilinear interpolation, so the ground truth maps them exactly.

Realism options (all off by default, all on with ``preset="realistic"``; :mod:`.realism`): mass conservation
(the inhale lung darker, ``HU + 1000`` scaled by ``1 / det J``), sliding of the lungs along the chest wall, per-phase
noise, blur and intensity shift, breath-hold amplitudes (a pleural pressure that grows the lung volume by 10-25 %,
stronger diaphragm motion), and a fixed scanner field of view (anatomy moves in and out of the slab). With
``real_ct`` a real chest CT is the exhale anatomy instead of the phantom (:mod:`.real_ct`).

Geometry: voxel ``i`` is at ``i * spacing`` mm (affine ``diag(spacing)``, as the Learn2Reg lung data); axis 0
runs right-left, axis 1 posterior-anterior, axis 2 inferior-superior. The default spacing makes the field of view
:data:`.options.LUNG_FIELD_OF_VIEW_MM` (Learn2Reg LungCT: 192 x 192 x 208 voxels of 1.75 x 1.25 x 1.75 mm), e.g.
5.25 x 3.75 x 5.6875 mm at 64^3. Lamé parameters and forces share a unit (kPa and kPa/mm).

:func:`.dataset.make_synthetic_dataset` writes ``LungCT_dataset.json`` (Learn2Reg 2021+ keys), ``imagesTr``,
``masksTr`` (lung, uint8 0/1), ``labelsTr`` (:data:`.phantom.LABELS`), ``keypointsTr`` (0-based voxel xyz CSV)
and ``displacementsTr/LungCT_XXXX.nii.gz``: the ground truth of pair ``XXXX`` in the Learn2Reg submission
convention, voxels of the fixed grid, channel-last ``(X, Y, Z, 3)`` float32 with the fixed image's affine. Each
pair entry carries a ``"simulation"`` record (seed, ``lam``, ``mu``, Poisson ratio, Young's modulus, maximum
displacement, path of the displacement file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy.ndimage import binary_erosion, map_coordinates

from .breathing import breathing_field, breathing_force, mean_divergence
from .case import SimulatedPair, acquire_pair, draw_case
from .followup import simulate_followup_pair
from .options import resolve_settings
from .phantom import lung_sdf, render_phantom, sample_anatomy
from .real_ct import simulate_real_ct_pair
from .realism import conserve_lung_mass, jacobian_determinant, sliding_displacement

__all__ = ["simulate_pair"]


def _invert_points(displacement: np.ndarray, targets: np.ndarray, iterations: int = 50) -> tuple[np.ndarray, ...]:
    """Solve ``x + u(x) = targets`` (voxels, trilinear ``u``) by fixed-point iteration; return ``x``, residual."""

    def sample(points: np.ndarray) -> np.ndarray:
        return np.stack([map_coordinates(c, points.T, order=1, mode="nearest") for c in displacement], axis=1)

    points = targets.copy()
    for _ in range(iterations):
        points = targets - sample(points)
    return points, np.linalg.norm(points + sample(points) - targets, axis=1)


def _grid_points(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    axes = [np.arange(n, dtype=np.float32) * np.float32(h) for n, h in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def simulate_pair(
    spatial_size: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    noise_std: float | None = None,
    poisson_range: Sequence[float] = (0.3, 0.45),
    mu_range: Sequence[float] = (1.5, 8.0),
    max_displacement_range: Sequence[float] | None = None,
    rib_weight_range: Sequence[float] | None = None,
    padding_fraction: float = 0.25,
    preset: str | None = None,
    mass_conservation: bool | None = None,
    sliding: float | None = None,
    noise_std_range: Sequence[float] | None = None,
    blur_range: Sequence[float] | None = None,
    intensity_shift_range: Sequence[float] | None = None,
    volume_change_range: Sequence[float] | None = None,
    fixed_field_of_view: bool | None = None,
    real_ct: str | os.PathLike | None = None,
    pleural_load_range: Sequence[float] | None = None,
) -> SimulatedPair:
    """Simulate one exhale (fixed) / inhale (moving) pair with its ground-truth displacement (module docstring).

    Args:
        spatial_size: grid ``(X, Y, Z)``.
        spacing: voxel size in mm; default: the Learn2Reg lung field of view divided by ``spatial_size``.
        seed: the case's seed (``numpy.random.default_rng(seed)`` draws the anatomy and the material,
            ``numpy.random.default_rng([seed, 1])`` the realism options' random values).
        noise_std: standard deviation of the image noise in HU (0: noise-free; default 20).
        poisson_range, mu_range: uniform ranges of Poisson's ratio ``nu`` and shear modulus ``mu`` (kPa);
            ``lam = 2 mu nu / (1 - 2 nu)``.
        max_displacement_range: uniform range (mm) of the maximum displacement of the diaphragm and rib-cage
            force over the inhale lung mask (default (12, 20)).
        rib_weight_range: uniform range of the rib-cage force relative to the diaphragm force (default (0.3, 0.6)).
        padding_fraction: padding of the periodic solve on each side, as a fraction of the image size.
        preset: ``"realistic"`` sets the realism options below (:data:`PRESETS`); explicit options win.
            ``"followup"`` (needs ``real_ct``): the realistic options, and the moving image is a follow-up scan in
            another position on another grid (:func:`.followup.simulate_followup_pair`).
        mass_conservation: the inhale lung parenchyma is darker, ``HU + 1000`` scaled by ``1 / det J``
            (:func:`.realism.conserve_lung_mass`).
        sliding: fraction (0-1) of the lungs' tangential motion the chest wall does not follow
            (:func:`.realism.sliding_displacement`; 0: no sliding).
        noise_std_range: when given, each phase's noise std (HU) is drawn from it (instead of ``noise_std``).
        blur_range: each phase's Gaussian blur sigma (mm) is drawn from it.
        intensity_shift_range: each phase's constant intensity shift (HU) is drawn from it.
        volume_change_range: when given, a pleural pressure dilates the lungs so that their volume grows by a
            fraction drawn from it (:func:`.realism.dilatation_force`), on top of the diaphragm and rib-cage motion.
        fixed_field_of_view: the scanner's slab is fixed: the anatomy is placed so that the inhale lung bases lie
            5-25 mm below the bottom of the image and the case is simulated on a taller grid, then both phases are
            cut to ``spatial_size``, so anatomy moves in and out of the slab (keypoints are kept when both of
            their positions lie inside it).
        pleural_load_range: when given, the pleural pressure's share of the load (relative to the diaphragm and
            rib-cage force, :func:`.breathing.breathing_field`) is drawn from it instead of the volume change
            (``volume_change_range``, a preset's included, is then ignored): the solve with the case's material sets
            the volume change (recorded as ``volume_change``), so the motion's compressibility follows the
            material and a sweep can recover it (docs/discovery.md). Off by default (presets unchanged).
        real_ct: path of a chest CT (NIfTI, HU) to use as the exhale anatomy instead of the phantom
            (:func:`.real_ct.simulate_real_ct_pair`; ``fixed_field_of_view`` is then the CT's own extent).

    Raises:
        ValueError: invalid options (with the option's name).
    """
    spatial_size, spacing, poisson_range, mu_range, options = resolve_settings(
        spatial_size,
        spacing,
        poisson_range,
        mu_range,
        padding_fraction,
        preset,
        noise_std=noise_std,
        max_displacement_range=max_displacement_range,
        rib_weight_range=rib_weight_range,
        mass_conservation=mass_conservation,
        sliding=sliding,
        noise_std_range=noise_std_range,
        blur_range=blur_range,
        intensity_shift_range=intensity_shift_range,
        volume_change_range=volume_change_range,
        fixed_field_of_view=fixed_field_of_view,
        pleural_load_range=pleural_load_range,
    )
    if preset == "followup":
        if real_ct is None:
            raise ValueError("preset 'followup' needs real_ct: a follow-up is simulated on a real chest CT.")
        return simulate_followup_pair(
            real_ct, spatial_size, spacing, seed, options, poisson_range, mu_range, padding_fraction
        )
    if real_ct is not None:
        return simulate_real_ct_pair(
            real_ct, spatial_size, spacing, seed, options, poisson_range, mu_range, padding_fraction
        )

    rng = np.random.default_rng(seed)
    anat = sample_anatomy(rng, np.multiply(spatial_size, spacing))
    draw = draw_case(rng, seed, options, poisson_range, mu_range)

    # the simulation grid: the image, or with a fixed field of view a taller grid holding the slab
    below = above = 0
    slab_depth = None
    if options["fixed_field_of_view"]:
        slab_depth = float(draw.realism_rng.uniform(5.0, 25.0))
        q = np.moveaxis(_grid_points(spatial_size, spacing), 0, -1) - anat.center.astype(np.float32)
        in_lung = np.minimum(lung_sdf(anat, q, 1), lung_sdf(anat, q, -1)) < 0
        low = float(q[..., 2][in_lung].min()) if in_lung.any() else anat.lung_z_range[0]  # lowest lung point
        below = int(np.ceil((slab_depth + 60.0) / spacing[2]))
        above = int(np.ceil(30.0 / spacing[2]))
        center = anat.center.copy()
        center[2] = -slab_depth - low + below * spacing[2]  # inhale lung base at -slab_depth in image coordinates
        anat = replace(anat, center=center)
    grid = (spatial_size[0], spatial_size[1], spatial_size[2] + below + above)

    moving, moving_labels, moving_lung = render_phantom(anat, grid, spacing)
    force = breathing_force(anat, moving_lung, spacing, draw.rib_weight)
    elastic_mm, force, pressure = breathing_field(
        moving_lung, force, draw.lam, draw.mu, spacing, padding_fraction, draw.target, draw.volume_change,
        draw.pleural_load,
    )
    lung_volume_change = mean_divergence(elastic_mm, moving_lung, spacing)
    spacing_column = np.asarray(spacing)[:, None, None, None]
    displacement_mm, sliding_record = elastic_mm, {"sliding": 0.0}
    fixed_lungs = None
    if options["sliding"] > 0:
        q = np.moveaxis(_grid_points(grid, spacing) + elastic_mm.astype(np.float32), 0, -1) - anat.center.astype(
            np.float32
        )
        fixed_lungs = np.minimum(lung_sdf(anat, q, 1), lung_sdf(anat, q, -1)) < 0
        del q
    if options["sliding"] > 0:
        displacement_mm, sliding_record = sliding_displacement(elastic_mm, fixed_lungs, spacing, options["sliding"])
    displacement = (displacement_mm / spacing_column).astype(np.float32)
    fixed, fixed_labels, fixed_lung = render_phantom(anat, grid, spacing, displacement * spacing_column)
    if options["mass_conservation"]:
        parenchyma = np.isin(fixed_labels, (2, 3))
        fixed = conserve_lung_mass(fixed, parenchyma, jacobian_determinant(elastic_mm, spacing))

    bifurcations = (anat.vessels.bifurcations + anat.center) / np.asarray(spacing)
    fixed_points, residual = _invert_points(displacement, bifurcations)
    nearest = np.rint(fixed_points).astype(int)
    keep = (residual < 1e-3) & np.all((fixed_points >= 0) & (fixed_points <= np.subtract(grid, 1)), axis=1)
    inside = fixed_lung if options["sliding"] == 0 else fixed_lung & binary_erosion(fixed_lungs, iterations=2)
    keep[keep] = inside[tuple(nearest[keep].T)]
    fixed_points = fixed_points[keep]
    moving_points = fixed_points + np.stack(
        [map_coordinates(c, fixed_points.T, order=1, mode="nearest") for c in displacement], axis=1
    )
    if below or above:  # cut the slab; keep keypoints seen in both phases
        crop = slice(below, below + spatial_size[2])
        offset = np.array([0.0, 0.0, below])
        fixed_points, moving_points = fixed_points - offset, moving_points - offset
        top = spatial_size[2] - 1
        seen = (fixed_points[:, 2] >= 0) & (fixed_points[:, 2] <= top)
        seen &= (moving_points[:, 2] >= 0) & (moving_points[:, 2] <= top)
        fixed_points, moving_points = fixed_points[seen], moving_points[seen]
        moving, moving_labels, moving_lung = moving[..., crop], moving_labels[..., crop], moving_lung[..., crop]
        fixed, fixed_labels, fixed_lung = fixed[..., crop], fixed_labels[..., crop], fixed_lung[..., crop]
        displacement, force = displacement[..., crop], force[..., crop]
        elastic_mm = elastic_mm[..., crop]
    record = draw.record("phantom")
    if preset is not None:
        record["preset"] = preset
    clean = SimulatedPair(
        fixed_image=fixed, moving_image=moving, fixed_mask=fixed_lung.astype(np.uint8),
        moving_mask=moving_lung.astype(np.uint8), fixed_labels=fixed_labels, moving_labels=moving_labels,
        displacement=displacement, force=force, fixed_keypoints=fixed_points, moving_keypoints=moving_points,
        spacing=spacing, simulation=record,
    )
    return acquire_pair(clean, draw, rng, options, pressure, sliding_record, slab_depth, lung_volume_change)
