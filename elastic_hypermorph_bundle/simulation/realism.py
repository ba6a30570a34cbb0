"""What makes a simulated breathing pair look like a real breath-hold exhale/inhale CT pair.

Each function is one effect, applied by :func:`.generator.simulate_pair` when its option is on (all off by default;
the ``realistic`` preset, :data:`.generator.PRESETS`, turns them all on). Fields are channel-first
``(3, X, Y, Z)``; ``u`` is the backward field of the package conventions, defined on the fixed (exhale) grid:
the exhale point ``x`` is the inhale point ``phi(x) = x + u(x)``.

* :func:`dilatation_force`: a pleural-pressure force whose Navier-Lamé solution expands the lungs by a chosen
  volume fraction (breath-hold amplitudes: lung volume +10-25 %).
* :func:`sliding_displacement`: the lungs slide along the chest wall (a tangential discontinuity at the pleura
  with a continuous normal component; each side stays fold-free).
* :func:`jacobian_determinant` and :func:`conserve_lung_mass`: the inhale lung is darker by mass conservation,
  ``HU_inhale(phi(x)) + 1000 = (HU_exhale(x) + 1000) / det J(x)`` in the lung parenchyma.
* :func:`acquire`: one phase's scanner: Gaussian blur, an intensity shift and correlated noise, rounded to int16 HU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, gaussian_filter

__all__ = ["dilatation_force", "sliding_displacement", "jacobian_determinant", "conserve_lung_mass", "acquire"]

HU_MIN, HU_MAX = -1024, 3071


def _column(spacing: Sequence[float]) -> np.ndarray:
    return np.asarray(spacing, dtype=float)[:, None, None, None]


def dilatation_force(lung_mask: np.ndarray, spacing: Sequence[float], smoothing_mm: float = 4.0) -> np.ndarray:
    """Unit pleural-pressure body force ``f = -grad(w)`` ``(3, X, Y, Z)``, ``w = G * lung_mask`` (kPa/mm per kPa).

    For a gradient force the Navier-Lamé equilibrium ``mu lap(u) + (lam + mu) grad(div u) + p f = 0`` has the
    irrotational solution ``u = grad(phi)`` with ``(lam + 2 mu) lap(phi) = p w``, i.e. ``div u = p w / (lam + 2 mu)``:
    a pressure ``p`` (kPa) dilates the lungs uniformly by the volume fraction ``p / (lam + 2 mu)`` and leaves the
    rest of the body almost unstrained. ``f`` points out of the lungs and sums to zero (no net force).

    Args:
        lung_mask: boolean ``(X, Y, Z)``.
        spacing: voxel size (mm).
        smoothing_mm: standard deviation of the Gaussian ``G`` (mm), the width of the pleural layer.
    """
    spacing = np.asarray(spacing, dtype=float)
    w = gaussian_filter(lung_mask.astype(np.float64), smoothing_mm / spacing)
    return -np.stack(np.gradient(w, *spacing))


def jacobian_determinant(displacement: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """``det(I + grad u)`` ``(X, Y, Z)`` of a field ``(3, X, Y, Z)`` by central differences (one-sided at borders).

    ``displacement`` is in voxels when ``spacing`` is None, else in mm with voxel size ``spacing`` (mm).
    """
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    gradient = np.stack([np.stack(np.gradient(c, *spacing)) for c in displacement])  # [i, j] = d u_i / d x_j
    jacobian = np.moveaxis(gradient, (0, 1), (-2, -1)) + np.eye(3)
    return np.linalg.det(jacobian)


def sliding_displacement(
    displacement_mm: np.ndarray,
    lungs: np.ndarray,
    spacing: Sequence[float],
    sliding: float,
    smoothing_mm: float = 8.0,
    min_jacobian: float = 0.2,
) -> tuple[np.ndarray, dict]:
    """Let the lungs slide along the chest wall: remove the lungs' tangential motion outside them.

    ``lungs`` is the lung region of the fixed grid. Inside it ``u`` is unchanged. Outside::

        n   = grad(G * lungs) / |grad(G * lungs)|            pleural normal (G: Gaussian of ``smoothing_mm`` / 2)
        t   = u - (u . n) n                                  the lungs' tangential motion, on the inner pleural shell
        T   = G_w * t(nearest shell voxel)                   extended outwards and smoothed (w = ``smoothing_mm``)
        u'  = u - sliding * exp(-d / L) * T                  d: distance (mm) to the lungs

    so at the pleura the chest wall keeps the normal motion of the lungs (no gap, no overlap) and lags behind
    their tangential motion by ``sliding`` (0: no sliding, 1: the wall keeps only the normal motion), decaying
    over ``L`` into the body. ``L`` starts at ``max(30 mm, 3 max|t|)``; ``L`` and ``w`` are doubled until
    ``det J >= min_jacobian`` for the outside field, so each side of the discontinuity is fold-free (the inside
    field is the elastic one).

    Returns:
        ``(u', record)``: the field (mm) and ``{"sliding": ..., "sliding_length_mm": L, "max_slip_mm": ...}``.
    """
    if not 0.0 <= sliding <= 1.0:
        raise ValueError(f"sliding must be in [0, 1] (the fraction of the tangential motion removed), got {sliding}.")
    record = {"sliding": float(sliding), "sliding_length_mm": 0.0, "max_slip_mm": 0.0}
    if sliding == 0 or not lungs.any():
        return displacement_mm, record
    spacing = np.asarray(spacing, dtype=float)
    w = gaussian_filter(lungs.astype(np.float64), 0.5 * smoothing_mm / spacing)
    normal = np.stack(np.gradient(w, *spacing))
    normal /= np.maximum(np.linalg.norm(normal, axis=0), 1e-12)
    tangential = displacement_mm - (displacement_mm * normal).sum(axis=0) * normal
    shell = lungs & ~binary_erosion(lungs, iterations=2)
    # every voxel takes the tangential motion of its nearest shell voxel, then it is smoothed
    nearest = distance_transform_edt(~shell, sampling=spacing, return_distances=False, return_indices=True)
    nearest_tangential = tangential[(slice(None), *nearest)]
    distance = distance_transform_edt(~lungs, sampling=spacing)
    outside = ~lungs
    length, width = max(30.0, 3.0 * float(np.linalg.norm(tangential[:, shell], axis=0).max())), smoothing_mm
    for _ in range(6):
        extended = np.stack([gaussian_filter(c, width / spacing, mode="nearest") for c in nearest_tangential])
        slip = sliding * np.exp(-distance / length) * extended
        wall = displacement_mm - slip
        if jacobian_determinant(wall, spacing)[outside].min() >= min_jacobian:
            break
        length, width = 2.0 * length, 2.0 * width
    else:  # pragma: no cover - the smooth field of a breathing case never needs this
        raise ValueError("sliding could not be made fold-free; reduce sliding or the displacement amplitude.")
    result = np.where(outside[None], wall, displacement_mm)
    slip_at_pleura = np.linalg.norm(slip, axis=0)[outside & (distance <= spacing.max())]
    record.update(
        sliding_length_mm=float(length),
        sliding_smoothing_mm=float(width),
        max_slip_mm=float(slip_at_pleura.max(initial=0.0)),
    )
    return result, record


def conserve_lung_mass(exhale_hu: np.ndarray, parenchyma: np.ndarray, jacobian: np.ndarray) -> np.ndarray:
    """Exhale image whose lung parenchyma is denser by the local volume change of breathing in.

    With ``phi(x) = x + u(x)`` (exhale -> inhale) and ``J = det(grad phi)``, mass conservation of the parenchyma
    ``(HU + 1000) dV`` gives ``HU_inhale(phi(x)) + 1000 = (HU_exhale(x) + 1000) / J(x)``. Given the exhale image
    rendered with inhale densities (``HU_inhale(phi(x))``), this returns ``(HU + 1000) J - 1000`` inside
    ``parenchyma`` (boolean ``(X, Y, Z)``; vessels, airways and other tissue keep their HU), the image unchanged
    elsewhere.
    """
    if np.any(jacobian[parenchyma] <= 0):
        raise ValueError("the displacement folds inside the lungs (det J <= 0); mass conservation is undefined.")
    scaled = (exhale_hu.astype(np.float64) + 1000.0) * jacobian - 1000.0
    return np.where(parenchyma, scaled, exhale_hu).astype(exhale_hu.dtype)


def acquire(
    image_hu: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    noise_std: float,
    blur_sigma_mm: float = 0.0,
    shift_hu: float = 0.0,
) -> np.ndarray:
    """One phase's acquisition: ``round(clip(G_blur * image + shift + n, -1024, 3071))`` as int16 HU.

    ``G_blur`` is a Gaussian of standard deviation ``blur_sigma_mm`` (mm; 0: none), ``shift_hu`` a constant offset
    (calibration drift between scans), ``n`` Gaussian noise smoothed by 0.7 voxel (CT noise is slightly correlated)
    and rescaled to standard deviation ``noise_std`` (HU; 0: none).
    """
    if noise_std < 0 or blur_sigma_mm < 0:
        raise ValueError(f"noise_std and blur_sigma_mm must be >= 0, got {noise_std} and {blur_sigma_mm}.")
    image = image_hu.astype(np.float64) if blur_sigma_mm > 0 or shift_hu != 0 else image_hu
    if blur_sigma_mm > 0:
        image = gaussian_filter(image, blur_sigma_mm / np.asarray(spacing, dtype=float), mode="nearest")
    if shift_hu != 0:
        image = image + shift_hu
    if noise_std > 0:
        noise = gaussian_filter(rng.standard_normal(image.shape), sigma=0.7)
        image = image + noise_std / noise.std() * noise
    return np.rint(np.clip(image, HU_MIN, HU_MAX)).astype(np.int16)
