"""Instance optimisation, pre-alignment and MIND-SSC on small generated images."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch

from elastic_hypermorph_bundle.losses.elastic import elastic_energy
from elastic_hypermorph_bundle.losses.mind import MINDSSCLoss, mind_ssc
from elastic_hypermorph_bundle.metrics import folding_percent, target_registration_error
from elastic_hypermorph_bundle.networks import warp_image
from elastic_hypermorph_bundle.networks.spatial import Affine, affine_ddf, all_finite, box_mean, compose_affine
from elastic_hypermorph_bundle.optimize import instance_optimize, prealign

torch.set_num_threads(1)


def blobs(shape=(32, 32, 32), seed=0, count=12) -> torch.Tensor:
    """A smooth random image ``(1, 1, *shape)`` in [0, 1]: Gaussian blobs of several sizes inside a body."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    image = np.zeros(shape, np.float32)
    for _ in range(count):
        centre = rng.uniform(0.25, 0.75, 3) * np.array(shape)
        width = rng.uniform(1.5, 4.0)
        image += rng.uniform(0.3, 1.0) * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * width**2))
    return torch.from_numpy(np.clip(image, 0, 1))[None, None]


def smooth_field(shape=(32, 32, 32), amplitude=2.0) -> torch.Tensor:
    """A smooth displacement ``(1, 3, *shape)`` in voxels, largest in the middle, zero at the border."""
    axes = [torch.linspace(0, math.pi, n) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    bump = torch.sin(x) * torch.sin(y) * torch.sin(z)
    return amplitude * torch.stack([bump, 0.5 * bump * torch.cos(y), -0.7 * bump]).unsqueeze(0)


@pytest.fixture(scope="module")
def simulated_pair():
    from elastic_hypermorph_bundle.simulation.generator import simulate_pair

    pair = simulate_pair((40, 40, 40), seed=3)

    def normalise(hu):
        return torch.from_numpy(np.clip((hu.astype(np.float32) + 1000) / 1500, 0, 1))[None, None]

    return {
        "fixed": normalise(pair.fixed_image),
        "moving": normalise(pair.moving_image),
        "fixed_points": torch.from_numpy(pair.fixed_keypoints).float(),
        "moving_points": torch.from_numpy(pair.moving_keypoints).float(),
        "spacing": pair.spacing,
        "mask": torch.from_numpy(pair.fixed_mask.astype(np.float32))[None, None],
    }


def tre(ddf, pair) -> float:
    return target_registration_error(ddf[0], pair["fixed_points"], pair["moving_points"], pair["spacing"]).mean().item()


# ---------------------------------------------------------------------------- MIND-SSC


def test_mind_shape_range_and_intensity_invariance():
    image = blobs()
    mind = mind_ssc(image)
    assert mind.shape == (1, 12, 32, 32, 32)
    assert (mind > 0).all() and (mind <= 1).all()
    # a global linear intensity change (the lung's darkening, to first order) leaves the descriptor unchanged
    assert torch.allclose(mind_ssc(0.4 * image + 0.3), mind, atol=1e-4)
    assert MINDSSCLoss()(0.4 * image + 0.3, image).item() < 1e-6
    assert MINDSSCLoss()(image, blobs(seed=1)).item() > 1e-3


def test_mind_follows_the_image():
    image = blobs()
    shifted = torch.roll(image, shifts=3, dims=2)
    inner = (slice(None), slice(None), slice(8, 24), slice(4, 28), slice(4, 28))
    assert torch.allclose(torch.roll(mind_ssc(image), shifts=3, dims=2)[inner], mind_ssc(shifted)[inner], atol=2e-3)


def test_mind_is_the_formula_with_and_without_gradients():
    """The descriptors (computed a channel at a time, in place when no gradient is needed) equal the module
    docstring's formula written out on all 12 channels at once with avg_pool3d, to float rounding; with a gradient
    the same values, and the gradient flows to the image."""
    image = blobs()[:, :, :16, :16, :16].double()
    padded = torch.nn.functional.pad(image, (2,) * 6, mode="replicate")
    at = lambda offset: padded[(slice(None), slice(None), *(slice(2 + 2 * o, 18 + 2 * o) for o in offset))]  # noqa: E731
    faces = [tuple(sign if axis == a else 0 for a in range(3)) for axis in range(3) for sign in (-1, 1)]  # x-, x+, y-, ..
    pairs = [(a, b) for a, b in itertools.combinations(faces, 2) if sum((p - q) ** 2 for p, q in zip(a, b)) == 2]
    squared = torch.cat([(at(a) - at(b)).square() for a, b in pairs], dim=1)
    distance = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(squared, (1,) * 6, mode="replicate"), 3, stride=1)
    distance = distance - distance.amin(dim=1, keepdim=True)
    variance = distance.mean(dim=1, keepdim=True)
    scale = variance.mean()
    expected = torch.exp(-distance / variance.clamp(scale * 1e-3 + 1e-12, scale * 1e3))
    torch.testing.assert_close(mind_ssc(image), expected)
    leaf = image.clone().requires_grad_(True)
    with_gradient = mind_ssc(leaf)
    torch.testing.assert_close(with_gradient.detach(), expected)
    with_gradient.square().sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_mind_refuses_bad_input():
    with pytest.raises(ValueError, match="3D single-channel"):
        mind_ssc(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="non-finite"):
        mind_ssc(torch.full((1, 1, 8, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="same shape"):
        MINDSSCLoss()(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))


# ---------------------------------------------------------------------------- affine maps


@pytest.mark.parametrize("radius", [1, 2])
def test_box_mean_is_the_replicate_padded_3d_box_mean(radius):
    """The box filter (the optimisation's smoothing, MIND-SSC's patch mean), means along each axis in turn, is the
    (2 radius + 1)^3 box mean of the field with its edge values repeated; a linear field is kept inside and a
    constant one everywhere."""
    field = torch.randn(1, 3, 5, 6, 7, dtype=torch.float64)
    padded = torch.nn.functional.pad(field, (radius,) * 6, mode="replicate")
    torch.testing.assert_close(box_mean(field, radius), torch.nn.functional.avg_pool3d(padded, 2 * radius + 1, stride=1))
    ramp = torch.arange(7, dtype=torch.float64).view(1, 1, 7, 1, 1).expand(1, 1, 7, 6, 7)
    inner = slice(radius, 7 - radius)
    torch.testing.assert_close(box_mean(ramp, radius)[:, :, inner], ramp[:, :, inner])
    constant = torch.full((1, 2, 4, 4, 4), 2.5)
    torch.testing.assert_close(box_mean(constant, radius), constant)


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 3, 5, 6, 7), (2, 1, 1, 2, 4)])
def test_box_mean_backward_is_the_adjoint_of_its_forward(radius, shape):
    """box_mean's hand-written backward (the filter's adjoint, so that autograd does not fill and copy a padded
    tensor per shifted view) is the Jacobian-transpose product of its forward pass: checked by finite differences
    on axes of 1 and 2 voxels too (every voxel an edge voxel, radius larger than the axis), and equal to autograd
    through a replicate-padded avg_pool3d."""
    field = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: box_mean(f, radius), (field,))
    weights = torch.randn(*shape, dtype=torch.float64)
    (ours,) = torch.autograd.grad(box_mean(field, radius), field, weights)
    if radius <= min(shape[2:]) - 1:  # replicate padding needs radius < size; gradcheck covers the others
        pooled = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(field, (radius,) * 6, mode="replicate"),
                                                2 * radius + 1, stride=1)
        (reference,) = torch.autograd.grad(pooled, field, weights)
        torch.testing.assert_close(ours, reference)


def test_steps_of_each_level_run_as_given(simulated_pair, monkeypatch):
    """``steps`` is one count for every level or one per level, coarsest first: ``[n, n]`` is ``n`` bit for bit;
    each level runs its own count of Adam steps (counted on the optimiser, by the level's control grid); a level
    with 0 steps passes its start on; all zero returns the start; other lengths and values are refused, naming
    the setting."""
    fixed, moving = simulated_pair["fixed"], simulated_pair["moving"]
    run = lambda steps, **kw: instance_optimize(fixed, moving, 0.083, 0.03, steps=steps, levels=2, **kw)  # noqa: E731
    assert torch.equal(run([2, 2]), run(2))
    taken = []
    adam_step = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        taken.append(tuple(self.param_groups[0]["params"][0].shape[2:]))
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    coarse, finest = (10, 10, 10), (20, 20, 20)  # the 40^3 pair, grid 2: control grids 4 and 2 times coarser
    for steps in ([1, 3], [0, 2], [2, 0]):
        taken.clear()
        field = run(steps)
        assert taken == [coarse] * steps[0] + [finest] * steps[1] and torch.isfinite(field).all()
    monkeypatch.undo()
    start = smooth_field(tuple(fixed.shape[2:]), 1.0)
    assert torch.equal(run([0, 0], init_ddf=start), start)
    for steps, message in (([3], r"steps \[3\] gives 1 levels' steps, but the optimisation has 2 levels"),
                           ([3, -1], r"steps must be >= 0 on every level, got \[3, -1\]"),
                           ([3, 2.5], r"steps must be a whole number or a list of whole numbers"),
                           (True, r"steps must be a whole number")):
        with pytest.raises(ValueError, match=message):
            run(steps)


def test_all_finite_agrees_with_isfinite_when_the_sum_overflows():
    """The one-pass test of finite values: a nan or an infinity anywhere is caught, and finite values whose sum
    overflows (float32, or a float16 field) still pass, as ``isfinite(...).all()`` says."""
    for dtype in (torch.float32, torch.float16):
        big = torch.full((4, 5), torch.finfo(dtype).max, dtype=dtype)
        assert not torch.isfinite(big.sum()) and all_finite(big)
        for bad in (float("nan"), float("inf"), -float("inf")):
            broken = big.clone()
            broken[2, 3] = bad
            assert not all_finite(broken) and not all_finite(torch.where(broken.isfinite(), 0.0, broken))
    assert all_finite(torch.arange(6, dtype=torch.int16)) and all_finite(torch.zeros(0))


def test_pair_features_resize_once_from_a_grid_fixed_by_the_shape():
    """A pair's features give each grid's area-averaged resize once (the same tensors when asked again); a grid
    whose double divides the image grid is averaged from that double (the image grid's block means, to float
    rounding); the values depend on the shape alone, not on what was asked for before, and a plain pair is resized
    alike."""
    from elastic_hypermorph_bundle.networks.spatial import resize_image
    from elastic_hypermorph_bundle.optimize import PairFeatures, features_at

    generator = torch.Generator().manual_seed(3)
    fixed, moving = (torch.rand(1, 2, 24, 16, 40, generator=generator) for _ in range(2))
    shapes = [(12, 8, 20), (6, 4, 10), (3, 2, 5), (8, 5, 7)]
    features, backwards = PairFeatures(fixed, moving), PairFeatures(fixed, moving)
    assert features.at((24, 16, 40))[0] is fixed
    for shape in shapes:
        resized = features.at(shape)
        assert features.at(shape)[0] is resized[0]  # kept
        for got, image in zip(resized, (fixed, moving)):
            # the block means of the image grid, exact on the grid it halves and to rounding on the chained ones
            assert torch.allclose(got, resize_image(image, shape), rtol=0, atol=1e-6)
            assert torch.equal(got, resize_image(image, shape)) or shape in [(6, 4, 10), (3, 2, 5)]
    for shape in shapes[::-1]:
        assert all(torch.equal(a, b) for a, b in zip(backwards.at(shape), features.at(shape)))
    assert set(features._resized) == set(shapes)  # (12, 8, 20) kept once for the grids chained from it
    # (8, 5, 7): its double (16, 10, 14) does not divide the image grid, so from the image grid
    assert torch.equal(features.at((8, 5, 7))[0], resize_image(fixed, (8, 5, 7)))
    assert all(torch.equal(a, b) for a, b in zip(features_at((fixed, moving), (3, 2, 5)), features.at((3, 2, 5))))
    fixed_f, moving_f = features  # unpacks as the (fixed, moving) pair it is
    assert fixed_f is fixed and moving_f is moving


def test_affine_ddf_translation_and_identity():
    spacing = (2.0, 1.0, 4.0)
    identity = Affine.identity(1, spacing)
    assert affine_ddf(identity, (8, 9, 10)).abs().max() < 1e-5
    shift = Affine(torch.eye(3)[None], torch.tensor([[4.0, -3.0, 8.0]]), spacing)
    ddf = affine_ddf(shift, (8, 9, 10))
    assert torch.allclose(ddf, torch.tensor([2.0, -3.0, 2.0]).reshape(1, 3, 1, 1, 1).expand_as(ddf), atol=1e-5)
    # on a level half as fine, the same map counts half as many (coarser) voxels
    coarse = affine_ddf(shift, (4, 5, 5), full_shape=(7, 9, 9))
    assert torch.allclose(coarse[0, :, 0, 0, 0], torch.tensor([2.0 * 3 / 6, -3.0 * 4 / 8, 2.0 * 4 / 8]), atol=1e-5)


def test_compose_affine_matches_warping_the_affine_field():
    spacing = (1.5, 1.0, 2.0)
    angle = 0.1
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1.0]])
    affine = Affine((1.05 * rotation)[None], torch.tensor([[3.0, 1.0, -2.0]]), spacing)
    shape = (16, 16, 16)
    field = smooth_field(shape, amplitude=1.5)
    affine_field = affine_ddf(affine, shape)
    # x -> A(x + u(x)): the affine field sampled at x + u, plus u
    expected = field + warp_image(affine_field, field)
    inner = (slice(None), slice(None)) + (slice(2, -2),) * 3
    assert torch.allclose(compose_affine(affine, field)[inner], expected[inner], atol=1e-3)


# ---------------------------------------------------------------------------- pre-alignment


@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_prealign_recovers_a_large_offset_and_scaling(transform):
    spacing = (5.0, 4.0, 5.0)
    fixed = blobs((40, 40, 40), seed=2, count=20)
    scale = 1.0 if transform == "rigid" else 1.08
    angle = 0.05
    rotation = torch.tensor([[1.0, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    true = Affine((scale * rotation)[None], torch.tensor([[30.0, -20.0, 15.0]]), spacing)  # ~40 mm offset
    inverse_matrix = torch.linalg.inv(true.matrix)
    inverse = Affine(inverse_matrix, -(inverse_matrix @ true.translation[:, :, None])[:, :, 0], spacing)
    moving = warp_image(fixed, affine_ddf(inverse, fixed.shape[2:]), padding_mode="zeros")
    estimate = prealign(fixed, moving, spacing, transform=transform, steps=150, factor=2)
    error_mm = (affine_ddf(estimate, fixed.shape[2:]) - affine_ddf(true, fixed.shape[2:])) * torch.tensor(spacing).reshape(1, 3, 1, 1, 1)
    body = fixed > 0.05
    before = (affine_ddf(true, fixed.shape[2:]) * torch.tensor(spacing).reshape(1, 3, 1, 1, 1)).norm(dim=1, keepdim=True)
    after = error_mm.norm(dim=1, keepdim=True)
    assert before[body].mean() > 30
    assert after[body].mean() < 3.0, after[body].mean()


def test_prealign_none_is_identity_and_bad_transform_refused():
    image = blobs((16, 16, 16))
    identity = prealign(image, image, transform="none")
    assert torch.equal(identity.matrix, torch.eye(3)[None]) and not identity.translation.any()
    with pytest.raises(ValueError, match="transform must be one of"):
        prealign(image, image, transform="bspline")
    with pytest.raises(ValueError, match="zero everywhere"):
        prealign(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8), transform="translation")


# ---------------------------------------------------------------------------- instance optimisation


def objective(fixed, moving, ddf, lam, mu):
    """The optimised objective at the image grid (levels=1, grid=1): MIND descriptor SSD + elastic energy."""
    warped = warp_image(mind_ssc(moving), ddf)
    return ((warped - mind_ssc(fixed)).square().mean() + elastic_energy(ddf, lam, mu).mean()).item()


def test_optimisation_lowers_the_objective(simulated_pair):
    fixed, moving = simulated_pair["fixed"], simulated_pair["moving"]
    start = torch.zeros(1, 3, *fixed.shape[2:])
    ddf = instance_optimize(fixed, moving, 0.1, 0.05, steps=30, levels=1, grid=1, lr=0.2)
    assert objective(fixed, moving, ddf, 0.1, 0.05) < 0.9 * objective(fixed, moving, start, 0.1, 0.05)


def test_known_motion_is_recovered_from_identity(simulated_pair):
    """Without a trained model (identity start), the breathing motion of a simulated pair is found."""
    before = tre(torch.zeros(1, 3, 40, 40, 40), simulated_pair)
    ddf = instance_optimize(simulated_pair["fixed"], simulated_pair["moving"], 0.083, 0.03, steps=40)
    assert before > 5.0
    assert tre(ddf, simulated_pair) < 0.4 * before
    assert folding_percent(ddf).item() < 0.5


def test_starting_from_a_good_field_keeps_it_good(simulated_pair):
    """A start near the answer (as a network would give) ends near it, and zero steps return the start."""
    rough = instance_optimize(simulated_pair["fixed"], simulated_pair["moving"], 0.083, 0.03, steps=15, levels=1, grid=4)
    assert torch.equal(instance_optimize(simulated_pair["fixed"], simulated_pair["moving"], 0.083, 0.03, rough, steps=0), rough)
    refined = instance_optimize(simulated_pair["fixed"], simulated_pair["moving"], 0.083, 0.03, rough, steps=30)
    assert tre(refined, simulated_pair) < tre(rough, simulated_pair)


def test_identical_images_give_a_near_zero_field():
    image = blobs((24, 24, 24))
    ddf = instance_optimize(image, image, 0.1, 0.1, steps=20)
    # Adam's steps are about lr whatever the gradient's size, so a jitter of a fraction of lr (0.2 voxels) remains
    # where the images hold no information; a real motion is tens of times larger (see the tests below)
    assert ddf.abs().mean() < 0.06 and ddf.abs().max() < 0.5


def test_stiffer_material_gives_a_smoother_field(simulated_pair):
    fields = {
        stiffness: instance_optimize(simulated_pair["fixed"], simulated_pair["moving"], stiffness, stiffness, steps=30)
        for stiffness in (0.01, 1.0)
    }
    soft, stiff = (elastic_energy(fields[k], 0.05, 0.05).item() for k in (0.01, 1.0))
    assert stiff < 0.7 * soft


def test_strided_similarity_averages_to_the_whole_levels():
    """A stride-2 similarity visits the 8 sub-grids once per 8 steps, consecutive offsets far apart, and on a grid
    of even sizes the mean of its 8 values is the whole level's similarity; stride 1 is the whole level's."""
    from elastic_hypermorph_bundle.losses.similarity import get_similarity
    from elastic_hypermorph_bundle.optimize import _LevelSimilarity, _offset_cycle

    cycle = _offset_cycle(2)
    assert sorted(cycle) == sorted(itertools.product(range(2), repeat=3))
    assert all(sum(a != b for a, b in zip(cycle[i], cycle[i + 1])) >= 2 for i in range(7))
    assert sorted(_offset_cycle(3)) == sorted(itertools.product(range(3), repeat=3)) and _offset_cycle(1) == [(0, 0, 0)]
    row = get_similarity("mind")
    fixed, moving = (mind_ssc(blobs((16, 12, 14), seed=s)) for s in (1, 2))
    ddf = smooth_field((16, 12, 14), 1.5)
    mask = (blobs((16, 12, 14), seed=5) > 0.05).float()
    for level_mask in (None, mask):
        whole = _LevelSimilarity(row, fixed, moving, level_mask, 2.0)(ddf)
        strided = _LevelSimilarity(row, fixed, moving, level_mask, 2.0, stride=2)
        values = torch.stack([strided(ddf, step) for step in range(8)])
        if level_mask is None:  # equal sub-grids: the mean of the 8 means is the whole mean
            assert torch.allclose(values.mean(0), whole, rtol=1e-5)
        assert not torch.allclose(values[0], values[1])
        assert torch.allclose(_LevelSimilarity(row, fixed, moving, level_mask, 2.0, stride=1)(ddf, 5), whole)


def test_strided_similarity_registers_as_the_whole_one(simulated_pair):
    """The finest level at similarity stride 2 recovers the breathing motion nearly as well as comparing every
    voxel, and stride 1 is the default's field bit for bit."""
    arguments = dict(fixed=simulated_pair["fixed"], moving=simulated_pair["moving"], lam=0.083, mu=0.03, steps=40)
    whole = instance_optimize(**arguments)
    assert torch.equal(instance_optimize(**arguments, similarity_stride=1), whole)
    strided = instance_optimize(**arguments, similarity_stride=[1, 1, 2])
    assert not torch.equal(strided, whole)
    assert tre(strided, simulated_pair) < 1.15 * tre(whole, simulated_pair)
    assert tre(strided, simulated_pair) < 0.4 * tre(torch.zeros_like(whole), simulated_pair)


def test_mask_restricts_the_similarity():
    """Fixed and moving differ only outside the mask: with the mask there is nothing to register."""
    fixed = blobs((24, 24, 24), seed=4)
    moving = fixed.clone()
    moving[..., 16:] = torch.roll(fixed, shifts=2, dims=2)[..., 16:]
    mask = torch.zeros_like(fixed)
    mask[..., :10] = 1
    masked = instance_optimize(fixed, moving, 0.05, 0.05, steps=20, mask=mask, levels=1)
    unmasked = instance_optimize(fixed, moving, 0.05, 0.05, steps=20, levels=1)
    assert masked.abs().mean() < 0.06 and masked.abs().max() < 0.5
    assert unmasked.abs().mean() > 0.3 and unmasked.abs().max() > 2.0


def test_batch_agrees_with_single_pairs_at_per_sample_parameters():
    fixed = torch.cat([blobs((16, 16, 16), seed=5), blobs((16, 16, 16), seed=6)])
    moving = warp_image(fixed, smooth_field((16, 16, 16), 1.0).expand(2, -1, -1, -1, -1))
    lam, mu = torch.tensor([0.05, 0.5]), torch.tensor([0.02, 0.3])
    batch = instance_optimize(fixed, moving, lam, mu, steps=10, levels=1)
    for b in range(2):
        single = instance_optimize(fixed[b : b + 1], moving[b : b + 1], lam[b], mu[b], steps=10, levels=1)
        assert torch.allclose(batch[b : b + 1], single, atol=1e-4)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_diffeomorphic_option_stays_fold_free(simulated_pair):
    ddf = instance_optimize(simulated_pair["fixed"], simulated_pair["moving"], 0.01, 0.01, steps=30, diffeomorphic=True)
    assert folding_percent(ddf).item() == 0.0
    assert tre(ddf, simulated_pair) < 0.5 * tre(torch.zeros_like(ddf), simulated_pair)


def test_lncc_similarity_also_registers(simulated_pair):
    before = tre(torch.zeros(1, 3, 40, 40, 40), simulated_pair)
    ddf = instance_optimize(simulated_pair["fixed"], simulated_pair["moving"], 0.083, 0.03, similarity="lncc", steps=40)
    assert tre(ddf, simulated_pair) < 0.7 * before


def test_prealignment_is_composed_into_the_field(simulated_pair):
    """A pair offset by 33 mm (a patient placed differently on the table) is registered through the pre-alignment."""
    fixed, moving, spacing = simulated_pair["fixed"], simulated_pair["moving"], simulated_pair["spacing"]
    shift_voxels = torch.tensor([3.0, -3.0, 1.0])  # whole voxels (about 25, -18 and 9 mm), so no interpolation blur
    shifted = warp_image(moving, -shift_voxels.reshape(1, 3, 1, 1, 1).expand(1, 3, 40, 40, 40), padding_mode="zeros")
    pair = dict(simulated_pair, moving_points=simulated_pair["moving_points"] + shift_voxels)
    affine = prealign(fixed, shifted, spacing, transform="translation", steps=50, factor=2)
    ddf = instance_optimize(fixed, shifted, 0.083, 0.03, steps=40, affine=affine)
    assert tre(torch.zeros_like(ddf), pair) > 25
    # as good as the optimisation told the true offset (the part of the anatomy shifted out of the image is lost)
    true = Affine(torch.eye(3)[None], (shift_voxels * torch.tensor(spacing))[None], spacing)
    told = instance_optimize(fixed, shifted, 0.083, 0.03, steps=40, affine=true)
    assert tre(ddf, pair) < 1.2 * tre(told, pair)
    assert tre(ddf, pair) < 0.5 * tre(torch.zeros_like(ddf), simulated_pair)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(moving=torch.zeros(1, 1, 16, 16, 17)), "on one grid"),
        (dict(fixed=torch.zeros(1, 2, 16, 16, 16)), "single-channel"),
        (dict(moving=torch.full((1, 1, 16, 16, 16), float("nan"))), "moving image contains non-finite"),
        (dict(spacing=(1.0, 0.0, 1.0)), "positive, finite voxel sizes"),
        (dict(similarity="mse"), "similarity must be one of"),
        (dict(lam=-1.0), "lam must be finite and non-negative"),
        (dict(init_ddf=torch.zeros(1, 3, 8, 8, 8)), "init_ddf must have shape"),
        (dict(mask=torch.zeros(1, 1, 16, 16, 16)), "mask is empty"),
        (dict(levels=0), "levels >= 1"),
        (dict(similarity_stride=0), "similarity_stride must be >= 1"),
        (dict(similarity_stride=[1, 2]), "similarity_stride \\[1, 2\\] gives 2 levels"),
        (dict(similarity="lncc", similarity_stride=2), "needs a voxel-wise similarity"),
    ],
)
def test_bad_input_is_refused(change, message):
    image = blobs((16, 16, 16))
    arguments = dict(fixed=image, moving=image, lam=0.1, mu=0.1, steps=1)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        instance_optimize(**arguments)


# ---------------------------------------------------------------------------- in the evaluator's step


class _ZeroNetwork(torch.nn.Module):
    """A stand-in registration network predicting the identity (no trained model)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def generate_weights(self, hyper):
        return {}

    def forward(self, x, weights=None):
        return torch.zeros(x.shape[0], 3, *x.shape[2:]) * self.unused


def _register(pair, instance):
    from monai.data import MetaTensor
    from monai.engines import SupervisedEvaluator

    from elastic_hypermorph_bundle.workflow.steps import RegisterStep

    affine = torch.diag(torch.tensor([*pair["spacing"], 1.0]))
    batch = {
        "fixed_image": MetaTensor(pair["fixed"], affine=affine),
        "moving_image": MetaTensor(pair["moving"], affine=affine),
        "fixed_mask": pair["mask"],
        "pair_id": ["p"],
    }
    step = RegisterStep(torch.tensor([[0.083, 0.03]]), instance=instance)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=[batch], network=_ZeroNetwork(), iteration_update=step,
        decollate=False,
    )
    evaluator.run()
    return evaluator.state.output["pred"]


def test_register_step_optimises_the_network_field(simulated_pair):
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

    network_only = _register(simulated_pair, None)
    assert network_only.abs().max() == 0
    optimised = _register(simulated_pair, InstanceOptimization(steps=40, prealign="affine", use_mask=True))
    assert tre(optimised, simulated_pair) < 0.4 * tre(network_only, simulated_pair)


def test_instance_settings_refuse_bad_values(caplog):
    from elastic_hypermorph_bundle.hyperparams import HyperSpace
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

    with pytest.raises(ValueError, match="similarity must be one of"):
        InstanceOptimization(steps=10, similarity="ssd")
    with pytest.raises(ValueError, match="prealign must be one of"):
        InstanceOptimization(prealign="bspline")
    assert not InstanceOptimization(steps=10, hyper_space=HyperSpace("diffusion")).optimizes  # no (lam, mu) to use
    with pytest.raises(ValueError, match="use_mask"):
        InstanceOptimization(use_mask="maybe")
    assert InstanceOptimization(similarity_stride=[1, 1, 2]).similarity_stride == (1, 1, 2)
    # LNCC compares windows: the (default) stride does not apply, and the log says so
    with caplog.at_level(logging.WARNING, logger="elastic_hypermorph_bundle"):
        assert InstanceOptimization(similarity="lncc", similarity_stride=[1, 1, 2]).similarity_stride == (1, 1, 1)
    assert "instance_similarity_stride [1, 1, 2] does not apply" in caplog.text
    with pytest.raises(ValueError, match="instance_similarity_stride must be >= 1"):
        InstanceOptimization(similarity_stride=[1, 0, 2])
    with pytest.raises(ValueError, match="--use_mask true needs a fixed mask"):
        InstanceOptimization(steps=1, use_mask=True).mask({"fixed_image": torch.zeros(1)})
    fixed = InstanceOptimization(steps=1, hyper_space=HyperSpace("elastic_fixed"), fixed_lam=4.0, fixed_mu=2.0)
    lam, mu = fixed.elastic_parameters(torch.tensor([[0.5]]))
    assert lam.item() == 2.0 and mu.item() == 1.0
