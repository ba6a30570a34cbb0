import pytest
import torch
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from elastic_hypermorph_bundle.losses import RegistrationLoss, elastic_energy

FIXED_LAM, FIXED_MU = 0.1551, 0.0172
CASES = [
    (regularizer, weighting, regularize)
    for regularizer in ("elastic", "diffusion", "elastic_fixed")
    for weighting in ("paper", "hypermorph")
    for regularize in ("displacement", "velocity")
]


def make_loss(regularizer, weighting="paper", spatial_dims=3, regularize="displacement", reduction="mean"):
    fixed = dict(fixed_lam=FIXED_LAM, fixed_mu=FIXED_MU) if regularizer == "elastic_fixed" else {}
    return RegistrationLoss(
        regularizer, weighting, spatial_dims, regularize=regularize, reduction=reduction, **fixed
    )


def make_batch(batch=3, spatial=(10, 11, 12), seed=0):
    generator = torch.Generator().manual_seed(seed)
    dims = len(spatial)
    fixed = torch.rand((batch, 1) + spatial, generator=generator)
    warped = 0.7 * fixed + 0.3 * torch.rand((batch, 1) + spatial, generator=generator)
    ddf = torch.randn((batch, dims) + spatial, generator=generator)
    velocity = torch.randn((batch, dims) + spatial, generator=generator)
    return warped, fixed, ddf, velocity


def make_hyper(regularizer, batch=3, seed=1):
    # rows summing to at most 1, as the hypermorph weighting needs
    columns = 2 if regularizer == "elastic" else 1
    return torch.rand(batch, columns, generator=torch.Generator().manual_seed(seed)) / columns


@pytest.mark.parametrize("regularizer, weighting, regularize", CASES)
def test_batch_is_mean_of_per_sample_losses(regularizer, weighting, regularize):
    warped, fixed, ddf, velocity = make_batch()
    hyper = make_hyper(regularizer)
    loss = make_loss(regularizer, weighting, regularize=regularize)
    singles = torch.stack(
        [
            loss(warped[b : b + 1], fixed[b : b + 1], ddf[b : b + 1], hyper[b : b + 1], velocity[b : b + 1])
            for b in range(3)
        ]
    )
    torch.testing.assert_close(loss(warped, fixed, ddf, hyper, velocity), singles.mean())
    per_sample = make_loss(regularizer, weighting, regularize=regularize, reduction="none")
    torch.testing.assert_close(per_sample(warped, fixed, ddf, hyper, velocity), singles)
    summed = make_loss(regularizer, weighting, regularize=regularize, reduction="sum")
    torch.testing.assert_close(summed(warped, fixed, ddf, hyper, velocity), singles.sum())
    # the hyperparameters really act per sample: permuting them changes the per-sample losses
    permuted = per_sample(warped, fixed, ddf, hyper.roll(1, 0), velocity)
    assert not torch.allclose(permuted, singles)


@pytest.mark.parametrize("regularizer", ["elastic", "diffusion", "elastic_fixed"])
@pytest.mark.parametrize("weighting", ["paper", "hypermorph"])
def test_components_match_their_definitions(regularizer, weighting):
    warped, fixed, ddf, _ = make_batch(spatial=(12, 10))
    hyper = make_hyper(regularizer)
    loss = make_loss(regularizer, weighting, spatial_dims=2, reduction="none")
    parts = loss(warped, fixed, ddf, hyper, return_components=True)
    assert set(parts) == {"loss", "similarity", "regularization"}
    ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=9)
    expected_similarity = torch.stack([ncc(warped[b : b + 1], fixed[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(parts["similarity"], expected_similarity)
    if regularizer == "elastic":
        expected_regularization = elastic_energy(ddf, hyper[:, 0], hyper[:, 1])
    elif regularizer == "elastic_fixed":
        expected_regularization = hyper[:, 0] * elastic_energy(ddf, FIXED_LAM, FIXED_MU)
    else:
        expected_regularization = hyper[:, 0] * torch.stack([DiffusionLoss()(ddf[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(parts["regularization"], expected_regularization)
    weight = 1 - hyper.sum(1) if weighting == "hypermorph" else 1.0
    torch.testing.assert_close(parts["loss"], weight * expected_similarity + expected_regularization)
    reduced = make_loss(regularizer, weighting, spatial_dims=2)(warped, fixed, ddf, hyper, return_components=True)
    for key, value in parts.items():
        torch.testing.assert_close(reduced[key], value.mean())


@pytest.mark.parametrize("weighting", ["paper", "hypermorph"])
def test_aligned_images_give_lower_loss(weighting):
    warped, fixed, ddf, _ = make_batch(spatial=(12, 12, 12))
    hyper = make_hyper("elastic")
    loss = make_loss("elastic", weighting, reduction="none")
    aligned = loss(fixed, fixed, ddf, hyper, return_components=True)
    misaligned = loss(warped, fixed, ddf, hyper, return_components=True)
    assert (aligned["loss"] < misaligned["loss"]).all()
    torch.testing.assert_close(aligned["similarity"], -torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(aligned["regularization"], misaligned["regularization"])


def test_zero_hyper_leaves_similarity_only():
    warped, fixed, ddf, _ = make_batch(spatial=(10, 9))
    for regularizer in ("elastic", "diffusion", "elastic_fixed"):
        hyper = torch.zeros(3, 2 if regularizer == "elastic" else 1)
        parts = make_loss(regularizer, spatial_dims=2)(warped, fixed, ddf, hyper, return_components=True)
        assert parts["regularization"].item() == 0.0
        torch.testing.assert_close(parts["loss"], parts["similarity"])


def test_velocity_mode_regularizes_the_velocity():
    warped, fixed, ddf, velocity = make_batch(spatial=(9, 10, 8))
    hyper = make_hyper("elastic")
    loss = make_loss("elastic", regularize="velocity", reduction="none")
    parts = loss(warped, fixed, ddf, hyper, velocity, return_components=True)
    torch.testing.assert_close(parts["regularization"], elastic_energy(velocity, hyper[:, 0], hyper[:, 1]))
    torch.testing.assert_close(loss(warped, fixed, torch.zeros_like(ddf), hyper, velocity), parts["loss"])
    displacement = make_loss("elastic", reduction="none")(warped, fixed, ddf, hyper, velocity, return_components=True)
    torch.testing.assert_close(displacement["regularization"], elastic_energy(ddf, hyper[:, 0], hyper[:, 1]))
    with pytest.raises(ValueError, match="velocity"):
        loss(warped, fixed, ddf, hyper)


def test_single_hyper_row_is_shared_by_the_batch():
    warped, fixed, ddf, _ = make_batch(spatial=(10, 10))
    loss = make_loss("elastic", spatial_dims=2, reduction="none")
    row = torch.tensor([[0.3, 0.2]])
    torch.testing.assert_close(loss(warped, fixed, ddf, row), loss(warped, fixed, ddf, row.expand(3, 2)))


def test_gradients_flow_to_the_displacement():
    warped, fixed, ddf, _ = make_batch(spatial=(10, 10))
    warped.requires_grad_(True)
    ddf.requires_grad_(True)
    make_loss("elastic", spatial_dims=2)(warped, fixed, ddf, make_hyper("elastic")).backward()
    assert torch.isfinite(ddf.grad).all() and ddf.grad.abs().sum() > 0
    assert torch.isfinite(warped.grad).all() and warped.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "regularizer, hyper, match",
    [
        ("elastic", torch.full((3, 1), 0.1), r"shape \(B, 2\) with columns \[lam, mu\]"),
        ("diffusion", torch.full((3, 2), 0.1), r"shape \(B, 1\) with columns \[alpha\]"),
        ("elastic_fixed", torch.full((2, 1), 0.1), "batch size 3"),
        ("elastic", torch.full((3,), 0.1), r"shape \(B, 2\)"),
        ("elastic", torch.tensor([[0.1, -0.1]] * 3), "non-negative"),
        ("diffusion", torch.full((3, 1), float("nan")), "finite"),
    ],
)
def test_invalid_hyper(regularizer, hyper, match):
    warped, fixed, ddf, _ = make_batch(spatial=(10, 10))
    with pytest.raises(ValueError, match=match):
        make_loss(regularizer, spatial_dims=2)(warped, fixed, ddf, hyper)


def test_hypermorph_weighting_rejects_negative_similarity_weight():
    warped, fixed, ddf, _ = make_batch(spatial=(10, 10))
    with pytest.raises(ValueError, match="row sum"):
        make_loss("elastic", "hypermorph", spatial_dims=2)(warped, fixed, ddf, torch.full((3, 2), 0.6))


def test_invalid_inputs():
    warped, fixed, ddf, velocity = make_batch(spatial=(10, 10))
    loss = make_loss("elastic", spatial_dims=2)
    hyper = make_hyper("elastic")
    with pytest.raises(ValueError, match="batch size"):
        loss(warped[:2], fixed[:2], ddf, hyper)
    with pytest.raises(ValueError, match="spatial dimensions"):
        make_loss("elastic", spatial_dims=3)(warped, fixed, ddf, hyper)
    with pytest.raises(ValueError, match="batch size"):
        make_loss("elastic", spatial_dims=2, regularize="velocity")(warped, fixed, ddf, hyper, velocity[:1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(regularizer="bending"), "regularizer must be one of"),
        (dict(weighting="alpha"), "weighting must be one of"),
        (dict(regularize="jacobian"), "regularize must be one of"),
        (dict(reduction="max"), "Unsupported reduction"),
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(regularizer="elastic_fixed", fixed_lam=0.1), "fixed_mu"),
        (dict(regularizer="elastic_fixed", fixed_lam=-0.1, fixed_mu=0.1), "fixed_lam"),
        (dict(regularizer="elastic", fixed_lam=0.1, fixed_mu=0.1), "elastic_fixed"),
        (dict(regularizer="diffusion", spacing=(1.0, 1.0, 1.0)), "spacing"),
        (dict(spacing=(1.0, 1.0)), "spacing"),
    ],
)
def test_invalid_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegistrationLoss(**kwargs)
