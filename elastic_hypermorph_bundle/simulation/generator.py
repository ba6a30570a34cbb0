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
:data:`LUNG_FIELD_OF_VIEW_MM` (Learn2Reg LungCT: 192 x 192 x 208 voxels of 1.75 x 1.25 x 1.75 mm), e.g.
5.25 x 3.75 x 5.6875 mm at 64^3. Lamé parameters and forces share a unit (kPa and kPa/mm).

:func:`make_synthetic_dataset` writes ``LungCT_dataset.json`` (Learn2Reg 2021+ keys), ``imagesTr``,
``masksTr`` (lung, uint8 0/1), ``labelsTr`` (:data:`.phantom.LABELS`), ``keypointsTr`` (0-based voxel xyz CSV)
and ``displacementsTr/LungCT_XXXX.nii.gz``: the ground truth of pair ``XXXX`` in the Learn2Reg submission
convention, voxels of the fixed grid, channel-last ``(X, Y, Z, 3)`` float32 with the fixed image's affine. Each
pair entry carries a ``"simulation"`` record (seed, ``lam``, ``mu``, Poisson ratio, Young's modulus, maximum
displacement, path of the displacement file).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft
from scipy.ndimage import binary_erosion, gaussian_filter, map_coordinates

from .. import __version__
from ..data.io import write_points
from ..data.learn2reg import split_sizes
from ..physics import young_poisson_from_lame
from .navier import solve_navier_lame
from .phantom import LABELS, ThoraxAnatomy, lung_sdf, render_phantom, sample_anatomy
from .realism import acquire, conserve_lung_mass, dilatation_force, jacobian_determinant, sliding_displacement

__all__ = [
    "LUNG_FIELD_OF_VIEW_MM",
    "PRESETS",
    "SimulatedPair",
    "breathing_force",
    "resolve_options",
    "simulate_pair",
    "make_synthetic_dataset",
]

logger = logging.getLogger("elastic_hypermorph_bundle")

LUNG_FIELD_OF_VIEW_MM = (336.0, 240.0, 364.0)
"""Field of view of the Learn2Reg lung CT images (192 x 192 x 208 voxels of 1.75 x 1.25 x 1.75 mm)."""

DATASET_NAME = "LungCT"
DISPLACEMENT_CONVENTION = (
    "displacementsTr/<name>_XXXX.nii.gz: ground truth of pair XXXX in voxels of the fixed (_0000) grid, "
    "channel-last (X, Y, Z, 3), channel j along array axis j, fixed image affine; backward mapping: the fixed "
    "voxel x corresponds to the moving (_0001) point x + u(x) (Learn2Reg convention)."
)


@dataclass(frozen=True)
class SimulatedPair:
    """One simulated case. Images ``(X, Y, Z)``; fields channel-first ``(3, X, Y, Z)``; points ``(N, 3)`` voxels."""

    fixed_image: np.ndarray  # int16 HU, exhale
    moving_image: np.ndarray  # int16 HU, inhale
    fixed_mask: np.ndarray  # uint8 lung mask
    moving_mask: np.ndarray
    fixed_labels: np.ndarray  # uint8, phantom.LABELS
    moving_labels: np.ndarray
    displacement: np.ndarray  # float32 voxels, fixed grid, backward
    force: np.ndarray  # float64 body force (kPa/mm) balanced by the displacement (in mm)
    fixed_keypoints: np.ndarray
    moving_keypoints: np.ndarray
    spacing: tuple[float, float, float]
    simulation: dict  # seed, lam, mu, poisson_ratio, youngs_modulus, max_displacement_mm, rib_weight
    moving_grid_affine: np.ndarray | None = None  # a follow-up's own grid (.followup); None: the fixed grid

    @property
    def affine(self) -> np.ndarray:
        return np.diag([*self.spacing, 1.0])

    @property
    def moving_affine(self) -> np.ndarray:
        return self.affine if self.moving_grid_affine is None else self.moving_grid_affine


def _default_spacing(spatial_size: Sequence[int]) -> tuple[float, float, float]:
    return tuple(float(f / n) for f, n in zip(LUNG_FIELD_OF_VIEW_MM, spatial_size))


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be a pair (min, max) with {low} <= min <= max <= {high}, got {value}.")
    return value


def breathing_force(
    anat: ThoraxAnatomy, lung_mask: np.ndarray, spacing: Sequence[float], rib_weight: float
) -> np.ndarray:
    """Unscaled inhale body force ``(3, X, Y, Z)`` on the grid: diaphragm pull plus rib-cage expansion.

    With ``G`` a Gaussian smoothing of 8 mm, ``w = G(lung mask)``, ``c = G(chest wall)`` (inside the body
    outline, outside the inner chest wall ellipse: the frame the diaphragm and the ribs hang from) and
    ``b = exp(-max(z - z_low, 0) / (0.15 h))`` (1 at the lowest lung base ``z_low``, ``h`` the lung height)::

        p = w * b * (0, 0, -1)                                  diaphragm: caudal pull on the lung bases
        e = w * (x / a_x, clip((y - y_spine) / (2 a_y), 0, 1), 0)   rib cage: lateral and anterior expansion
        f = p + rib_weight * (sum|p| / sum|e|) * e - c * (sum(p + ...) / sum(c))

    i.e. the rib-cage term is ``rib_weight`` times the diaphragm term in total magnitude, and the chest wall
    carries the reaction that makes the net force zero (per component). ``(a_x, a_y)`` are the semi-axes of the
    inner chest wall (patient frame of :mod:`.phantom`). A balanced, local force gives a displacement that is
    largest at the lung bases and decays towards the apex.
    """
    spacing = np.asarray(spacing, dtype=float)
    sigma = 8.0 / spacing
    x, y, z = (np.arange(n) * h - c for n, h, c in zip(lung_mask.shape, spacing, anat.center))
    x, y, z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    body, thorax = ((x / ax) ** 2 + (y / ay) ** 2 for ax, ay in (anat.body_axes, anat.thorax_axes))
    chest_wall = gaussian_filter(np.broadcast_to((body < 1) & (thorax > 1), lung_mask.shape).astype(np.float64), sigma)
    lungs = gaussian_filter(lung_mask.astype(np.float64), sigma)
    low, apex = anat.lung_z_range
    pull = lungs * np.exp(-np.maximum(z - low, 0) / (0.15 * (apex - low)))
    anterior = np.clip((y - anat.spine_center[1]) / (2 * anat.thorax_axes[1]), 0, 1)
    expansion = np.stack([lungs * x / anat.thorax_axes[0], lungs * anterior])
    force = np.concatenate([rib_weight * pull.sum() / np.abs(expansion).sum() * expansion, -pull[None]])
    return force - chest_wall * (force.sum(axis=(1, 2, 3)) / chest_wall.sum())[:, None, None, None]


def _padded_solve(force: np.ndarray, lam: float, mu: float, spacing: Sequence[float], padding_fraction: float):
    """Solve on a zero-padded periodic grid; return the cropped displacement (mm) and balanced force."""
    shape = force.shape[1:]
    before = [int(round(padding_fraction * n)) for n in shape]
    padded_shape = [scipy.fft.next_fast_len(n + 2 * b, real=True) for n, b in zip(shape, before)]
    padded = np.zeros((3, *padded_shape))
    crop = (slice(None),) + tuple(slice(b, b + n) for b, n in zip(before, shape))
    padded[crop] = force
    padded -= padded.mean(axis=(1, 2, 3), keepdims=True)
    return solve_navier_lame(padded, lam, mu, spacing)[crop], padded[crop]


def _invert_points(displacement: np.ndarray, targets: np.ndarray, iterations: int = 50) -> tuple[np.ndarray, ...]:
    """Solve ``x + u(x) = targets`` (voxels, trilinear ``u``) by fixed-point iteration; return ``x``, residual."""

    def sample(points: np.ndarray) -> np.ndarray:
        return np.stack([map_coordinates(c, points.T, order=1, mode="nearest") for c in displacement], axis=1)

    points = targets.copy()
    for _ in range(iterations):
        points = targets - sample(points)
    return points, np.linalg.norm(points + sample(points) - targets, axis=1)


BASE_OPTIONS = {
    "noise_std": 20.0,
    "max_displacement_range": (12.0, 20.0),
    "rib_weight_range": (0.3, 0.6),
    "mass_conservation": False,
    "sliding": 0.0,
    "noise_std_range": None,
    "blur_range": (0.0, 0.0),
    "intensity_shift_range": (0.0, 0.0),
    "volume_change_range": None,
    "fixed_field_of_view": False,
}
"""Options of :func:`simulate_pair` that a preset may set, with their values when neither it nor the caller does."""

PRESETS = {
    "realistic": {
        "mass_conservation": True,
        "sliding": 0.8,
        "noise_std_range": (10.0, 40.0),
        "blur_range": (0.0, 1.5),
        "intensity_shift_range": (-20.0, 20.0),
        "volume_change_range": (0.12, 0.22),
        "max_displacement_range": (20.0, 30.0),
        "rib_weight_range": (0.4, 0.8),
        "fixed_field_of_view": True,
    },
}
PRESETS["followup"] = dict(PRESETS["realistic"])  # + a new position and scanner grid (.followup; real CTs only)
"""Named sets of realism options. ``realistic``: breath-hold exhale/inhale pairs (mass conservation, sliding at
the pleura, per-phase scanner differences, lung volume +12-22 % with 20-30 mm diaphragm motion, fixed field of
view; measured on generated pairs: TRE before registration 8-20 mm, lung volume +10-25 %)."""


def resolve_options(preset: str | None = None, **given) -> dict:
    """The realism options of :data:`BASE_OPTIONS`: explicit (not None) values > ``preset`` > base values."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}.")
    unknown = set(given) - set(BASE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown simulation options {sorted(unknown)}; known: {sorted(BASE_OPTIONS)}.")
    options = {**BASE_OPTIONS, **(PRESETS[preset] if preset else {})}
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def _grid_points(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    axes = [np.arange(n, dtype=np.float32) * np.float32(h) for n, h in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _breathing_field(
    lung_mask: np.ndarray,
    body_force: np.ndarray,
    lam: float,
    mu: float,
    spacing: Sequence[float],
    padding_fraction: float,
    target: float,
    volume_change: float | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Elastic displacement (mm) and its balanced force: ``body_force`` scaled to ``max |u| = target`` over the lungs,
    plus, when ``volume_change`` is given, the pleural pressure (:func:`.realism.dilatation_force`) that brings the
    mean ``div u`` over the lungs to ``volume_change``. Returns ``(u_mm, force, pressure)``."""
    displacement_mm, force = _padded_solve(body_force, lam, mu, spacing, padding_fraction)
    scale = target / np.linalg.norm(displacement_mm, axis=0)[lung_mask].max()
    displacement_mm, force = scale * displacement_mm, scale * force
    pressure = 0.0
    if volume_change is not None:
        def mean_divergence(u: np.ndarray) -> float:
            return float(sum(np.gradient(u[i], spacing[i], axis=i) for i in range(3))[lung_mask].mean())

        extra_u, extra_f = _padded_solve(dilatation_force(lung_mask, spacing), lam, mu, spacing, padding_fraction)
        pressure = max(volume_change - mean_divergence(displacement_mm), 0.0) / mean_divergence(extra_u)
        displacement_mm, force = displacement_mm + pressure * extra_u, force + pressure * extra_f
    return displacement_mm, force, float(pressure)


def _draw_acquisition(rng: np.random.Generator, options: dict) -> list[dict]:
    """Per-phase scanner settings (fixed, moving): noise std, blur sigma (mm), intensity shift (HU)."""
    phases = []
    for _ in range(2):
        noise = options["noise_std"] if options["noise_std_range"] is None else rng.uniform(*options["noise_std_range"])
        phases.append(
            {
                "noise_std": float(noise),
                "blur_sigma_mm": float(rng.uniform(*options["blur_range"])),
                "shift_hu": float(rng.uniform(*options["intensity_shift_range"])),
            }
        )
    return phases


def _check_options(options: dict) -> dict:
    options = dict(options)
    if options["noise_std"] < 0:
        raise ValueError(f"noise_std must be >= 0, got {options['noise_std']}.")
    options["max_displacement_range"] = _check_range(
        "max_displacement_range", options["max_displacement_range"], 1e-6, np.inf
    )
    options["rib_weight_range"] = _check_range("rib_weight_range", options["rib_weight_range"], 0.0, np.inf)
    if options["noise_std_range"] is not None:
        options["noise_std_range"] = _check_range("noise_std_range", options["noise_std_range"], 0.0, np.inf)
    options["blur_range"] = _check_range("blur_range", options["blur_range"], 0.0, np.inf)
    options["intensity_shift_range"] = _check_range(
        "intensity_shift_range", options["intensity_shift_range"], -np.inf, np.inf
    )
    if options["volume_change_range"] is not None:
        options["volume_change_range"] = _check_range("volume_change_range", options["volume_change_range"], 0.0, 1.0)
    if not 0.0 <= float(options["sliding"]) <= 1.0:
        raise ValueError(f"sliding must be in [0, 1], got {options['sliding']}.")
    options["sliding"] = float(options["sliding"])
    for flag in ("mass_conservation", "fixed_field_of_view"):
        if not isinstance(options[flag], (bool, np.bool_)):
            raise ValueError(f"{flag} must be true or false, got {options[flag]!r}.")
        options[flag] = bool(options[flag])
    return options


def _resolve_settings(
    spatial_size: Sequence[int],
    spacing: Sequence[float] | None,
    poisson_range: Sequence[float],
    mu_range: Sequence[float],
    padding_fraction: float,
    preset: str | None,
    **realism,
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, float], tuple[float, float], dict]:
    """The checked settings of :func:`simulate_pair`: ``(spatial_size, spacing, poisson_range, mu_range, options)``,
    ``options`` the realism options in effect (:func:`resolve_options`). Raises ValueError naming a bad option."""
    spatial_size = tuple(int(n) for n in spatial_size)
    if len(spatial_size) != 3 or min(spatial_size) < 8:
        raise ValueError(f"spatial_size must be 3 sizes of at least 8 voxels, got {spatial_size}.")
    spacing = _default_spacing(spatial_size) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}.")
    if padding_fraction < 0:
        raise ValueError(f"padding_fraction must be >= 0, got {padding_fraction}.")
    options = _check_options(resolve_options(preset, **realism))
    poisson_range = _check_range("poisson_range", poisson_range, 0.0, 0.499)
    mu_range = _check_range("mu_range", mu_range, 1e-6, np.inf)
    return spatial_size, spacing, poisson_range, mu_range, options


@dataclass(frozen=True)
class _CaseDraw:
    """A case's material (Poisson ratio ``nu``, Lamé ``lam`` and ``mu``), force amplitude (``target``: maximum
    displacement in mm, ``rib_weight``), the generator of its realism draws and its target lung volume change."""

    seed: int
    nu: float
    mu: float
    lam: float
    target: float
    rib_weight: float
    realism_rng: np.random.Generator
    volume_change: float | None

    def record(self, anatomy: str, **extra) -> dict:
        """The start of the case's ``simulation`` record; ``extra`` (e.g. the CT's name) follows ``anatomy``."""
        youngs_modulus, _ = young_poisson_from_lame(self.lam, self.mu)
        return {
            "seed": self.seed,
            "anatomy": anatomy,
            **extra,
            "lam": float(self.lam),
            "mu": float(self.mu),
            "poisson_ratio": float(self.nu),
            "youngs_modulus": float(youngs_modulus),
            "max_displacement_mm": float(self.target),
            "rib_weight": float(self.rib_weight),
        }


def _draw_case(
    rng: np.random.Generator, seed: int, options: dict, poisson_range: Sequence[float], mu_range: Sequence[float]
) -> _CaseDraw:
    """Draw the material and the amplitude from ``rng`` (in this order: nu, mu, target, rib weight) and the volume
    change from the realism generator ``default_rng([seed, 1])``."""
    nu, mu = rng.uniform(*poisson_range), rng.uniform(*mu_range)
    target, rib_weight = rng.uniform(*options["max_displacement_range"]), rng.uniform(*options["rib_weight_range"])
    realism_rng = np.random.default_rng([int(seed), 1])
    volume_change = None
    if options["volume_change_range"] is not None:
        volume_change = float(realism_rng.uniform(*options["volume_change_range"]))
    return _CaseDraw(int(seed), nu, mu, 2 * mu * nu / (1 - 2 * nu), target, rib_weight, realism_rng, volume_change)


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
        real_ct: path of a chest CT (NIfTI, HU) to use as the exhale anatomy instead of the phantom
            (:func:`.real_ct.simulate_real_ct_pair`; ``fixed_field_of_view`` is then the CT's own extent).

    Raises:
        ValueError: invalid options (with the option's name).
    """
    spatial_size, spacing, poisson_range, mu_range, options = _resolve_settings(
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
    )
    if preset == "followup":
        if real_ct is None:
            raise ValueError("preset 'followup' needs real_ct: a follow-up is simulated on a real chest CT.")
        from .followup import simulate_followup_pair

        return simulate_followup_pair(
            real_ct, spatial_size, spacing, seed, options, poisson_range, mu_range, padding_fraction
        )
    if real_ct is not None:
        from .real_ct import simulate_real_ct_pair

        return simulate_real_ct_pair(
            real_ct, spatial_size, spacing, seed, options, poisson_range, mu_range, padding_fraction
        )

    rng = np.random.default_rng(seed)
    anat = sample_anatomy(rng, np.multiply(spatial_size, spacing))
    draw = _draw_case(rng, seed, options, poisson_range, mu_range)

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
    elastic_mm, force, pressure = _breathing_field(
        moving_lung, force, draw.lam, draw.mu, spacing, padding_fraction, draw.target, draw.volume_change
    )
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
    acquisition = _draw_acquisition(draw.realism_rng, options)
    record = draw.record("phantom")
    if preset is not None:
        record["preset"] = preset
    realism = _realism_record(options, draw.volume_change, pressure, sliding_record, acquisition, slab_depth)
    return SimulatedPair(
        fixed_image=acquire(fixed, spacing, rng, **acquisition[0]),
        moving_image=acquire(moving, spacing, rng, **acquisition[1]),
        fixed_mask=fixed_lung.astype(np.uint8),
        moving_mask=moving_lung.astype(np.uint8),
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        displacement=displacement,
        force=force,
        fixed_keypoints=fixed_points,
        moving_keypoints=moving_points,
        spacing=spacing,
        simulation={**record, **realism},
    )


_SIMULATION_OPTIONS = {
    name: parameter.default
    for name, parameter in inspect.signature(simulate_pair).parameters.items()
    if name not in ("seed", "real_ct")  # make_synthetic_dataset sets these per case
}
"""The keyword options of :func:`simulate_pair` that :func:`make_synthetic_dataset` takes, with their defaults."""


def _realism_record(options, volume_change, pressure, sliding_record, acquisition, slab_depth) -> dict:
    """The realism values of one case for its ``simulation`` record (empty when every option is off)."""
    record = {}
    if volume_change is not None:
        record.update(target_volume_change=volume_change, pleural_pressure=pressure)
    if options["sliding"] > 0:
        record.update(sliding_record)
    if options["mass_conservation"]:
        record["mass_conservation"] = True
    if slab_depth is not None:
        record["slab_depth_mm"] = slab_depth
    defaults = {"noise_std": options["noise_std"], "blur_sigma_mm": 0.0, "shift_hu": 0.0}
    if any(phase != defaults for phase in acquisition):
        record["acquisition"] = {"fixed": acquisition[0], "moving": acquisition[1]}
    return record


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)  # nibabel's gzip writer stores mtime 0: same array, same bytes


def _write_pair(root: Path, case: str, pair: SimulatedPair, preview: bool) -> tuple[list[dict], dict]:
    """Write one case's files under ``root``; return its per-image JSON entries and its pair entry."""
    entries = []
    for phase, image, mask, labels, points, affine in (
        ("0000", pair.fixed_image, pair.fixed_mask, pair.fixed_labels, pair.fixed_keypoints, pair.affine),
        ("0001", pair.moving_image, pair.moving_mask, pair.moving_labels, pair.moving_keypoints, pair.moving_affine),
    ):
        name = f"{DATASET_NAME}_{case}_{phase}"
        _save_nifti(image, affine, root / "imagesTr" / f"{name}.nii.gz")
        _save_nifti(mask, affine, root / "masksTr" / f"{name}.nii.gz")
        _save_nifti(labels, affine, root / "labelsTr" / f"{name}.nii.gz")
        write_points(root / "keypointsTr" / f"{name}.csv", points, fmt="%.6f")
        entries.append(
            {
                "image": f"./imagesTr/{name}.nii.gz",
                "mask": f"./masksTr/{name}.nii.gz",
                "label": f"./labelsTr/{name}.nii.gz",
                "keypoints": f"./keypointsTr/{name}.csv",
            }
        )
    displacement = f"./displacementsTr/{DATASET_NAME}_{case}.nii.gz"
    _save_nifti(np.moveaxis(pair.displacement, 0, -1), pair.affine, root / displacement)
    if preview and pair.moving_grid_affine is None:  # a follow-up's grid differs: no preview
        _write_preview(root / "previews" / f"{DATASET_NAME}_{case}.png", pair, title=f"{DATASET_NAME}_{case}")
    simulation = {**pair.simulation, "num_keypoints": len(pair.fixed_keypoints), "displacement": displacement}
    return entries, {"fixed": entries[0]["image"], "moving": entries[1]["image"], "simulation": simulation}


def _write_preview(path: Path, pair: SimulatedPair, title: str) -> None:
    import torch
    from monai.networks.blocks import Warp

    from ..visualize import save_pair_png

    moving = torch.as_tensor(pair.moving_image, dtype=torch.float32)[None, None]
    warped = Warp(mode="bilinear", padding_mode="border")(moving, torch.as_tensor(pair.displacement)[None])[0, 0]
    save_pair_png(
        path,
        pair.fixed_image,
        pair.moving_image,
        warped=warped,
        fixed_mask=pair.fixed_mask,
        moving_mask=pair.moving_mask,
        ddf=pair.displacement,
        spacing=pair.spacing,
        title=title,
    )


def make_synthetic_dataset(
    output_dir: str | os.PathLike,
    num_pairs: int = 6,
    seed: int = 0,
    preview: bool = False,
    overwrite: bool = False,
    real_ct: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    real_ct_fraction: float = 0.0,
    **simulation,
) -> Path:
    """Write ``num_pairs`` simulated pairs as a Learn2Reg 2021+ dataset (see the module docstring); return its path.

    Case ``i`` (1-based id ``XXXX``) is :func:`simulate_pair` with the seed
    ``numpy.random.SeedSequence(seed).spawn(num_pairs)[i - 1].generate_state(1)[0]`` (recorded in its
    ``simulation`` entry, so one case can be regenerated alone). The first cases are ``training_paired_images``,
    then ``registration_val`` and ``registration_test`` with sizes from :func:`.learn2reg.split_sizes` (20/4/6
    proportions, at least one each from 3 pairs on). Same arguments, byte-identical files.

    With ``real_ct`` (a chest CT, NIfTI in HU; or a list of them; or a folder, meaning its ``*.nii.gz`` / ``*.nii``
    files in name order) a fraction ``real_ct_fraction`` of the cases, spread evenly over the list (case ``i``,
    0-based, when ``floor((i + 1) f) > floor(i f)``), use a real CT as the exhale anatomy, the ``k``-th such case
    the CT ``k mod n`` of the ``n`` given (so several anatomies share the real-CT cases in turn); their
    ``simulation`` record says ``"anatomy": "real_ct"`` and names the CT. The CTs are read, never copied into the
    dataset. To hold an anatomy out of training, leave it out of the list.

    The dataset is built in a hidden sibling folder and renamed into place at the end, so an interrupted run
    leaves no partial dataset.

    Args:
        output_dir: the dataset folder.
        num_pairs: number of cases.
        seed: the dataset's seed (the cases' seeds derive from it, see above).
        preview: also write a PNG preview of each case under ``previews``.
        overwrite: replace an existing ``output_dir``.
        real_ct: a chest CT, a list of them or a folder of them, the exhale anatomy of some cases (see above).
        real_ct_fraction: the fraction of the cases on a real CT.
        simulation: the keyword options of simulate_pair (all but ``seed`` and ``real_ct``), the same for every
            case; ``spatial_size`` defaults to (64, 64, 64).

    Raises:
        FileExistsError: ``output_dir`` exists and is not an empty folder, and ``overwrite`` is false.
        ValueError: an unknown or invalid option (see :func:`simulate_pair`).
    """
    output_dir = Path(output_dir).absolute()
    num_pairs = int(num_pairs)
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}.")
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"output_dir {output_dir} exists and is not empty; pass overwrite=True to replace it.")
    unknown = set(simulation) - set(_SIMULATION_OPTIONS)
    if unknown:
        raise ValueError(f"unknown simulation options {sorted(unknown)}; valid: {sorted(_SIMULATION_OPTIONS)}.")
    simulation = {**_SIMULATION_OPTIONS, **simulation}
    # refuse bad options before writing anything
    spatial_size, spacing, poisson_range, mu_range, resolved = _resolve_settings(**simulation)
    real_ct_fraction = float(real_ct_fraction)
    if not 0.0 <= real_ct_fraction <= 1.0:
        raise ValueError(f"real_ct_fraction must be in [0, 1], got {real_ct_fraction}.")
    if simulation["preset"] == "followup" and real_ct_fraction < 1:
        raise ValueError(f"preset 'followup' needs real_ct and real_ct_fraction 1 (got {real_ct_fraction}).")
    if real_ct_fraction > 0 and real_ct is None:
        raise ValueError("real_ct_fraction > 0 needs real_ct, the path of a chest CT.")
    real_cts = _real_ct_paths(real_ct)
    uses_real_ct = [np.floor((i + 1) * real_ct_fraction) > np.floor(i * real_ct_fraction) for i in range(num_pairs)]
    anatomies = [None] * num_pairs
    for k, i in enumerate(i for i, on_real_ct in enumerate(uses_real_ct) if on_real_ct):
        anatomies[i] = real_cts[k % len(real_cts)]
    record = {
        "noise_std": float(resolved["noise_std"]),
        "poisson_range": list(poisson_range),
        "mu_range": list(mu_range),
        "max_displacement_range": list(resolved["max_displacement_range"]),
    }
    if simulation["preset"] is not None or any(simulation[k] is not None for k in BASE_OPTIONS if k not in record):
        # the values in effect, whichever of the caller, the preset or the base set them
        record.update(preset=simulation["preset"], **{k: v for k, v in resolved.items() if k not in record})
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in record.items()}
    if simulation["padding_fraction"] != _SIMULATION_OPTIONS["padding_fraction"]:
        record["padding_fraction"] = float(simulation["padding_fraction"])
    if real_cts:  # one CT keeps the record of a single path
        names = [str(path.absolute()) for path in real_cts]
        record.update(real_ct=names[0] if len(names) == 1 else names, real_ct_fraction=real_ct_fraction)
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(num_pairs)]
    cases = [f"{i:04d}" for i in range(1, num_pairs + 1)]
    num_train, num_val, _ = split_sizes(num_pairs)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for folder in ("imagesTr", "masksTr", "labelsTr", "keypointsTr", "displacementsTr"):
            (staging / folder).mkdir(parents=True)
        images, pairs = [], []
        for case, case_seed, anatomy in zip(cases, seeds, anatomies):
            start = time.perf_counter()
            pair = simulate_pair(seed=case_seed, real_ct=anatomy, **simulation)
            entries, pair_entry = _write_pair(staging, case, pair, preview)
            images += entries
            pairs.append(pair_entry)
            logger.info("synthetic case %s (seed %d) written in %.1f s", case, case_seed, time.perf_counter() - start)
        spec = {
            "name": DATASET_NAME,
            "description": "Simulated breathing lung CT: exhale (_0000, fixed) and inhale (_0001, moving) of an "
            "analytic thorax phantom, the inhale displacement solving the linear elastic (Navier-Lame) "
            "equilibrium under a breathing body force.",
            "reference": "elastic_hypermorph_bundle.simulation.generator",
            "licence": "Apache-2.0 (synthetic data)",
            "release": __version__,
            "pairings": "paired",
            "registration_direction": {"fixed": 0, "moving": 1},
            "modality": {"0": "CT", "1": "CT"},
            "labels": {"0": "background", "1": "lung"},
            "label_map": {str(k): v for k, v in LABELS.items()},
            "tensorImageSize": "3D",
            # a follow-up's images have their own shapes
            **({} if simulation["preset"] == "followup" else {"tensorImageShape": {"0": list(spatial_size)}}),
            "spacing": list(spacing),
            "displacement_convention": DISPLACEMENT_CONVENTION.replace("<name>", DATASET_NAME),
            "generator": {"seed": int(seed), "num_pairs": num_pairs, **record},
            "numTraining": len(images),
            "numTest": 0,
            "training": images,
            "test": [],
            "numPairedTraining": num_train,
            "training_paired_images": pairs[:num_train],
            "numRegistration_val": num_val,
            "registration_val": pairs[num_train : num_train + num_val],
            "numRegistration_test": num_pairs - num_train - num_val,
            "registration_test": pairs[num_train + num_val :],
        }
        (staging / f"{DATASET_NAME}_dataset.json").write_text(json.dumps(spec, indent=4) + "\n")
        if output_dir.exists():
            retired = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
            os.replace(output_dir, retired)
            shutil.rmtree(retired) if retired.is_dir() else retired.unlink()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _real_ct_paths(real_ct: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """The chest CTs named by ``real_ct`` of :func:`make_synthetic_dataset`: none, one file, a list of files, or a
    folder (its ``*.nii.gz`` and ``*.nii`` files in name order).

    Raises:
        FileNotFoundError: a named CT is not a file, or a folder holds no NIfTI file.
        ValueError: an empty list.
    """
    if real_ct is None:
        return []
    if isinstance(real_ct, (str, os.PathLike)) and Path(real_ct).is_dir():
        folder = Path(real_ct)
        paths = sorted({*folder.glob("*.nii.gz"), *folder.glob("*.nii")})
        if not paths:
            raise FileNotFoundError(f"real_ct folder {folder} holds no chest CT (*.nii.gz or *.nii).")
        return paths
    paths = [Path(real_ct)] if isinstance(real_ct, (str, os.PathLike)) else [Path(p) for p in real_ct]
    if not paths:
        raise ValueError("real_ct is an empty list; name at least one chest CT or pass None.")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"real_ct {path} is not a file (a chest CT in NIfTI format, HU).")
    return paths
