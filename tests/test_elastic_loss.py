import math

import pytest
import torch

from elastic_hypermorph_bundle.losses import ElasticLoss, elastic_energy

DTYPE = torch.float64


def linear_field(matrix, shape, translation=None):
    """u(x) = A x + t on a grid of voxel coordinates, as a (1, D, *shape) DDF: u_j = sum_i A[j, i] x_i + t_j."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=DTYPE) for n in shape], indexing="ij"))
    field = torch.einsum("ji,i...->j...", matrix, grid)
    if translation is not None:
        field = field + translation.reshape((-1,) + (1,) * len(shape))
    return field[None]


def analytic_energy(matrix, lam, mu):
    return mu / 4 * (matrix + matrix.T).square().sum() + lam / 2 * torch.trace(matrix) ** 2


SHAPES = [(2, 2), (5, 7), (9, 4), (2, 2, 2), (3, 4, 6), (7, 2, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_field_energy_is_exact(shape):
    generator = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    dims = len(shape)
    for _ in range(3):
        matrix = torch.randn(dims, dims, generator=generator, dtype=DTYPE)
        lam, mu = torch.rand(2, generator=generator, dtype=DTYPE).tolist()
        translation = torch.randn(dims, generator=generator, dtype=DTYPE)
        value = elastic_energy(linear_field(matrix, shape, translation), lam, mu)
        assert value.shape == (1,)
        torch.testing.assert_close(value[0], analytic_energy(matrix, lam, mu))


@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 3)])
def test_per_sample_lame_parameters(shape):
    generator = torch.Generator().manual_seed(7)
    dims, batch = len(shape), 4
    matrices = torch.randn(batch, dims, dims, generator=generator, dtype=DTYPE)
    lam = torch.rand(batch, generator=generator, dtype=DTYPE) * 5
    mu = torch.rand(batch, generator=generator, dtype=DTYPE)
    ddf = torch.cat([linear_field(m, shape) for m in matrices])
    expected = torch.stack([analytic_energy(m, l, u) for m, l, u in zip(matrices, lam, mu)])
    torch.testing.assert_close(elastic_energy(ddf, lam, mu), expected)
    torch.testing.assert_close(ElasticLoss(dims, reduction="none")(ddf, lam, mu), expected)
    # lam and mu act linearly and separately: the energy is lam * volume term + mu * shear term
    one = torch.ones(batch, dtype=DTYPE)
    split = lam * elastic_energy(ddf, one, 0.0) + mu * elastic_energy(ddf, 0.0, one)
    torch.testing.assert_close(elastic_energy(ddf, lam, mu), split)


def test_component_j_pairs_with_axis_j():
    # u_0 = x_0 + 2 x_1, u_1 = 0: div u = 1 and sum_ij (d_i u_j + d_j u_i)^2 = 2^2 + 2^2 + 2^2 = 12, so with
    # lam = mu = 1 the energy is 12/4 + 1/2 = 3.5. Pairing channel j with axis D-1-j (as the original TF code did)
    # sees A = [[0, 0], [1, 2]]: 18/4 + 4/2 = 6.5.
    matrix = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=DTYPE)
    ddf = linear_field(matrix, (5, 6))
    assert elastic_energy(ddf, 1.0, 1.0).item() == pytest.approx(3.5)
    assert elastic_energy(ddf.flip(1), 1.0, 1.0).item() == pytest.approx(6.5)


@pytest.mark.parametrize("shape", [(6, 8), (4, 5, 6)])
def test_translation_and_infinitesimal_rotation_cost_nothing(shape):
    generator = torch.Generator().manual_seed(3)
    dims = len(shape)
    skew = torch.randn(dims, dims, generator=generator, dtype=DTYPE)
    skew = skew - skew.T
    translation = torch.randn(dims, generator=generator, dtype=DTYPE)
    zero = torch.zeros(dims, dims, dtype=DTYPE)
    for matrix in (skew, zero):
        value = elastic_energy(linear_field(matrix, shape, translation), 3.0, 2.0)
        torch.testing.assert_close(value, torch.zeros(1, dtype=DTYPE))


@pytest.mark.parametrize("dims", [2, 3])
def test_stretch_is_penalised(dims):
    stretch = torch.diag(torch.linspace(0.1, 0.3, dims, dtype=DTYPE))
    ddf = linear_field(stretch, (5,) * dims)
    shear_only = elastic_energy(ddf, 0.0, 1.0)
    volume_only = elastic_energy(ddf, 1.0, 0.0)
    assert shear_only.item() == pytest.approx(stretch.diagonal().square().sum().item())  # mu/4 * sum (2 e_i)^2
    assert volume_only.item() == pytest.approx(stretch.trace().item() ** 2 / 2)
    # an incompressible (trace-free) stretch costs shear energy only
    squeeze = torch.diag(torch.tensor([0.2, -0.2] + [0.0] * (dims - 2), dtype=DTYPE))
    ddf = linear_field(squeeze, (5,) * dims)
    assert elastic_energy(ddf, 1.0, 0.0).item() == pytest.approx(0.0, abs=1e-12)
    assert elastic_energy(ddf, 0.0, 1.0).item() > 0


def test_spacing_gives_physical_strain():
    spacing = (0.5, 2.0, 1.5)
    scale = torch.tensor(spacing, dtype=DTYPE)
    generator = torch.Generator().manual_seed(11)
    physical = torch.randn(3, 3, generator=generator, dtype=DTYPE) * 0.1
    # a voxel-unit field whose physical gradient (mm displacement per mm) is `physical`:
    # U_j[mm] = s_j u_j and X_i[mm] = s_i x_i, so A = S^-1 G S
    voxel = physical * scale[None, :] / scale[:, None]
    ddf = linear_field(voxel, (4, 5, 3))
    expected = analytic_energy(physical, 0.7, 0.3)
    torch.testing.assert_close(elastic_energy(ddf, 0.7, 0.3, spacing=spacing)[0], expected)
    torch.testing.assert_close(ElasticLoss(3, spacing=spacing)(ddf, 0.7, 0.3), expected)
    # a physical rotation is free, although in voxel units (anisotropic spacing) its gradient is not skew
    rotation = physical - physical.T
    ddf = linear_field(rotation * scale[None, :] / scale[:, None], (4, 5, 3))
    assert elastic_energy(ddf, 0.7, 0.3, spacing=spacing).item() == pytest.approx(0.0, abs=1e-12)
    assert elastic_energy(ddf, 0.7, 0.3).item() > 1e-4
    # unit spacing is the default
    torch.testing.assert_close(elastic_energy(ddf, 0.7, 0.3, spacing=(1.0, 1.0, 1.0)), elastic_energy(ddf, 0.7, 0.3))


@pytest.mark.parametrize("shape", [(24, 20), (20, 16, 18)])
def test_identity_with_diffusion_for_compactly_supported_field(shape):
    # with zero boundary values: int mu/4 sum (d_i u_j + d_j u_i)^2 = mu/2 int |grad u|^2 + mu/2 int (div u)^2
    generator = torch.Generator().manual_seed(5)
    dims = len(shape)
    coefficients = torch.randn(dims, dims, generator=generator, dtype=DTYPE)
    offsets = torch.randn(dims, generator=generator, dtype=DTYPE)
    axes = [torch.arange(n, dtype=DTYPE) / (n - 1) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).requires_grad_(True)
    bump = math.prod(torch.sin(math.pi * grid[k]) ** 2 for k in range(dims))
    field = bump * (torch.einsum("ji,i...->j...", coefficients, grid) + offsets.reshape((-1,) + (1,) * dims))
    # exact derivatives per voxel at the grid points: d/dx_i = d/dt_i / (n_i - 1)
    jacobian = torch.stack(
        [torch.autograd.grad(field[j].sum(), grid, retain_graph=True)[0] for j in range(dims)]
    ) / torch.tensor([n - 1 for n in shape], dtype=DTYPE).reshape((1, dims) + (1,) * dims)
    interior = (slice(None), slice(None)) + (slice(0, -1),) * dims
    jacobian = jacobian[interior]
    gradient_norm = jacobian.square().sum((0, 1)).mean()
    divergence = jacobian.diagonal(dim1=0, dim2=1).sum(-1)
    expected = gradient_norm / 2 + divergence.square().mean() / 2
    value = elastic_energy(field.detach()[None], 0.0, 1.0)[0]
    assert value.item() == pytest.approx(expected.item(), rel=0.03)
    # the identity needs the integration by parts: pointwise, sum_ij d_i u_j d_j u_i differs from (div u)^2
    cross = (jacobian * jacobian.transpose(0, 1)).sum((0, 1))
    assert (cross - divergence.square()).abs().max() > 0.2 * expected


@pytest.mark.parametrize("shape", [(3, 4), (3, 2, 3)])
def test_gradcheck(shape):
    generator = torch.Generator().manual_seed(0)
    dims = len(shape)
    ddf = torch.randn((2, dims) + shape, generator=generator, dtype=DTYPE, requires_grad=True)
    lam = torch.rand(2, generator=generator, dtype=DTYPE).requires_grad_(True)
    mu = torch.rand(2, generator=generator, dtype=DTYPE).requires_grad_(True)
    spacing = (0.5, 2.0, 1.5)[:dims]
    assert torch.autograd.gradcheck(lambda u, a, b: elastic_energy(u, a, b, spacing), (ddf, lam, mu))


def test_half_precision_field_sums_in_float32():
    """A float16 field (a network's output under autocast) whose summed squared strains exceed float16's range
    (65504) still gives the float32 energy: the sums are taken in float32."""
    matrix = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.5, 0.0], [0.0, 0.0, 1.0]], dtype=DTYPE)
    field = linear_field(matrix, (32, 32, 32))
    expected = analytic_energy(matrix, 0.5, 1.0).float()
    # the squared strains' sum over the cells, which a float16 sum would overflow
    assert analytic_energy(matrix, 0.5, 1.0) * 31 ** 3 > 65504
    energy = elastic_energy(field.half(), 0.5, 1.0)
    assert energy.dtype == torch.float32
    torch.testing.assert_close(energy[0], expected, rtol=1e-3, atol=0)


def test_reductions_and_dtype():
    generator = torch.Generator().manual_seed(1)
    ddf = torch.randn(3, 2, 5, 6, generator=generator)
    lam, mu = torch.tensor([0.1, 0.5, 2.0]), torch.tensor([0.3, 0.0, 1.0])
    per_sample = ElasticLoss(2, reduction="none")(ddf, lam, mu)
    assert per_sample.shape == (3,) and per_sample.dtype == torch.float32
    torch.testing.assert_close(ElasticLoss(2, reduction="mean")(ddf, lam, mu), per_sample.mean())
    torch.testing.assert_close(ElasticLoss(2, reduction="sum")(ddf, lam, mu), per_sample.sum())
    torch.testing.assert_close(ElasticLoss(2)(ddf, lam, mu), per_sample.mean())
    # scalars (numbers or 0-d tensors) are shared by the batch
    torch.testing.assert_close(
        ElasticLoss(2, reduction="none")(ddf, 0.5, torch.tensor(0.25)),
        ElasticLoss(2, reduction="none")(ddf, torch.full((3,), 0.5), torch.full((3,), 0.25)),
    )


@pytest.mark.parametrize(
    "ddf, lam, mu, match",
    [
        (torch.zeros(2, 3, 4, 4), 1.0, 1.0, "channel"),
        (torch.zeros(2, 2, 4, 1), 1.0, 1.0, "at least 2"),
        (torch.zeros(2, 2, 4, 4), -0.1, 1.0, "lam must be non-negative"),
        (torch.zeros(2, 2, 4, 4), 1.0, torch.tensor([0.1, -0.1]), "mu must be non-negative"),
        (torch.zeros(2, 2, 4, 4), torch.ones(3), 1.0, r"lam must be a number or a tensor of shape \(B,\)"),
        (torch.zeros(2, 2, 4, 4), 1.0, torch.ones(2, 1), r"mu must be a number or a tensor of shape \(B,\)"),
        (torch.zeros(2, 2, 4, 4), math.nan, 1.0, "lam must be finite"),
        (torch.zeros(2, 2, 4, 4).index_fill_(2, torch.tensor([1]), math.nan), 1.0, 1.0, "non-finite"),
        (torch.zeros(2, 2, 4, 4).index_fill_(3, torch.tensor([0]), math.inf), 1.0, 1.0, "non-finite"),
        (torch.zeros(2, 4), 1.0, 1.0, "shape"),
    ],
)
def test_invalid_inputs(ddf, lam, mu, match):
    with pytest.raises(ValueError, match=match):
        elastic_energy(ddf, lam, mu)


def test_invalid_configuration():
    with pytest.raises(ValueError, match="Unsupported reduction"):
        ElasticLoss(3, reduction="max")
    with pytest.raises(ValueError, match="spatial_dims"):
        ElasticLoss(4)
    with pytest.raises(ValueError, match="spacing"):
        ElasticLoss(3, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        ElasticLoss(2, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        elastic_energy(torch.zeros(1, 2, 3, 3), 1.0, 1.0, spacing=(1.0,))
    with pytest.raises(ValueError, match="spatial dimensions"):
        ElasticLoss(3)(torch.zeros(1, 2, 4, 4), 1.0, 1.0)
