"""The similarity table (``losses/similarity.py``): each row's meaning, and that training and the optimisation both
read it (``--similarity`` in training, ``instance_similarity`` at test time)."""

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.losses.mind import MINDSSCLoss
from elastic_hypermorph_bundle.losses.similarity import LNCC_WINDOW, SIMILARITIES, get_similarity
from elastic_hypermorph_bundle.networks import warp_image


def blobs(seed=0, shape=(16, 14, 12)):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *shape, generator=generator)
    return torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)


def test_rows_are_the_losses_they_name():
    image, other = blobs(0), blobs(1)
    lncc = get_similarity("lncc")
    expected = LocalNormalizedCrossCorrelationLoss(3, kernel_size=LNCC_WINDOW)(image, other)
    torch.testing.assert_close(lncc.compare(lncc.prepare(image), lncc.prepare(other), LNCC_WINDOW).mean(), expected)
    mind = get_similarity("mind")
    value = mind.compare(mind.prepare(image), mind.prepare(other), LNCC_WINDOW)
    assert value.shape == (1, 1, *image.shape[2:])
    torch.testing.assert_close(value, MINDSSCLoss(reduction="none")(image, other))


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_every_row_prefers_the_aligned_image(name):
    # lower is better: the image against itself beats it against a shifted copy, whatever the row
    row = get_similarity(name)
    image = blobs(2)
    shifted = torch.roll(image, 3, dims=2)
    same = row.compare(row.prepare(image), row.prepare(image), LNCC_WINDOW).mean()
    moved = row.compare(row.prepare(shifted), row.prepare(image), LNCC_WINDOW).mean()
    assert same < moved


def test_unknown_or_unsupported_similarity_is_refused():
    with pytest.raises(ValueError, match="similarity must be one of .*'ssd'"):
        get_similarity("ssd")
    with pytest.raises(ValueError, match="'mind' works on 3D images, not on 2D"):
        RegistrationLoss("elastic", spatial_dims=2, similarity="mind")
    with pytest.raises(ValueError, match="kernel_size"):
        RegistrationLoss("elastic", kernel_size=4)


def test_training_loss_uses_the_chosen_row():
    fixed = blobs(3)
    warped = torch.roll(fixed, 2, dims=3)
    ddf = torch.zeros(1, 3, *fixed.shape[2:])
    hyper = torch.tensor([[0.1, 0.2]])
    for name in SIMILARITIES:
        loss = RegistrationLoss("elastic", similarity=name, reduction="none")
        parts = loss(warped, fixed, ddf, hyper, return_components=True)
        row = get_similarity(name)
        expected = row.compare(row.prepare(warped), row.prepare(fixed), LNCC_WINDOW).flatten(1).mean(1)
        torch.testing.assert_close(parts["similarity"], expected)
        torch.testing.assert_close(parts["loss"], expected)  # a zero field costs nothing


def test_mind_training_loss_has_gradients_for_the_field():
    fixed = blobs(4)
    moving = torch.roll(fixed, 1, dims=2)
    ddf = torch.zeros(1, 3, *fixed.shape[2:], requires_grad=True)
    loss = RegistrationLoss("elastic", similarity="mind")
    loss(warp_image(moving, ddf), fixed, ddf, torch.tensor([[0.0, 0.0]])).backward()
    assert ddf.grad is not None and ddf.grad.abs().sum() > 0
