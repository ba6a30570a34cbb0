"""The warp helpers reuse one MONAI Warp (and so its reference grid) per mode, device and dtype."""

import pytest
import torch
from monai.networks.blocks import Warp

from elastic_hypermorph_bundle.networks import warp
from elastic_hypermorph_bundle.networks.warp import warp_image, warp_label


def test_repeated_warps_build_the_reference_grid_once(monkeypatch):
    built = []  # reference grids MONAI builds
    original = Warp.get_reference_grid

    def counting(self, ddf, *args, **kwargs):
        grid = original(self, ddf, *args, **kwargs)
        built.append(grid.data_ptr())
        return grid

    monkeypatch.setattr(Warp, "get_reference_grid", counting)
    warp.cached_warp.cache_clear()
    moving = torch.rand(1, 1, 6, 7, 8)
    ddf = torch.randn(1, 3, 6, 7, 8)
    first = warp_image(moving, ddf)
    for _ in range(3):
        torch.testing.assert_close(warp_image(moving, ddf), first)
    assert len(built) == 1  # the grid is built once and reused by every call (MONAI alone rebuilds it each time)
    # same result as a fresh MONAI Warp; labels keep their values and dtype
    torch.testing.assert_close(first, Warp("bilinear", "border")(moving, ddf))
    labels = torch.randint(0, 3, (1, 1, 6, 7, 8))
    warped = warp_label(labels, ddf)
    assert warped.dtype == labels.dtype and set(warped.unique().tolist()) <= {0, 1, 2}
    # another dtype or shape gets its own grid
    assert warp_image(moving.double(), ddf.double()).dtype == torch.float64
    torch.testing.assert_close(warp_image(moving[..., :5], ddf[..., :5]), Warp("bilinear", "border")(moving[..., :5], ddf[..., :5]))


def test_one_cpu_image_split_across_threads_warps_as_monai_does():
    """A 3D warp of one image on a CPU with 2 threads is cut into 2 batch entries (torch's 3D grid_sample shares
    work by batch entry only); values and gradients are MONAI's, bit for bit, for images and labels."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        warp.cached_warp.cache_clear()
        moving = torch.rand(1, 4, 6, 7, 8)
        ddf = (3 * torch.randn(1, 3, 6, 7, 8)).requires_grad_()
        assert warp.cached_warp("bilinear", "border")._parts(moving, ddf) == 2
        warped = warp_image(moving, ddf)
        (gradient,) = torch.autograd.grad(warped.square().sum(), ddf)
        reference_ddf = ddf.detach().clone().requires_grad_()
        reference = Warp("bilinear", "border")(moving, reference_ddf)
        (reference_gradient,) = torch.autograd.grad(reference.square().sum(), reference_ddf)
        assert torch.equal(warped, reference) and torch.equal(gradient, reference_gradient)
        labels = torch.randint(0, 3, (1, 1, 6, 7, 8))
        assert torch.equal(warp_label(labels, ddf.detach()), Warp("nearest", "zeros")(labels.float(), ddf.detach()).long())
        # an odd number of points, or a batch of two, takes MONAI's own path
        assert warp.cached_warp("bilinear", "border")._parts(moving[:, :, :5, :, :7], ddf[:, :, :5, :, :7]) == 1
        assert warp.cached_warp("bilinear", "border")._parts(moving.expand(2, -1, -1, -1, -1), ddf.expand(2, -1, -1, -1, -1)) == 1
    finally:
        torch.set_num_threads(previous)


def test_the_cuts_of_a_warp_are_the_whole_warps_values_there():
    """warp_cuts computes the three planes a preview shows, each value bit for bit the whole warp's there (on one
    thread, MONAI's path; on two, the split one), edge values repeated where the field leaves the image."""
    from elastic_hypermorph_bundle.networks.warp import warp_cuts

    previous = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 2, 9, 12, 10, generator=generator) * 1500 - 1000
    ddf = 4 * torch.randn(1, 3, 9, 12, 10, generator=generator)
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            warp.cached_warp.cache_clear()
            whole = warp_image(moving, ddf)
            cuts = warp_cuts(moving, ddf, (0, 7, 9))
            assert [tuple(c.shape) for c in cuts] == [(1, 2, 12, 10), (1, 2, 9, 10), (1, 2, 9, 12)]
            assert torch.equal(cuts[0], whole[:, :, 0]) and torch.equal(cuts[1], whole[:, :, :, 7])
            assert torch.equal(cuts[2], whole[..., 9])
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="slices must be 3 voxel indices"):
        warp_cuts(moving, ddf, (0, 12, 0))
    with pytest.raises(ValueError, match="need a 3D image"):
        warp_cuts(moving, ddf[:, :2], (0, 0, 0))


@pytest.mark.parametrize("threads", [1, 2])
def test_sampling_points_is_the_warps_values_and_gradients_there(threads):
    """sample_points at identity + DDF gives the whole warp's values and (on those points) its gradients, for any
    subset and shape of points; bad shapes are refused."""
    from elastic_hypermorph_bundle.networks.warp import sample_points

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        warp.cached_warp.cache_clear()
        generator = torch.Generator().manual_seed(1)
        moving = torch.rand(1, 3, 8, 10, 6, generator=generator)
        ddf = (2 * torch.randn(1, 3, 8, 10, 6, generator=generator)).requires_grad_()
        identity = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (8, 10, 6)],
                                              indexing="ij"))[None]
        weights = torch.rand(1, 3, 8, 10, 6, generator=generator)
        whole = warp_image(moving, ddf)
        (whole_gradient,) = torch.autograd.grad((whole * weights).sum(), ddf)
        cut = (Ellipsis, slice(1, None, 2), slice(0, None, 2), slice(1, None, 2))
        sampled = sample_points(moving, identity[cut] + ddf[cut])
        assert sampled.shape == (1, 3, 4, 5, 3)
        assert torch.allclose(sampled, whole[cut], atol=1e-6)
        (gradient,) = torch.autograd.grad((sampled * weights[cut]).sum(), ddf)
        # the whole warp's gradient where only the sampled points carry a weight
        masked = torch.zeros_like(weights)
        masked[cut] = weights[cut]
        (expected,) = torch.autograd.grad((warp_image(moving, ddf) * masked).sum(), ddf)
        assert torch.allclose(gradient, expected, atol=1e-5)
        assert gradient[..., 0, :, :].abs().max() == 0  # points never sampled get no gradient
        flat = sample_points(moving, (identity + ddf).flatten(2)[..., :7])
        assert flat.shape == (1, 3, 7) and torch.allclose(flat, whole.flatten(2)[..., :7], atol=1e-6)
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="points \\(B, 3, ...\\)"):
        sample_points(moving, torch.zeros(1, 2, 5))
