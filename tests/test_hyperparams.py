import pytest
import torch

from elastic_hypermorph_bundle.hyperparams import HyperSpace


def test_elastic_rows_and_ranges():
    space = HyperSpace("elastic", lam_range=(0, 0.5), mu_range=(0.1, 0.2))
    assert space.names == ("lam", "mu") and space.dims == 2
    rows = space.sample(4096, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (4096, 2)
    assert rows[:, 0].min() >= 0 and rows[:, 0].max() <= 0.5
    assert rows[:, 1].min() >= 0.1 and rows[:, 1].max() <= 0.2
    # uniform: the mean is the midpoint, to sampling error
    assert abs(rows[:, 0].mean().item() - 0.25) < 0.02


@pytest.mark.parametrize("regularizer", ["diffusion", "elastic_fixed"])
def test_alpha_models_have_one_dim(regularizer):
    space = HyperSpace(regularizer, alpha_range=(0, 1))
    assert space.names == ("alpha",)
    torch.testing.assert_close(space.point(alpha=0.3), torch.tensor([[0.3]], dtype=torch.float32))
    with pytest.raises(ValueError, match="needs alpha"):
        space.point(lam=0.1, mu=0.1)


def test_endpoint_sampling_oversamples_the_ends():
    space = HyperSpace("diffusion", sampling="endpoints", endpoint_prob=0.4)
    rows = space.sample(10000, generator=torch.Generator().manual_seed(1))[:, 0]
    at_ends = ((rows == 0) | (rows == 1)).float().mean().item()
    assert 0.37 < at_ends < 0.43


def test_log_uniform_sampling_favours_small_values():
    space = HyperSpace("elastic", sampling="log_uniform")
    rows = space.sample(10000, generator=torch.Generator().manual_seed(2))
    assert rows.min() >= 1e-4 and rows.max() <= 1
    assert (rows < 0.01).float().mean() > 0.4  # half the log-range lies below 1e-2


def test_point_refuses_values_outside_the_trained_range():
    space = HyperSpace("elastic", lam_range=(0, 1), mu_range=(0, 1))
    with pytest.raises(ValueError, match="lam outside the trained range"):
        space.point(lam=1.5, mu=0.1)
    row = space.point(lam=1.5, mu=0.1, allow_extrapolation=True)
    torch.testing.assert_close(row, torch.tensor([[1.5, 0.1]], dtype=torch.float32))
    with pytest.raises(ValueError, match="finite"):
        space.point(lam=float("nan"), mu=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        space.point(lam=-0.1, mu=0.1, allow_extrapolation=True)


def test_grid_covers_the_range_in_order():
    space = HyperSpace("elastic", lam_range=(0, 1), mu_range=(0, 0.5))
    grid = space.grid((3, 2))
    torch.testing.assert_close(grid, torch.tensor([[0, 0], [0, 0.5], [0.5, 0], [0.5, 0.5], [1, 0], [1, 0.5]], dtype=torch.float32))
    zoom = space.grid(2, low=(0, 0), high=(0.5, 0.1))
    torch.testing.assert_close(zoom, torch.tensor([[0, 0], [0, 0.1], [0.5, 0], [0.5, 0.1]], dtype=torch.float32))
    with pytest.raises(ValueError, match="outside the trained range"):
        space.grid(2, high=(2, 0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"regularizer": "tv"}, "regularizer must be one of"),
        ({"sampling": "gauss"}, "sampling must be one of"),
        ({"lam_range": (1, 0)}, "lam_range must satisfy"),
        ({"mu_range": (0,)}, "mu_range must be a pair"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HyperSpace(**kwargs)
