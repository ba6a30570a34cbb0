"""The coarse discrete displacement search (``losses.discrete``): it finds a shift beyond a gradient's reach, and
its field is smooth where the images hold nothing."""

import pytest
import torch
import torch.nn.functional as F

from elastic_hypermorph_bundle.losses.discrete import discrete_search
from elastic_hypermorph_bundle.networks.warp import warp_image


def _blobs(shape=(40, 40, 40), seed=0):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *shape, generator=generator)
    for _ in range(3):
        noise = F.avg_pool3d(F.pad(noise, (1,) * 6, mode="replicate"), 3, stride=1)
    return (noise - noise.min()) / (noise.max() - noise.min())


def test_finds_a_large_shift_and_reduces_the_mismatch():
    moving = _blobs()
    shift = torch.zeros(1, 3, 40, 40, 40)
    shift[:, 2] = 8.0  # voxels: the fixed image is the moving one seen 8 voxels further along z
    fixed = warp_image(moving, shift)
    field = discrete_search(fixed, moving, factor=2, radius=5)
    assert field.shape == (1, 3, 40, 40, 40)
    inner = (slice(None), slice(None), slice(10, 30), slice(10, 30), slice(8, 24))
    assert torch.allclose(field[inner][:, 2].median(), torch.tensor(8.0), atol=1.0)
    assert field[inner][:, :2].abs().median() < 1.0
    before = (fixed - moving)[inner].abs().mean()
    after = (fixed - warp_image(moving, field))[inner].abs().mean()
    assert after < 0.5 * before


def test_identical_images_give_no_motion_and_bad_input_is_refused():
    image = _blobs(seed=1)
    assert discrete_search(image, image, factor=2, radius=2).abs().max() < 1e-6
    with pytest.raises(ValueError, match="one shape"):
        discrete_search(image, image[..., :-1])
    with pytest.raises(ValueError, match="radius >= 1"):
        discrete_search(image, image, radius=0)
