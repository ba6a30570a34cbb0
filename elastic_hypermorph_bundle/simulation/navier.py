"""Discrete linear elasticity on a periodic grid: the Navier–Lamé operator and its exact spectral inverse.

Static equilibrium of an isotropic linear elastic body under a body force ``f`` (Navier–Lamé equation)::

    mu * laplace(u) + (lam + mu) * grad(div(u)) + f = 0

discretised with second-order finite differences on a periodic grid of spacing ``h_j`` (mm) along axis ``j``:

* pure second derivatives ``d_jj`` use the 3-point stencil ``(u[+1] - 2 u + u[-1]) / h_j**2``
  (Fourier symbol ``-c_j**2``, ``c_j = 2 sin(theta_j / 2) / h_j``),
* mixed derivatives ``d_ij`` (``i != j``) are products of central differences ``(u[+1] - u[-1]) / (2 h_j)``
  (symbol ``-s_i s_j``, ``s_j = sin(theta_j) / h_j``),

where ``theta_j = 2 pi m_j / n_j`` is the discrete wavenumber. For each wavevector the Fourier coefficients solve
the 3x3 system ``(mu |c|^2 I + (lam + mu) K) u_hat = f_hat`` with ``K_ij = s_i s_j`` (``i != j``) and
``K_ii = c_i**2``; ``K`` is positive semi-definite (``c_j**2 >= s_j**2``), so the system is positive definite for
every wavevector but the zero one. The zero mode (a rigid translation) is set to zero, which requires a force of
zero mean: a periodic body cannot be in equilibrium under a net force. :func:`solve_navier_lame` inverts exactly
the operator :func:`navier_lame_operator` applies, so ``navier_lame_operator(solve_navier_lame(f)) == -f`` to
floating-point accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

__all__ = ["navier_lame_operator", "solve_navier_lame"]


def _check_field(name: str, field: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    if field.ndim != 4 or field.shape[0] != 3:
        raise ValueError(f"{name} must have shape (3, X, Y, Z) (channel j along axis j), got {field.shape}.")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}.")
    return spacing


def _check_lame(lam: float, mu: float) -> None:
    if mu <= 0 or lam + 2 * mu <= 0:
        raise ValueError(f"the Navier–Lamé operator needs mu > 0 and lam + 2 mu > 0, got lam={lam}, mu={mu}.")


def navier_lame_operator(u: np.ndarray, lam: float, mu: float, spacing: Sequence[float]) -> np.ndarray:
    """Apply ``mu * laplace(u) + (lam + mu) * grad(div(u))`` with the periodic stencils of the module docstring.

    Args:
        u: displacement ``(3, X, Y, Z)`` in mm, channel ``j`` along axis ``j``.
        lam, mu: Lamé parameters (the unit of the result is theirs per mm).
        spacing: voxel size per axis in mm.

    Returns:
        ``(3, X, Y, Z)`` array; values within one voxel of the border see the periodic wrap-around.
    """
    spacing = _check_field("u", u, spacing)
    _check_lame(lam, mu)

    def second(a: np.ndarray, axis: int) -> np.ndarray:
        return (np.roll(a, -1, axis) - 2 * a + np.roll(a, 1, axis)) / spacing[axis] ** 2

    def central(a: np.ndarray, axis: int) -> np.ndarray:
        return (np.roll(a, -1, axis) - np.roll(a, 1, axis)) / (2 * spacing[axis])

    result = np.empty_like(u)
    for i in range(3):
        laplace = sum(second(u[i], j) for j in range(3))
        grad_div = sum(second(u[j], j) if j == i else central(central(u[j], j), i) for j in range(3))
        result[i] = mu * laplace + (lam + mu) * grad_div
    return result


def solve_navier_lame(force: np.ndarray, lam: float, mu: float, spacing: Sequence[float]) -> np.ndarray:
    """Periodic displacement ``u`` with ``navier_lame_operator(u) + force = 0`` and zero mean (spectral solve).

    Args:
        force: body force ``(3, X, Y, Z)`` (unit of ``lam``, ``mu`` per mm) with zero mean over the grid.
        lam, mu: Lamé parameters.
        spacing: voxel size per axis in mm.

    Returns:
        ``(3, X, Y, Z)`` float64 displacement in mm.

    Raises:
        ValueError: for a wrong shape, inadmissible Lamé parameters, or a force with a non-zero mean.
    """
    spacing = _check_field("force", force, spacing)
    _check_lame(lam, mu)
    force = np.asarray(force, dtype=np.float64)
    mean = np.abs(force.mean(axis=(1, 2, 3))).max()
    if mean > 1e-9 * max(np.abs(force).max(), 1e-300):
        raise ValueError(
            f"force must have zero mean over the periodic grid (no equilibrium under a net force), got a mean "
            f"of {mean:.3g}; subtract force.mean(axis=(1, 2, 3), keepdims=True) first."
        )
    shape = force.shape[1:]
    thetas = [2 * np.pi * scipy.fft.fftfreq(n) for n in shape[:-1]] + [2 * np.pi * scipy.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*thetas, indexing="ij", sparse=True)
    c2 = [(2 * np.sin(t / 2) / h) ** 2 for t, h in zip(grids, spacing)]
    s = [np.sin(t) / h for t, h in zip(grids, spacing)]
    shear = mu * (c2[0] + c2[1] + c2[2])
    # symmetric 3x3 system per wavevector: [[a, d, e], [d, b, f], [e, f, c]]
    a, b, c = (shear + (lam + mu) * c2[j] for j in range(3))
    d, e, f = ((lam + mu) * s[i] * s[j] for i, j in ((0, 1), (0, 2), (1, 2)))
    cof = {  # adjugate entries
        (0, 0): b * c - f * f, (1, 1): a * c - e * e, (2, 2): a * b - d * d,
        (0, 1): e * f - d * c, (0, 2): d * f - b * e, (1, 2): d * e - a * f,
    }
    det = a * cof[0, 0] + d * cof[0, 1] + e * cof[0, 2]
    det[0, 0, 0] = 1.0  # zero mode: the force has no such component, and the solution none either
    force_hat = scipy.fft.rfftn(force, axes=(1, 2, 3), workers=-1)
    u_hat = np.empty_like(force_hat)
    for i in range(3):
        u_hat[i] = sum(cof[min(i, j), max(i, j)] * force_hat[j] for j in range(3)) / det
    u_hat[:, 0, 0, 0] = 0
    return scipy.fft.irfftn(u_hat, s=shape, axes=(1, 2, 3), workers=-1)
