import numpy as np
import pytest
import scipy.ndimage
import torch

from elastic_hypermorph_bundle.metrics import (
    JACOBIAN_BORDER,
    dice_per_label,
    folding_percent,
    jacobian_determinant,
    sample_field_at_points,
    sd_log_jacobian,
    target_registration_error,
    warp_points,
)

SHAPES = {2: (6, 9), 3: (5, 7, 9)}  # non-square grids catch axis-order mistakes


def identity_grid(shape):
    """(D, *shape) voxel coordinates in array order."""
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))


def linear_ddf(matrix, shape, shift=None):
    """(1, D, *shape) field u(x) = A x + b."""
    grid = identity_grid(shape)
    u = torch.einsum("ij,j...->i...", torch.as_tensor(matrix, dtype=torch.float64), grid)
    if shift is not None:
        u = u + torch.as_tensor(shift, dtype=torch.float64).view(-1, *([1] * len(shape)))
    return u.unsqueeze(0)


def interior_shape(shape):
    return tuple(s - 2 * JACOBIAN_BORDER for s in shape)


def local_fold_ddf(shape=(9, 10, 11)):
    """3D field whose x-displacement decreases by 3 voxels per voxel around the centre: det(I + grad u) < 0 there."""
    ddf = torch.zeros(1, 3, *shape, dtype=torch.float64)
    ddf[0, 0, 4:6] = torch.tensor([0.0, -3.0], dtype=torch.float64).view(2, 1, 1)
    ddf[0, 0, 6:] = -3.0
    return ddf


@pytest.mark.parametrize("dims", [2, 3])
def test_jacobian_identity_is_one_on_interior(dims):
    shape = SHAPES[dims]
    jac = jacobian_determinant(torch.zeros(2, dims, *shape))
    assert jac.shape == (2, *interior_shape(shape))
    assert torch.allclose(jac, torch.ones_like(jac))


@pytest.mark.parametrize("dims", [2, 3])
def test_jacobian_of_linear_field_is_det_of_identity_plus_matrix(dims):
    generator = torch.Generator().manual_seed(dims)
    matrix = 0.3 * torch.randn(dims, dims, generator=generator, dtype=torch.float64)
    ddf = linear_ddf(matrix, SHAPES[dims], shift=torch.randn(dims, generator=generator, dtype=torch.float64))
    jac = jacobian_determinant(ddf)
    expected = torch.linalg.det(torch.eye(dims, dtype=torch.float64) + matrix)
    assert torch.allclose(jac, expected.expand_as(jac))
    # a field varying along the last axis only: reversed axes or channels would give 1.5 instead of 0.75
    single = torch.zeros(dims, dims, dtype=torch.float64)
    single[0, dims - 1] = 0.5  # u_0 = 0.5 * x_last: shear, J = 1
    single[dims - 1, dims - 1] = -0.25  # u_last = -0.25 * x_last: compression, J = 0.75
    jac = jacobian_determinant(linear_ddf(single, SHAPES[dims]))
    assert torch.allclose(jac, torch.tensor(0.75, dtype=torch.float64))


def test_jacobian_matches_independent_scipy_stencil_reference():
    """Learn2Reg's definition: correlate with [-1/2, 0, 1/2] (zero padded) and crop 2 voxels per side."""
    shape = (7, 8, 9)
    rng = np.random.default_rng(0)
    ddf = scipy.ndimage.gaussian_filter(rng.normal(size=(3, *shape)), sigma=(0, 1, 1, 1)) * 3
    grad = np.empty((3, 3, *shape))  # grad[i, j] = d u_i / d x_j
    for j in range(3):
        kernel = np.array([-0.5, 0.0, 0.5]).reshape([3 if k == j else 1 for k in range(3)])
        for i in range(3):
            grad[i, j] = scipy.ndimage.correlate(ddf[i], kernel, mode="constant", cval=0.0)
    jacobian = (grad + np.eye(3).reshape(3, 3, 1, 1, 1))[:, :, 2:-2, 2:-2, 2:-2]
    expected = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
    result = jacobian_determinant(torch.from_numpy(ddf).unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-12)
    # SDlogJ, also with the official script's +3 shift and with a mask
    ddf = torch.from_numpy(ddf)[None]
    log_jacobian = np.log(np.clip(expected, 1e-9, 1e9))
    np.testing.assert_allclose(sd_log_jacobian(ddf).item(), log_jacobian.std())
    np.testing.assert_allclose(sd_log_jacobian(ddf, offset=3.0).item(), np.log(np.clip(expected + 3, 1e-9, 1e9)).std())
    mask = np.zeros(shape)
    mask[1:5, 2:7, 3:8] = 1
    masked = np.ma.MaskedArray(log_jacobian, 1 - mask[2:-2, 2:-2, 2:-2]).std()
    np.testing.assert_allclose(sd_log_jacobian(ddf, mask=torch.from_numpy(mask)[None, None]).item(), masked)


def test_jacobian_runs_in_float32_and_keeps_dtype():
    jac = jacobian_determinant(torch.zeros(1, 3, 5, 6, 7))
    assert jac.dtype == torch.float32 and jac.shape == (1, 1, 2, 3)


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 8, 8), "D = number of spatial axes"), ((1, 2, 8, 8, 8), "D = number of spatial axes"),
     ((3, 8, 8, 8), "D = number of spatial axes"), ((1, 3, 8, 4, 8), "at least 5 voxels")],
)
def test_jacobian_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        jacobian_determinant(torch.zeros(shape))


def test_folding_percent_zero_for_identity_and_smooth_fields():
    assert torch.equal(folding_percent(torch.zeros(2, 3, 5, 7, 9)), torch.zeros(2))
    ddf = linear_ddf(0.2 * torch.eye(3), (5, 7, 9))
    assert folding_percent(ddf).item() == 0.0


def test_folding_percent_counts_local_fold():
    ddf = local_fold_ddf()
    jac = jacobian_determinant(ddf)
    expected = 100.0 * (jac <= 0).double().mean()
    percent = folding_percent(ddf)
    assert percent.shape == (1,) and 0 < percent.item() < 100
    assert torch.isclose(percent[0], expected)
    # du_0/dx = -1.5 (J = -0.5) at x = 4, 5 and 0 elsewhere: 2 of the 5 interior slices x = 2..6 fold
    assert torch.isclose(percent[0], torch.tensor(40.0, dtype=torch.float64))


def test_folding_percent_with_mask():
    ddf = local_fold_ddf().repeat(2, 1, 1, 1, 1)
    mask = torch.zeros(2, 1, 9, 10, 11)
    mask[0, 0, :4] = 1  # unfolded side (x = 0, 1 are cropped, x = 2, 3 scored)
    mask[1, 0, 4:6] = 1  # the folded slab x = 4, 5 only
    assert torch.equal(folding_percent(ddf, mask), torch.tensor([0.0, 100.0], dtype=torch.float64))
    assert torch.isnan(folding_percent(ddf, torch.zeros(1, 1, 9, 10, 11))).all()
    with pytest.raises(ValueError, match="mask must have shape"):
        folding_percent(ddf, torch.ones(1, 1, 9, 10, 12))


def test_sd_log_jacobian_zero_for_identity_and_constant_scaling():
    assert torch.allclose(sd_log_jacobian(torch.zeros(2, 3, 5, 7, 9)), torch.zeros(2))
    scaling = linear_ddf(-0.3 * torch.eye(3), (5, 7, 9), shift=[1.0, 2.0, -1.0])  # J = 0.7^3 everywhere
    assert torch.allclose(sd_log_jacobian(scaling), torch.zeros(1, dtype=torch.float64), atol=1e-12)


def test_sd_log_jacobian_positive_for_nonuniform_field_and_finite_with_folds():
    values = sd_log_jacobian(local_fold_ddf())
    assert torch.isfinite(values).all() and values.item() > 1.0  # folded voxels are clipped to log(1e-9)


def test_dice_per_label_analytic_multi_label():
    target = torch.tensor([[1, 1, 2, 2], [0, 0, 2, 2], [3, 3, 0, 0]]).view(1, 1, 3, 4)
    pred = torch.tensor([[1, 0, 2, 2], [0, 0, 2, 0], [0, 0, 0, 5]]).view(1, 1, 3, 4)
    dice = dice_per_label(pred, target)  # default labels: 1, 2, 3 (nonzero in target)
    expected = torch.tensor([[2 * 1 / (1 + 2), 2 * 3 / (3 + 4), 0.0]])
    assert torch.allclose(dice, expected)
    assert torch.allclose(dice_per_label(target, target), torch.ones(1, 3))


def test_dice_per_label_empty_cases_and_explicit_labels():
    target = torch.zeros(2, 1, 3, 3, 3, dtype=torch.int64)
    pred = torch.zeros_like(target)
    target[0, 0, 0] = 1
    pred[1, 0, 1] = 2
    dice = dice_per_label(pred, target, labels=[1, 2, 7])
    # sample 0: label 1 only in target -> 0; label 2 absent in both -> 1; sample 1: label 2 only in pred -> 0
    assert torch.equal(dice, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))
    assert dice_per_label(pred.float(), target, labels=[2]).shape == (2, 1)


def test_dice_per_label_rejects_bad_inputs():
    target = torch.ones(1, 1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="same shape"):
        dice_per_label(torch.ones(1, 1, 4, 5), target)
    with pytest.raises(ValueError, match="integer label values"):
        dice_per_label(torch.full((1, 1, 4, 4), 0.5), target)
    with pytest.raises(ValueError, match="non-empty"):
        dice_per_label(target, torch.zeros_like(target))


@pytest.mark.parametrize("dims", [2, 3])
def test_sample_field_exact_at_voxel_centres(dims):
    shape = SHAPES[dims]
    field = torch.randn(dims, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    index = torch.stack([torch.randint(0, s, (20,), generator=torch.Generator().manual_seed(s)) for s in shape], 1)
    values = sample_field_at_points(field, index.double())
    assert values.shape == (20, dims)
    assert torch.allclose(values, field[(slice(None), *index.T)].T)


@pytest.mark.parametrize("dims", [2, 3])
def test_sample_field_is_exact_for_linear_field_between_voxels(dims):
    shape = SHAPES[dims]
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(dims, dims, generator=generator, dtype=torch.float64)
    shift = torch.randn(dims, generator=generator, dtype=torch.float64)
    field = linear_ddf(matrix, shape, shift)[0]
    points = torch.rand(50, dims, generator=generator, dtype=torch.float64) * (torch.tensor(shape) - 1)
    assert torch.allclose(sample_field_at_points(field, points), points @ matrix.T + shift)


def test_sample_field_matches_scipy_linear_interpolation_and_clamps_outside():
    field = np.random.default_rng(3).normal(size=(3, 5, 7, 9))
    points = np.array([[0.3, 5.5, 2.25], [4.0, 0.0, 8.0], [-2.0, 3.5, 11.0], [6.5, -1.0, 4.2]])
    expected = np.stack([scipy.ndimage.map_coordinates(c, points.T, order=1, mode="nearest") for c in field], 1)
    np.testing.assert_allclose(sample_field_at_points(torch.from_numpy(field), points).numpy(), expected, atol=1e-12)


def test_sample_field_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"pass ddf\[b\]"):
        sample_field_at_points(torch.zeros(1, 3, 4, 4, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        sample_field_at_points(torch.zeros(3, 4, 4, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least 2 voxels"):
        sample_field_at_points(torch.zeros(2, 1, 4), torch.zeros(2, 2))


def test_warp_points_adds_interpolated_displacement():
    field = linear_ddf(torch.zeros(3, 3), (5, 7, 9), shift=[1.0, -2.0, 0.5])[0]
    points = torch.tensor([[1.0, 2.0, 3.0], [0.5, 6.0, 8.0]], dtype=torch.float64)
    assert torch.allclose(warp_points(field, points), points + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))


def test_tre_zero_field_is_scaled_distance():
    fixed = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 8.0]])
    moving = torch.tensor([[2.0, 2.0, 3.0], [4.0, 3.0, 4.0]])
    tre = target_registration_error(torch.zeros(3, 5, 7, 9), fixed, moving, spacing=(2.0, 1.0, 0.5))
    assert torch.allclose(tre, torch.tensor([2.0, (9.0 + 4.0) ** 0.5]))


def test_tre_zero_for_exact_translation_and_linear_field():
    generator = torch.Generator().manual_seed(4)
    shape = (5, 7, 9)
    fixed = torch.rand(30, 3, generator=generator, dtype=torch.float64) * (torch.tensor(shape) - 1)
    translation = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    field = linear_ddf(torch.zeros(3, 3), shape, translation)[0]
    tre = target_registration_error(field, fixed, fixed + translation, spacing=[0.7, 1.2, 2.5])
    assert tre.shape == (30,) and torch.allclose(tre, torch.zeros(30, dtype=torch.float64), atol=1e-12)
    matrix = 0.1 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    field = linear_ddf(matrix, shape, translation)[0]
    moving = fixed + fixed @ matrix.T + translation
    tre = target_registration_error(field, fixed, moving, [1.0, 1.0, 1.0])
    assert torch.allclose(tre, torch.zeros(30, dtype=torch.float64), atol=1e-12)


def test_tre_accepts_numpy_points_and_rejects_mismatch():
    field = torch.zeros(2, 6, 9)
    tre = target_registration_error(field, np.array([[1.0, 1.0]]), np.array([[4.0, 5.0]]), np.array([1.0, 1.0]))
    assert torch.allclose(tre, torch.tensor([5.0]))
    with pytest.raises(ValueError, match="pair up"):
        target_registration_error(field, torch.zeros(3, 2), torch.zeros(2, 2), [1.0, 1.0])
    with pytest.raises(ValueError, match="spacing must hold 2"):
        target_registration_error(field, torch.zeros(3, 2), torch.zeros(3, 2), [1.0, 1.0, 1.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_run_on_cuda():
    ddf = local_fold_ddf().float().cuda()
    assert folding_percent(ddf).device.type == "cuda"
    assert sd_log_jacobian(ddf).device.type == "cuda"
    tre = target_registration_error(ddf[0], torch.zeros(2, 3), torch.ones(2, 3), [1.0, 1.0, 1.0])
    assert tre.device.type == "cuda"
    labels = torch.ones(1, 1, 4, 4, device="cuda", dtype=torch.int64)
    assert dice_per_label(labels, labels).device.type == "cuda"


def test_pair_metrics_of_a_translation_one_vocabulary():
    """A uniform 1-voxel shift along x: Dice, TRE, Jacobian and energies with known values, under the names that
    evaluation, the sweep and the benchmark share (``metric_columns``)."""
    from elastic_hypermorph_bundle.metrics import metric_columns, pair_metrics

    size = 12
    fixed = torch.zeros(1, 1, size, size, size)
    fixed[..., 3:7, 3:9, 3:9] = 1
    fixed[..., 7:9, 3:9, 3:9] = 2
    moving = torch.roll(fixed, 1, dims=2)  # moving(x + 1) = fixed(x): the shift u = (1, 0, 0) registers it
    ddf = torch.zeros(1, 3, size, size, size)
    ddf[:, 0] = 1.0
    points = torch.tensor([[4.0, 5.0, 5.0], [6.0, 4.0, 7.0]])
    spacing = (2.0, 1.0, 1.0)
    row = pair_metrics(ddf, fixed_mask=fixed, moving_mask=moving, fixed_points=points, moving_points=points + 1.0,
                       spacing=spacing, fixed_image=fixed, moving_image=moving, hyper={"lam": 0.3, "mu": 0.2},
                       before=True)
    assert list(row) == metric_columns([1, 2], with_points=True, before=True)
    assert row["dice_mean"] == row["dice_1"] == row["dice_2"] == pytest.approx(1.0)
    assert row["dice_before"] < 0.9
    # the points move by (1, 1, 1) voxels, the field by (1, 0, 0): |(0, 1, 1) * spacing| = sqrt(2) mm
    assert row["tre_mm"] == pytest.approx(2**0.5) and row["tre_before_mm"] == pytest.approx((4 + 1 + 1) ** 0.5)
    assert row["folding_percent"] == 0.0 and row["sd_log_jacobian"] == pytest.approx(0.0, abs=1e-6)
    assert row["energy_shear"] == row["energy_volume"] == row["elastic_energy"] == 0.0  # a translation costs nothing
    assert row["lncc"] == pytest.approx(1.0, abs=1e-3)
    only_field = pair_metrics(ddf[0], hyper={"alpha": 0.1})  # (D, *spatial) accepted; alpha: no elastic energy
    assert list(only_field) == metric_columns(with_similarity=False) and np.isnan(only_field["elastic_energy"])
    with pytest.raises(ValueError, match="voxel spacing"):
        pair_metrics(ddf, fixed_points=points, moving_points=points)
    with pytest.raises(ValueError, match="one pair"):
        pair_metrics(ddf.expand(2, -1, -1, -1, -1))
