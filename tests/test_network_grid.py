"""NetworkGrid: a pair registered on a finer grid reaches the network on its trained grid, and the field comes back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elastic_hypermorph_bundle.networks.grid import NetworkGrid
from elastic_hypermorph_bundle.networks.spatial import antialias, antialias_sigma, separable_replicate

SHAPE, SPACING = (33, 33, 21), (1.0, 1.0, 2.0)
GRID = NetworkGrid(spatial_size=(16, 20, 24), pixdim=(2.0, 2.0, 2.0))  # x cropped, y and z padded


def test_images_reach_the_trained_grid_as_training_resampled_them():
    assert GRID.resampled_shape(SHAPE, SPACING) == (17, 17, 21)
    x = torch.linspace(0, 32, 33).reshape(1, 1, 33, 1, 1).expand(1, 1, *SHAPE)  # value = x in mm
    on_net = GRID.to_network(x.clone(), SPACING)
    assert on_net.shape == (1, 1, 16, 20, 24)
    # resampled to 2 mm, centre-cropped 17 -> 16 (start 0 = 17 // 2 - 16 // 2) and zero padded in y (1 + 2) and z;
    # a linear ramp passes the anti-aliasing filter unchanged away from the edge (where the edge value is repeated)
    assert torch.allclose(on_net[0, 0, 1:, 10, 12], torch.arange(1, 16) * 2.0, atol=1e-4)
    assert on_net[0, 0, :, 0].abs().max() == 0 and on_net[0, 0, :, 1:19, 1:22].min() >= 0
    assert on_net[0, 0, 5, 2, 2] == pytest.approx(10.0, abs=1e-4)


def test_a_translation_comes_back_in_registration_voxels():
    ddf_net = torch.zeros(1, 3, 16, 20, 24)
    ddf_net[:, 0], ddf_net[:, 2] = 1.5, -0.5  # 3 mm along x, -1 mm along z
    back = GRID.from_network(ddf_net, SHAPE, SPACING)
    assert back.shape == (1, 3, *SHAPE)
    assert torch.allclose(back[:, 0], torch.full(SHAPE, 3.0), atol=1e-4)  # 1 mm voxels along x
    assert torch.allclose(back[:, 2], torch.full(SHAPE, -0.5), atol=1e-4)  # 2 mm voxels along z
    assert back[:, 1].abs().max() < 1e-6


def test_the_trained_grid_itself_is_left_alone():
    grid = NetworkGrid((8, 8, 8))
    assert grid.matches((8, 8, 8), (1.5, 1.5, 1.5)) and not grid.matches((8, 8, 9), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spatial_size must hold 3"):
        NetworkGrid((8, 8))
    with pytest.raises(ValueError, match="pixdim must hold 3 positive"):
        NetworkGrid((8, 8, 8), (1.0, 0.0, 1.0))


def test_detail_finer_than_the_network_grid_does_not_alias_into_it():
    """An alternating +-1 pattern along x (1 mm voxels), read on a 4 mm grid: point sampling would turn it into a
    constant +-1 (the alias); the Gaussian pre-filter (sigma 1.5 voxels) removes it, while a smooth pattern along y
    keeps its amplitude; shapes are those of the plain resampling, and an axis that is not coarsened is untouched."""
    grid = NetworkGrid(spatial_size=(9, 9, 9), pixdim=(4.0, 4.0, 1.0))
    x, y = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    checker = (1.0 - 2.0 * (x % 2))[None, None, :, :, None].expand(1, 1, 33, 33, 9)
    smooth = torch.cos(2 * torch.pi * y / 32)[None, None, :, :, None].expand(1, 1, 33, 33, 9)
    assert grid.resampled_shape((33, 33, 9), (1.0, 1.0, 1.0)) == (9, 9, 9)
    plain = F.interpolate(checker, size=(9, 9, 9), mode="trilinear", align_corners=True)
    assert plain.abs().min() == pytest.approx(1.0)  # the alias a plain resampling gives
    on_net = grid.to_network(checker.clone(), (1.0, 1.0, 1.0))
    assert on_net.shape == (1, 1, 9, 9, 9)
    assert on_net[0, 0, 1:-1].abs().max() < 0.02  # no alias away from the edges
    kept = grid.to_network(smooth.clone(), (1.0, 1.0, 1.0))
    expected = F.interpolate(smooth, size=(9, 9, 9), mode="trilinear", align_corners=True)
    assert torch.allclose(kept[:, :, :, 1:-1], expected[:, :, :, 1:-1], atol=0.05)  # a period of 8 network voxels
    # nothing is filtered when nothing is coarsened (the network's own grid, or a coarser input)
    same = torch.rand(1, 1, 9, 9, 9)
    assert torch.equal(NetworkGrid((9, 9, 9), (1.0, 1.0, 1.0)).to_network(same, (1.0, 1.0, 1.0)), same)
    assert torch.equal(antialias(same, (2.0, 2.0, 2.0), (1.0, 1.0, 1.0)), same)
    assert antialias_sigma((1.0, 1.25, 2.0), (7.0, 5.0, 2.0)) == (3.0, 1.5, 0.0)
    with pytest.raises(ValueError, match="positive voxel sizes"):
        antialias_sigma((1.0, 1.0), (2.0, 2.0, 2.0))


def test_the_transforms_path_filters_as_the_network_grid_does():
    """Inference on the network's grid (``registration_grid="network"``) and training on images finer than
    ``pixdim`` coarsen through ``Spacingd``: :class:`AntiAliasd` in front of it removes the same alias."""
    from monai.data import MetaTensor
    from monai.transforms import Spacingd

    from elastic_hypermorph_bundle.data.transforms import AntiAliasd

    x = torch.arange(32.0).reshape(32, 1, 1).expand(32, 32, 8)
    checker = MetaTensor((1.0 - 2.0 * (x % 2))[None], affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))
    keys = ["fixed_image"]
    plain = Spacingd(keys, pixdim=(4.0, 1.0, 2.0))({"fixed_image": checker})["fixed_image"]
    filtered = Spacingd(keys, pixdim=(4.0, 1.0, 2.0))(AntiAliasd(keys, pixdim=(4.0, 1.0, 2.0))({"fixed_image": checker}))
    filtered = filtered["fixed_image"]
    assert filtered.shape == plain.shape and torch.allclose(filtered.affine, plain.affine)
    assert plain[0, 2:-2].abs().mean() > 0.2  # the alias of the plain resampling
    assert filtered[0, 2:-2].abs().max() < 0.02
    # an image already at pixdim passes untouched
    assert AntiAliasd(keys, pixdim=(1.0, 1.0, 2.0))({"fixed_image": checker})["fixed_image"] is checker


@pytest.mark.parametrize("shape, sigmas", [((1, 1, 19, 12, 7), (0.5, 1.3, 0.0)), ((2, 3, 5, 9, 4), (2.0, 0.0, 0.7)),
                                           ((1, 2, 16, 11), (1.0, 0.5))])
def test_separable_replicate_is_monais_replicate_padded_separable_filter(shape, sigmas):
    """The shifted-sum filter equals MONAI's ``separable_filtering(mode="replicate")`` (convolutions of the
    replicate-padded image), kernels wider than an axis included; a kernel of [1] leaves its axis as it is."""
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering

    image = torch.rand(*shape, generator=torch.Generator().manual_seed(7))
    kernels = [gaussian_1d(s, truncated=4.0) if s > 0 else torch.ones(1) for s in sigmas]
    torch.testing.assert_close(separable_replicate(image, kernels), separable_filtering(image, kernels, mode="replicate"),
                               rtol=0, atol=1e-6)
    assert torch.equal(separable_replicate(image, [torch.ones(1)] * len(sigmas)), image)
    ramp = torch.arange(shape[2], dtype=torch.float32).reshape(1, 1, -1, *[1] * (len(shape) - 3)).expand(shape)
    # a symmetric kernel keeps a ramp away from the ends (to the kernel's sum, 1 to a few 1e-5)
    interior = slice(len(kernels[0]) // 2, shape[2] - len(kernels[0]) // 2)
    torch.testing.assert_close(separable_replicate(ramp, kernels)[:, :, interior], ramp[:, :, interior], rtol=0,
                               atol=1e-3)
    with pytest.raises(ValueError, match="odd-length kernel per spatial axis"):
        separable_replicate(image, [torch.ones(2)] * len(sigmas))
