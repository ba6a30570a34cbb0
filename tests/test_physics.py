import math

import pytest

from elastic_hypermorph_bundle.physics import (
    BROCK,
    LAI_FOOK,
    lame_from_young_poisson,
    poisson_ratio,
    young_poisson_from_lame,
)


@pytest.mark.parametrize(
    "constants, youngs_modulus, nu",
    # published material values: Lai-Fook & Hyatt (E = 22.8, nu = 0.425), Brock et al. (E = 5, nu = 0.45)
    [(LAI_FOOK, 22.8, 0.425), (BROCK, 5.0, 0.45)],
)
def test_named_constants_match_published_material_values(constants, youngs_modulus, nu):
    lam, mu = lame_from_young_poisson(youngs_modulus, nu)
    assert lam == pytest.approx(constants.lam, abs=0.01)
    assert mu == pytest.approx(constants.mu, abs=0.01)
    assert constants == (constants.lam, constants.mu)  # usable as a plain (lam, mu) tuple


def test_known_conversion():
    # E = 2, nu = 0.25: mu = 2 / 2.5, lam = 0.5 / (1.25 * 0.5)
    assert lame_from_young_poisson(2.0, 0.25) == pytest.approx((0.8, 0.8))
    assert young_poisson_from_lame(1.0, 1.0) == pytest.approx((2.5, 0.25))


@pytest.mark.parametrize("youngs_modulus", [0.3, 5.0, 120.0])
@pytest.mark.parametrize("nu", [-0.9, -0.2, 0.0, 0.3, 0.49])
def test_round_trip(youngs_modulus, nu):
    lam, mu = lame_from_young_poisson(youngs_modulus, nu)
    assert young_poisson_from_lame(lam, mu) == pytest.approx((youngs_modulus, nu))
    assert poisson_ratio(lam, mu) == pytest.approx(nu)
    assert lame_from_young_poisson(*young_poisson_from_lame(lam, mu)) == pytest.approx((lam, mu))


def test_poisson_ratio_limits():
    assert poisson_ratio(0.0, 1.0) == 0.0
    assert poisson_ratio(1e6, 1.0) == pytest.approx(0.5, abs=1e-6)
    assert poisson_ratio(BROCK.lam, BROCK.mu) > poisson_ratio(LAI_FOOK.lam, LAI_FOOK.mu)


@pytest.mark.parametrize(
    "youngs_modulus, nu, match",
    [(0.0, 0.3, "Young"), (-1.0, 0.3, "Young"), (1.0, 0.5, "nu"), (1.0, -1.0, "nu"), (math.nan, 0.3, "finite")],
)
def test_lame_from_young_poisson_rejects(youngs_modulus, nu, match):
    with pytest.raises(ValueError, match=match):
        lame_from_young_poisson(youngs_modulus, nu)


@pytest.mark.parametrize(
    "lam, mu, match", [(1.0, 0.0, "mu"), (1.0, -1.0, "mu"), (-1.0, 1.0, "bulk"), (math.inf, 1.0, "finite")]
)
@pytest.mark.parametrize("function", [young_poisson_from_lame, poisson_ratio])
def test_lame_inputs_rejected(function, lam, mu, match):
    with pytest.raises(ValueError, match=match):
        function(lam, mu)
