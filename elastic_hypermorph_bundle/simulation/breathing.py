"""The breathing motion of a simulated case: the body force of inhalation on the phantom (diaphragm pull and
rib-cage expansion), and the displacement that balances a force in the linear elastic (Navier-Lamé) equilibrium,
scaled to a target amplitude and, optionally, dilated by a pleural pressure to a target lung volume change. Shared by
the phantom (:mod:`.generator`) and the real-CT (:mod:`.real_ct`) cases."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft
from scipy.ndimage import gaussian_filter

from .navier import solve_navier_lame
from .phantom import ThoraxAnatomy
from .realism import dilatation_force

__all__ = ["breathing_force", "breathing_field", "mean_divergence"]


def mean_divergence(displacement_mm: np.ndarray, lung_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Mean ``div u`` over ``lung_mask`` of a field ``(3, X, Y, Z)`` in mm (central differences): the lungs'
    volume change to first order."""
    return float(sum(np.gradient(displacement_mm[i], spacing[i], axis=i) for i in range(3))[lung_mask].mean())


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


def breathing_field(
    lung_mask: np.ndarray,
    body_force: np.ndarray,
    lam: float,
    mu: float,
    spacing: Sequence[float],
    padding_fraction: float,
    target: float,
    volume_change: float | None,
    pleural_load: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Elastic displacement (mm) and its balanced force: ``body_force`` scaled to ``max |u| = target`` over the lungs,
    plus, when ``volume_change`` is given, the pleural pressure (:func:`.realism.dilatation_force`) that brings the
    mean ``div u`` over the lungs to ``volume_change``. Returns ``(u_mm, force, pressure)``.

    With ``pleural_load`` instead, the load is drawn, not the motion: the force is ``body_force + k d``, ``d`` the
    unit pleural force and ``k = pleural_load * sum|body_force| / sum|d|`` (the pressure's share of the load),
    solved with ``(lam, mu)`` and then scaled to ``max |u| = target``. The scaling changes the amplitude only, so
    the field's shape, and its volume change relative to its shear, follow the material (the pleural part dilates
    by ``p / (lam + 2 mu)``, the diaphragm's shears by about ``1 / mu``), which makes the material identifiable
    from the motion."""
    displacement_mm, force = _padded_solve(body_force, lam, mu, spacing, padding_fraction)
    if pleural_load is not None:
        unit = dilatation_force(lung_mask, spacing)
        k = float(pleural_load) * np.abs(body_force).sum() / max(np.abs(unit).sum(), 1e-12)
        extra_u, extra_f = _padded_solve(unit, lam, mu, spacing, padding_fraction)
        displacement_mm, force = displacement_mm + k * extra_u, force + k * extra_f
        scale = target / np.linalg.norm(displacement_mm, axis=0)[lung_mask].max()
        return scale * displacement_mm, scale * force, float(scale * k)
    scale = target / np.linalg.norm(displacement_mm, axis=0)[lung_mask].max()
    displacement_mm, force = scale * displacement_mm, scale * force
    pressure = 0.0
    if volume_change is not None:
        extra_u, extra_f = _padded_solve(dilatation_force(lung_mask, spacing), lam, mu, spacing, padding_fraction)
        pressure = max(volume_change - mean_divergence(displacement_mm, lung_mask, spacing), 0.0) / \
            mean_divergence(extra_u, lung_mask, spacing)
        displacement_mm, force = displacement_mm + pressure * extra_u, force + pressure * extra_f
    return displacement_mm, force, float(pressure)
