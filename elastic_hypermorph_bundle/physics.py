"""Isotropic linear elasticity: conversions between Young's modulus / Poisson's ratio and the Lamé parameters.

For an isotropic material with Young's modulus ``E > 0`` and Poisson's ratio ``nu`` in ``(-1, 0.5)``::

    lam = E * nu / ((1 + nu) * (1 - 2 * nu))        mu = E / (2 * (1 + nu))
    E = mu * (3 * lam + 2 * mu) / (lam + mu)         nu = lam / (2 * (lam + mu))

The admissible range of ``(E, nu)`` corresponds exactly to ``mu > 0`` and ``3 * lam + 2 * mu > 0`` (positive
shear and bulk moduli). The conversions are unit-agnostic: ``lam``, ``mu`` and ``E`` share one unit.

The named lung-tissue constants are the (lam, mu) values used by Reithmeir et al., "Learning physics-inspired
regularization for medical image registration with hypernetworks" (arXiv:2311.08239), taken from Lai-Fook & Hyatt,
J. Appl. Physiol. 89 (2000) and Brock et al., Med. Phys. 32 (2005); they equal (E, nu) = (22.8, 0.425) and
(5.0, 0.45). The paper scales them by 0.1 or 0.01 (keeping their ratio) before use as regularization weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = [
    "LameParameters",
    "LAI_FOOK",
    "BROCK",
    "lame_from_young_poisson",
    "young_poisson_from_lame",
    "poisson_ratio",
]


class LameParameters(NamedTuple):
    """Lamé parameters ``(lam, mu)``; ``mu`` is the shear modulus."""

    lam: float
    mu: float


LAI_FOOK = LameParameters(lam=45.33, mu=8.0)
BROCK = LameParameters(lam=15.51, mu=1.72)


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}.")


def _check_lame(lam: float, mu: float) -> None:
    _check_finite(lam=lam, mu=mu)
    if mu <= 0:
        raise ValueError(f"shear modulus mu must be > 0, got {mu}.")
    if 3 * lam + 2 * mu <= 0:
        raise ValueError(f"bulk modulus lam + 2 * mu / 3 must be > 0, got lam={lam}, mu={mu}.")


def lame_from_young_poisson(youngs_modulus: float, nu: float) -> LameParameters:
    """Lamé parameters ``(lam, mu)`` of a material with Young's modulus ``E > 0`` and Poisson's ratio ``nu``.

    Raises:
        ValueError: when ``E <= 0``, ``nu`` is outside ``(-1, 0.5)`` or either value is not finite.
    """
    _check_finite(youngs_modulus=youngs_modulus, nu=nu)
    if youngs_modulus <= 0:
        raise ValueError(f"Young's modulus must be > 0, got {youngs_modulus}.")
    if not -1.0 < nu < 0.5:
        raise ValueError(f"Poisson's ratio nu must lie in (-1, 0.5), got {nu}.")
    lam = youngs_modulus * nu / ((1 + nu) * (1 - 2 * nu))
    mu = youngs_modulus / (2 * (1 + nu))
    return LameParameters(lam=lam, mu=mu)


def young_poisson_from_lame(lam: float, mu: float) -> tuple[float, float]:
    """Young's modulus and Poisson's ratio ``(E, nu)`` of a material with Lamé parameters ``(lam, mu)``.

    Raises:
        ValueError: when ``mu <= 0`` or ``3 * lam + 2 * mu <= 0`` (no admissible ``(E, nu)``), or a value is not
            finite.
    """
    _check_lame(lam, mu)
    return mu * (3 * lam + 2 * mu) / (lam + mu), poisson_ratio(lam, mu)


def poisson_ratio(lam: float, mu: float) -> float:
    """Poisson's ratio ``nu = lam / (2 (lam + mu))``; it tends to 0.5 (incompressible) as ``lam / mu`` grows.

    Raises:
        ValueError: when ``mu <= 0`` or ``3 * lam + 2 * mu <= 0``, or a value is not finite.
    """
    _check_lame(lam, mu)
    return lam / (2 * (lam + mu))
