"""NetworkGrid: a pair registered on a finer grid reaches the network on its trained grid, and the field comes back."""

from __future__ import annotations

import pytest
import torch

from elastic_hypermorph_bundle.networks.grid import NetworkGrid

SHAPE, SPACING = (33, 33, 21), (1.0, 1.0, 2.0)
GRID = NetworkGrid(spatial_size=(16, 20, 24), pixdim=(2.0, 2.0, 2.0))  # x cropped, y and z padded


def test_images_reach_the_trained_grid_as_training_resampled_them():
    assert GRID.resampled_shape(SHAPE, SPACING) == (17, 17, 21)
    x = torch.linspace(0, 32, 33).reshape(1, 1, 33, 1, 1).expand(1, 1, *SHAPE)  # value = x in mm
    on_net = GRID.to_network(x.clone(), SPACING)
    assert on_net.shape == (1, 1, 16, 20, 24)
    # resampled to 2 mm, centre-cropped 17 -> 16 (start 0 = 17 // 2 - 16 // 2) and zero padded in y (1 + 2) and z
    assert torch.allclose(on_net[0, 0, :, 10, 12], torch.arange(16) * 2.0, atol=1e-4)
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
