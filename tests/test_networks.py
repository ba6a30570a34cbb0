"""Tests for the hyper-conditioned registration networks and the warping helpers."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF
from torch import nn

from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.losses.elastic import elastic_energy
from elastic_hypermorph_bundle.networks import (
    ConditionalInstanceNormConv,
    HyperConv,
    HyperLocalNet,
    HyperNetwork,
    HyperRegistrationNet,
    HyperUNet,
    hyper_conv,
    warp_image,
    warp_label,
)

SMALL = {
    HyperUNet: dict(
        encoder_features=(4, 8, 8, 8), decoder_features=(8, 8, 8, 8, 8, 4, 4), hyper_hidden=16, hyper_layers=2
    ),
    HyperLocalNet: dict(num_channel_initial=4, hyper_hidden=16, hyper_layers=2),
}
SHAPE = {2: (32, 32), 3: (16, 16, 16)}
NETS = [HyperUNet, HyperLocalNet]
pytestmark = pytest.mark.filterwarnings("ignore:.*Using PyTorch native grid_sample")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_net(cls, spatial_dims=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(spatial_dims=spatial_dims, **{**SMALL[cls], **kwargs})


def randomize_heads(net: nn.Module, std: float = 0.05) -> nn.Module:
    """Replace the near-zero flow heads (the only plain convolutions) by non-trivial ones."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                module.weight.normal_(0.0, std)
    return net


def pair(spatial_dims=2, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 2, *SHAPE[spatial_dims], generator=generator)


def each_row_as_alone(net: nn.Module, x: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """The fields of a batch with one hyperparameter row per sample, checked row by row against the network run on
    that sample and row alone (to float tolerance); returns them."""
    batched = net(x, hyper)
    for b in range(x.shape[0]):
        alone = net(x[b : b + 1], hyper[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())
    return batched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls", NETS)
def test_output_shape_and_near_identity(cls, spatial_dims, device):
    net = make_net(cls, spatial_dims).to(device)
    x = pair(spatial_dims, batch=2).to(device)
    ddf = net(x, torch.tensor([[0.1, 0.9], [0.7, 0.2]], device=device))
    assert ddf.shape == (2, spatial_dims, *SHAPE[spatial_dims])
    assert ddf.device == x.device and ddf.dtype == x.dtype
    # the flow head starts at N(0, 1e-5^2): an untrained network is (nearly) the identity transform
    assert 0 < ddf.abs().max() < 1e-2
    assert net(x).shape == ddf.shape  # default hyper: single tensor in, single tensor out


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls", NETS)
def test_per_sample_hyper_equals_separate_runs(cls, spatial_dims):
    net = randomize_heads(make_net(cls, spatial_dims))
    x = pair(spatial_dims, batch=3)
    each_row_as_alone(net, x, torch.tensor([[0.0, 1.0], [0.5, 0.5], [2.0, 0.1]]))


@pytest.mark.parametrize("cls", NETS)
def test_hyper_changes_output(cls):
    net = randomize_heads(make_net(cls))
    x = pair()
    low, high = net(x, torch.tensor([[0.0, 0.0]])), net(x, torch.tensor([[1.0, 1.0]]))
    assert (low - high).abs().mean() > 0.1 * low.abs().mean()


@pytest.mark.parametrize("cls", NETS)
def test_shared_hyper_fast_path_equals_repeated(cls):
    net = randomize_heads(make_net(cls))
    x = pair(batch=3)
    hyper = torch.tensor([[0.3, 0.8]])
    shared = net(x, hyper)
    torch.testing.assert_close(shared, net(x, hyper.repeat(3, 1)), rtol=1e-4, atol=1e-4 * shared.abs().max().item())


@pytest.mark.parametrize("cls", NETS)
def test_generate_weights_reuse(cls):
    net = randomize_heads(make_net(cls))
    x = pair(batch=2)
    for hyper in (torch.tensor([[0.3, 0.8]]), torch.tensor([[0.3, 0.8], [1.5, 0.1]])):
        weights = net.generate_weights(hyper)
        torch.testing.assert_close(net(x, weights=weights), net(x, hyper))
    with pytest.raises(ValueError, match="either hyper or weights"):
        net(x, hyper, weights=weights)


def test_generated_kernels_have_conv_scale():
    torch.manual_seed(0)
    hypernet = HyperNetwork(hyper_dims=2)
    assert len([m for m in hypernet.modules() if isinstance(m, nn.Linear)]) == 6  # HyperMorph default depth
    embedding = hypernet(torch.rand(8, 2))
    assert embedding.shape == (8, 128) and (embedding >= 0).all()
    for spatial_dims, in_channels, out_channels in [(3, 2, 16), (3, 64, 32), (2, 16, 16)]:
        for rank in (None, 4):
            _check_kernel_scale(HyperConv(spatial_dims, in_channels, out_channels, 128, rank=rank), embedding)


def _check_kernel_scale(layer, embedding):
    out_channels, in_channels, *kernel = layer.kernel_shape
    spatial_dims = len(kernel)
    weight, bias = layer.generate(embedding)
    assert weight.shape == (8, out_channels, in_channels) + (3,) * spatial_dims and bias.shape == (8, out_channels)
    he_std = math.sqrt(2.0 / (1 + 0.2**2) / (in_channels * 3**spatial_dims))
    assert he_std / 2 < weight.std() < 2 * he_std
    assert bias.abs().max() < he_std
    # the hyperparameter-dependent part is present but small relative to the kernel scale
    spread = (weight - weight.mean(dim=0)).std()
    assert 1e-3 * he_std < spread < 0.5 * he_std


def test_hyper_conv_matches_per_sample_loop():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    weight, bias = torch.randn(3, 5, 4, 3, 3), torch.randn(3, 5)
    expected = torch.cat([F.conv2d(x[b : b + 1], weight[b], bias[b], padding=1) for b in range(3)])
    torch.testing.assert_close(hyper_conv(x, weight, bias), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hyper_conv(x, weight[0], bias[0]), F.conv2d(x, weight[0], bias[0], padding=1))
    with pytest.raises(ValueError, match="batch 2"):
        hyper_conv(x, weight[:2], bias[:2])


@pytest.mark.parametrize("cls", NETS)
def test_diffeomorphic_integrates_velocity(cls):
    net = randomize_heads(make_net(cls, diffeomorphic=True), std=0.5)
    x = pair()
    ddf, velocity = net(x, torch.tensor([[0.5, 0.5]]), return_velocity=True)
    assert ddf.shape == velocity.shape == (1, 2, 32, 32)
    assert velocity.abs().max() > 0.5  # non-trivial field, so integration must matter
    assert not torch.allclose(ddf, velocity, atol=1e-2)
    torch.testing.assert_close(ddf, DVF2DDF(num_steps=7)(velocity))
    plain = make_net(cls)
    ddf, field = plain(x, return_velocity=True)
    assert field is ddf


@pytest.mark.parametrize("cls", NETS)
def test_input_validation(cls):
    net = make_net(cls)
    with pytest.raises(ValueError, match=r"\(32, 20\).*divisible by (16|8)"):
        net(torch.rand(1, 2, 32, 20))
    with pytest.raises(ValueError, match="channels"):
        net(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        net(pair(), torch.rand(1, 3))
    with pytest.raises(ValueError, match="batch must be 1 or 2"):
        net(pair(batch=2), torch.rand(3, 2))
    with pytest.raises(ValueError, match="finite"):
        net(pair(), torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="finite"):
        make_net(cls, default_hyper=[float("inf"), 1.0])


@pytest.mark.parametrize(
    "cls, conditioning",
    [(cls, {}) for cls in NETS] + [(HyperUNet, {"conditioning": "instance_norm", "hyper_rank": None})],
)
def test_training_steps_reduce_loss(cls, conditioning):
    """A few Adam steps on a shifted blob, one hyperparameter pair per sample (per-sample path, gradients through
    the grouped convolutions, or through the conditional instance norm's scale and shift): the warped moving image
    approaches the fixed one."""
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))

    def blob(center):
        return torch.exp(-((grid[0] - center[0]) ** 2 + (grid[1] - center[1]) ** 2) / (2 * 4.0**2))[None, None]

    moving, fixed = blob((14.0, 15.0)).repeat(2, 1, 1, 1), blob((16.0, 16.0)).repeat(2, 1, 1, 1)
    x, hyper = torch.cat([moving, fixed], dim=1), torch.tensor([[0.2, 0.8], [0.7, 0.3]])
    net = make_net(cls, **conditioning)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(warp_image(moving, net(x, hyper)), fixed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]


def test_adam_step_moves_generated_kernels_like_a_plain_conv():
    """Equalised learning rate. Adam's first step moves every parameter by lr against the sign of its gradient. A
    generated kernel entry is ``w_i = c_i + g sum_k A_ik e_k`` with ``e >= 0``, so the gradient signs of ``c_i`` and of
    every ``A_ik`` with ``e_k > 0`` agree and ``|dw_i| = lr (1 + g sum_k e_k) = lr (1 + mean(e))`` for ``g = 1 / E``:
    about lr, as for an ordinary convolution, instead of ``lr * sum_k e_k`` (~E times more)."""
    torch.manual_seed(0)
    layer = HyperConv(2, 4, 8, embedding_dims=128)
    embedding = torch.rand(1, 128)
    before = layer.generate(embedding, shared=True)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(2, 4, 16, 16), {layer: before}).square().mean().backward()
    optimizer.step()
    for old, new in zip(before, layer.generate(embedding, shared=True)):
        change = (new - old).abs().detach()
        expected = torch.full_like(change, 1e-3 * (1 + embedding.mean().item()))
        torch.testing.assert_close(change, expected, rtol=1e-2, atol=0)


def test_hyper_scale_normalises_the_hypernetwork_input():
    scaled = randomize_heads(make_net(HyperUNet, hyper_scale=[10.0, 2.0]))
    plain = randomize_heads(make_net(HyperUNet))
    x, hyper = pair(batch=2), torch.tensor([[10.0, 2.0], [3.0, 0.5]])
    torch.testing.assert_close(scaled(x, hyper), plain(x, hyper / torch.tensor([10.0, 2.0])))
    torch.testing.assert_close(scaled.default_hyper, torch.tensor([[5.0, 1.0]]))  # the middle of the ranges
    assert "hyper_scale" in scaled.state_dict()  # trained for it: saved with the weights
    for bad in ([1.0], [1.0, 0.0], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="hyper_scale must hold 2 finite positive values"):
            make_net(HyperUNet, hyper_scale=bad)


@pytest.mark.parametrize("cls", NETS)
def test_state_dict_keeps_the_configured_default_hyper(cls):
    trained = randomize_heads(make_net(cls, default_hyper=[0.9, 0.9]))
    x, hyper = pair(), torch.tensor([[0.3, 0.8]])
    state = trained.state_dict()
    assert "default_hyper" not in state  # the configuration's value, not a trained property
    configured = make_net(cls, seed=1, default_hyper=[0.1, 0.2])
    configured.load_state_dict(state)
    torch.testing.assert_close(configured.default_hyper, torch.tensor([[0.1, 0.2]]))
    torch.testing.assert_close(configured(x, hyper), trained(x, hyper))


TRAIN_SMALL = {
    HyperUNet: dict(encoder_features=(8, 8, 8), decoder_features=(8, 8, 8, 8)),
    HyperLocalNet: dict(num_channel_initial=4, extract_levels=(0, 1, 2)),
}


def discs(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random discs on a 32x32 grid (fixed) and the same discs shifted by up to 2 voxels per axis and resized by
    0.6-1.4 (moving): registering them needs a volume change, which stiffer hyperparameters penalise more."""
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    center = 13 + 6 * torch.rand(batch, 2, 1, 1, generator=generator)
    radius = 6 + 3 * torch.rand(batch, 1, 1, generator=generator)
    shift = 4 * torch.rand(batch, 2, 1, 1, generator=generator) - 2
    scale = 0.6 + 0.8 * torch.rand(batch, 1, 1, generator=generator)

    def disc(c, r):
        return torch.sigmoid(r - (grid - c).norm(dim=1))[:, None]

    return disc(center + shift, radius * scale), disc(center, radius)


@pytest.mark.parametrize("cls", NETS)
def test_adam_training_is_stable_and_learns_the_hyper_conditioning(cls):
    """HyperMorph training at a high learning rate: Adam at lr 1e-3 with the default 128-wide hypernetwork, one
    random [lam, mu] in [0, 10]^2 per sample (hyper_scale 10), the elastic registration loss. The loss must stay
    finite and decrease on held-out pairs, the fields stay at the scale of the discs' motion (no divergence), and at
    test time the stiff end must give smoother fields (lower elastic energy) and the soft end the better similarity."""
    high = 10.0
    torch.manual_seed(0)
    net = cls(spatial_dims=2, hyper_scale=[high, high], **TRAIN_SMALL[cls])
    loss_fn = RegistrationLoss("elastic", spatial_dims=2, kernel_size=7)
    held_out = discs(torch.Generator().manual_seed(1), 8)
    x_held_out = torch.cat(held_out, dim=1)
    hyper_held_out = high * torch.rand(8, 2, generator=torch.Generator().manual_seed(2))

    def held_out_loss() -> float:
        with torch.no_grad():
            ddf = net(x_held_out, hyper_held_out)
            return loss_fn(warp_image(held_out[0], ddf), held_out[1], ddf, hyper_held_out).item()

    initial_loss = held_out_loss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    losses, largest = [], 0.0
    for _ in range(200):
        moving, fixed = discs(generator, 4)
        hyper = high * torch.rand(4, 2, generator=generator)
        ddf = net(torch.cat([moving, fixed], dim=1), hyper)
        loss = loss_fn(warp_image(moving, ddf), fixed, ddf, hyper)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        largest = max(largest, ddf.abs().max().item())
    assert all(math.isfinite(value) for value in losses)
    assert largest < 8.0  # the discs move by at most ~4 voxels
    assert held_out_loss() < initial_loss

    with torch.no_grad():
        soft, stiff = net(x_held_out, torch.tensor([[0.0, 0.0]])), net(x_held_out, torch.tensor([[high, high]]))
        assert elastic_energy(stiff, 1.0, 1.0).mean() < 0.5 * elastic_energy(soft, 1.0, 1.0).mean()
        similarity = [loss_fn.similarity_map(warp_image(held_out[0], ddf), held_out[1]).mean() for ddf in (soft, stiff)]
    assert similarity[0] < similarity[1]  # LNCC loss: lower is better


@pytest.mark.parametrize("diffeomorphic", [False, True])
@pytest.mark.parametrize("cls", NETS)
def test_trace_reproduces_eager(cls, diffeomorphic):
    net = randomize_heads(make_net(cls, diffeomorphic=diffeomorphic)).eval()
    x = pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notice, MONAI Warp's shape checks
        traced = torch.jit.trace(net, x, check_trace=False)  # checked below, against eager
    torch.testing.assert_close(traced(x), net(x))
    if not diffeomorphic:  # the hyper-conv backbones trace without size-specific constants
        other = torch.rand(2, 2, 64, 32)
        torch.testing.assert_close(traced(other), net(other))


def test_torch_export_reproduces_eager():
    net = randomize_heads(make_net(HyperUNet)).eval()
    x = pair()
    exported = torch.export.export(net, (x,))
    torch.testing.assert_close(exported.module()(x), net(x))


def test_warp_helpers_follow_backward_convention():
    image = torch.arange(64.0).reshape(1, 1, 8, 8)
    ddf = torch.zeros(1, 2, 8, 8)
    ddf[:, 0] = 1.0  # warped(x) = moving(x + e_0): one voxel along axis 0
    torch.testing.assert_close(warp_image(image, ddf)[..., :-1, :], image[..., 1:, :])
    labels = torch.randint(0, 3, (1, 1, 8, 8))
    ddf[:, 1] = 0.4  # sub-voxel shift: nearest keeps labels, no blending
    warped = warp_label(labels, ddf)
    assert warped.dtype == labels.dtype
    torch.testing.assert_close(warped[..., :-1, :], labels[..., 1:, :])
    assert (warped[..., -1, :] == 0).all()  # mapped outside the moving image


# ---- conditioning variants: rank-limited kernel map (default), full map, conditional instance norm ----

VARIANTS = [dict(hyper_rank=None), dict(hyper_rank=2), dict(conditioning="instance_norm", hyper_rank=None)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["full", "rank2", "cin"])
def test_variants_per_sample_shared_and_reuse_agree(variant):
    """Per-sample rows (grouped conv), the shared-row fast path and generate_weights give the same fields for every
    conditioning, and the hyperparameters change the field."""
    net = randomize_heads(make_net(HyperUNet, **variant))
    x, hyper = pair(batch=3), torch.tensor([[0.0, 1.0], [0.5, 0.5], [2.0, 0.1]])
    batched = each_row_as_alone(net, x, hyper)
    shared = net(x, hyper[1:2])
    torch.testing.assert_close(shared, net(x, hyper[1:2].repeat(3, 1)), rtol=1e-4, atol=1e-4 * shared.abs().max().item())
    torch.testing.assert_close(net(x, weights=net.generate_weights(hyper)), batched)
    assert (batched[0] - batched[2]).abs().mean() > 0.05 * batched.abs().mean()


def _conv_numel(cin, cout, k, d):
    return cout * cin * k**d + cout


def test_parameter_counts_are_analytic():
    E, d = 16, 3
    for rank, expected in ((None, _conv_numel(4, 8, 3, d) * (E + 1)), (3, _conv_numel(4, 8, 3, d) * 4 + 3 * E)):
        layer = HyperConv(d, 4, 8, embedding_dims=E, rank=rank)
        assert sum(p.numel() for p in layer.parameters()) == expected
    assert HyperConv(d, 4, 8, E, rank=0).rank is None  # 0 = full map
    cin = ConditionalInstanceNormConv(d, 4, 8, embedding_dims=E)
    assert sum(p.numel() for p in cin.parameters()) == 8 * 4 * 27 + 2 * 8 * E

    # the whole default-layout U-Net: hypernetwork + per-layer maps + plain flow head
    enc, dec, hidden, layers = (16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16), 128, 6
    shapes, channels = [], 2
    for f in enc:
        shapes.append((channels, f))
        channels = f
    for f, skip in zip(dec[:4], reversed(enc)):
        shapes.append((channels, f))
        channels = f + skip
    for f in dec[4:]:
        shapes.append((channels, f))
        channels = f
    hypernet = (2 * hidden + hidden) + (layers - 1) * (hidden * hidden + hidden)
    head = _conv_numel(channels, 3, 3, 3)
    plain = sum(_conv_numel(cin_, cout, 3, 3) for cin_, cout in shapes)
    for rank in (None, 1, 4, 8):
        per_layer = plain * (hidden + 1) if rank is None else plain * (rank + 1) + len(shapes) * rank * hidden
        net = HyperUNet(hyper_rank=rank)
        assert sum(p.numel() for p in net.parameters()) == hypernet + per_layer + head
    assert sum(p.numel() for p in HyperUNet().parameters()) <= 3_000_000  # the default (rank 4) stays compact
    assert sum(p.numel() for p in HyperUNet(hyper_rank=None).parameters()) > 40_000_000  # HyperMorph's full map


def test_rank_limited_kernels_span_a_rank_k_affine_family():
    """Kernels generated for many (lam, mu) minus the base lie in a K-dimensional subspace (rank <= K); the full map's
    do not."""
    torch.manual_seed(0)
    hyper = torch.rand(40, 2) * 3
    for rank in (1, 3):
        net = make_net(HyperUNet, hyper_rank=rank)
        weights = net.generate_weights(hyper)
        for layer, (weight, bias) in weights.items():
            offsets = torch.cat([weight.flatten(1), bias], dim=1) - layer.base
            assert torch.linalg.matrix_rank(offsets.double(), rtol=1e-5) <= rank
    full = make_net(HyperUNet, hyper_rank=None)
    weight, bias = next(iter(full.generate_weights(hyper).values()))
    offsets = torch.cat([weight.flatten(1), bias], dim=1) - next(iter(full.generate_weights(hyper))).base
    assert torch.linalg.matrix_rank(offsets.double(), rtol=1e-5) > 3


def test_adam_step_moves_rank_limited_kernels_like_a_plain_conv():
    """Equalised learning rate of the rank-limited map ``p = c + h U z``, ``z = g V e``: Adam's first step moves
    every parameter by lr against its gradient's sign, so to first order
    ``dp_i = -lr [sign(G_i) (1 + h sum_r |z_r|) + h sum_r U_ir sign(G_z_r) mean(e)]`` (``G`` the gradient of ``p``;
    ``sign(G_{U_ir}) = sign(G_i z_r)``, ``sign(G_{V_rk}) = sign(G_z_r)`` for ``e_k > 0``): about lr, as for an
    ordinary convolution."""
    torch.manual_seed(0)
    layer = HyperConv(2, 4, 8, embedding_dims=128, rank=4)
    embedding = torch.rand(1, 128)
    z = layer.coefficients(embedding).detach()
    weight, bias = layer.generate(embedding, shared=True)
    before = torch.cat([weight.flatten(), bias]).detach()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(2, 4, 16, 16), {layer: (weight, bias)}).square().mean().backward()
    grad_p = layer.base.grad.clone()  # dp/dc = 1
    grad_z = (layer.coefficient_weight.grad[:, 0] / (layer.embedding_gain * embedding[0, 0])).sign()
    optimizer.step()
    weight, bias = layer.generate(embedding, shared=True)
    change = torch.cat([weight.flatten(), bias]).detach() - before
    h = layer.basis_gain
    predicted = -1e-3 * (grad_p.sign() * (1 + h * z.abs().sum()) + h * layer.basis.detach() @ grad_z * embedding.mean())
    torch.testing.assert_close(change, predicted, rtol=2e-2, atol=1e-6)
    assert change.abs().max() < 3e-3  # about lr, not ~E lr


def test_conditioning_arguments_are_validated_and_keyword_only():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="hyper_rank must be"):
            make_net(HyperUNet, hyper_rank=bad)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        make_net(HyperUNet, conditioning="film")
    with pytest.raises(ValueError, match="hyper_rank applies to generated kernels"):
        make_net(HyperUNet, conditioning="instance_norm", hyper_rank=4)
    with pytest.raises(TypeError):
        HyperRegistrationNet(2, 2, 2)  # keyword-only: nine positional arguments were error-prone
