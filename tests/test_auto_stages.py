"""The test-time stages that decide by what they achieve (issue 18): ``prealign="auto"`` keeps a global map only when
it clearly beats the identity (a follow-up in another position is aligned, a breathing-only pair is not moved), and
the optimisation continues from the better of the network's start and the identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from elastic_hypermorph_bundle.networks.spatial import Affine, affine_ddf
from elastic_hypermorph_bundle.networks.warp import warp_image
from elastic_hypermorph_bundle.optimize import auto_prealign, instance_optimize, start_objective
from elastic_hypermorph_bundle.simulation.generator import simulate_pair
from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

SIZE = (48, 48, 48)


def _window(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((np.clip(image, -1000, 500) + 1000) / 1500).astype(np.float32))[None, None]


@pytest.fixture(scope="module")
def breathing():
    """A realistic breath-hold pair of the phantom (no offset between the scans)."""
    pair = simulate_pair(SIZE, seed=7, preset="realistic")
    return pair, _window(pair.fixed_image), _window(pair.moving_image)


def _tre(ddf: torch.Tensor, fixed_points, moving_points, spacing) -> float:
    u = np.stack([ndimage.map_coordinates(c, fixed_points.T, order=1) for c in ddf[0].double().numpy()], 1)
    return float(np.linalg.norm((fixed_points + u - moving_points) * spacing, axis=1).mean())


@pytest.fixture(scope="module")
def followup(breathing):
    """The breathing pair's moving image seen through a rigid motion of 35 mm (mostly along the body) and 8 deg,
    and its keypoints moved likewise."""
    pair, fixed, moving = breathing
    spacing = pair.spacing
    angle = math.radians(8.0)
    rotation = torch.tensor([[1.0, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    motion = Affine(rotation[None], torch.tensor([[6.0, -8.0, 33.0]]), spacing)
    moved = warp_image(moving, affine_ddf(motion, SIZE))  # moved(x) = moving(T(x)): T^-1 maps the anatomy
    # a fixed point x sits at T^-1(x + u(x)) in the moved image; the map found must bring it back
    voxels = np.asarray(spacing)
    centre = (np.asarray(SIZE) - 1) / 2 * voxels
    # T(p) = R (p - c) + c + t, so T^-1(q) = R^T (q - c - t) + c (row vectors: (q - c - t) @ R)
    moving_mm = pair.moving_keypoints * voxels
    moving_points = ((moving_mm - centre - motion.translation[0].numpy()) @ rotation.numpy() + centre) / voxels
    return moved, moving_points


@pytest.mark.slow
def test_a_large_offset_and_rotation_is_captured(breathing, followup):
    pair, fixed, moving = breathing
    moved, moving_points = followup
    voxels = np.asarray(pair.spacing)
    affine, record = auto_prealign(fixed, moved, pair.spacing, steps=40)
    assert record["prealign_applied"].item() == 1.0 and affine is not None
    assert record["prealign_similarity_rigid"].item() < 0.75 * record["prealign_similarity_identity"].item()
    before = _tre(torch.zeros(1, 3, *SIZE), pair.fixed_keypoints, moving_points, voxels)
    after = _tre(affine_ddf(affine, SIZE), pair.fixed_keypoints, moving_points, voxels)
    breathing_only = _tre(torch.zeros(1, 3, *SIZE), pair.fixed_keypoints, pair.moving_keypoints, voxels)
    assert before > 30.0 and after < breathing_only + 3.0, (before, after, breathing_only)


@pytest.mark.slow
def test_the_stages_keep_the_rigid_map_of_a_large_offset_by_their_start_objective(breathing, followup):
    """``prealign auto`` in the stages: the rigid map (no scaling) is kept because the optimisation's start
    objective with it is lower than without it, and the registration brings the keypoints back."""
    pair, fixed, moving = breathing
    moved, moving_points = followup
    voxels = np.asarray(pair.spacing)
    stages = InstanceOptimization(steps=5, levels=2, prealign="auto", prealign_steps=40)
    ddf = stages.register(None, fixed, moved, torch.tensor([[0.083, 0.03]]), pair.spacing)
    record = stages.record
    assert record["prealign_applied"].item() == 1.0
    assert record["start_objective_with_map"].item() < record["start_objective_without_map"].item()
    stages.register(lambda m: torch.zeros(1, 3, *SIZE), fixed, moved, torch.tensor([[0.083, 0.03]]), pair.spacing)
    assert {"start_network", "start_objective_with_map"} <= set(stages.record)  # both decisions recorded
    breathing_only = _tre(torch.zeros(1, 3, *SIZE), pair.fixed_keypoints, pair.moving_keypoints, voxels)
    assert _tre(ddf, pair.fixed_keypoints, moving_points, voxels) < breathing_only + 3.0


def _propose_scaling_map(monkeypatch, spacing) -> Affine:
    """Make ``auto`` propose a global map that absorbs part of the breathing (a cranio-caudal scaling of 6 % plus
    8 mm, its coarse similarity half the identity's); return the map."""
    from elastic_hypermorph_bundle.workflow import instance

    scaling = Affine(torch.diag(torch.tensor([1.0, 1.0, 0.94]))[None], torch.tensor([[0.0, 0.0, 8.0]]), spacing)
    proposed = {"prealign_similarity_identity": torch.ones(1), "prealign_similarity_rigid": torch.full((1,), 0.5),
                "prealign_applied": torch.ones(1)}
    monkeypatch.setattr(instance, "auto_prealign", lambda *args, **kwargs: (scaling, dict(proposed)))
    return scaling


def test_a_proposed_map_that_does_not_lower_the_start_objective_is_dropped(breathing, monkeypatch):
    """A breathing-only pair for which ``auto`` proposes a global map that absorbs part of the breathing (here a
    cranio-caudal scaling of 6 % plus 8 mm): the network's start from the moving image as it is has the lower
    objective, so the map is dropped and the result is the registration without pre-alignment."""
    pair, fixed, moving = breathing
    hyper = torch.tensor([[0.083, 0.03]])
    truth = torch.from_numpy(pair.displacement)[None]
    _propose_scaling_map(monkeypatch, pair.spacing)
    # the network reads each candidate's moving image: on the image as it is, it gives the true field
    predict = lambda m: truth if m is moving else torch.zeros_like(truth)  # noqa: E731
    stages = InstanceOptimization(steps=5, levels=2, prealign="auto")
    ddf = stages.register(predict, fixed, moving, hyper, pair.spacing)
    record = stages.record
    assert record["prealign_applied"].item() == 0.0 and record["start_network"].item() == 1.0
    assert record["start_objective_without_map"].item() < record["start_objective_with_map"].item()
    expected = InstanceOptimization(steps=5, levels=2, prealign="none").register(predict, fixed, moving, hyper,
                                                                                 pair.spacing)
    assert torch.equal(ddf, expected)


def test_the_network_alone_keeps_a_proposed_map_by_the_same_start_objective(breathing, monkeypatch):
    """``--instance_steps 0`` (the network alone) decides ``auto``'s proposed map by the same rule as with the
    optimisation: the network's field with the map against the network's field of the moving image as it is, by
    the start objective at (lam, mu); the network's field is the result (no start selection: the identity is not
    taken even where its objective is lower). Here the map only absorbs part of the breathing, so it is dropped;
    where the network's field of the image as it is is rough (a high elastic energy), the map is kept and composed."""
    from elastic_hypermorph_bundle.networks.spatial import compose_affine

    pair, fixed, moving = breathing
    hyper = torch.tensor([[0.083, 0.03]])
    truth = torch.from_numpy(pair.displacement)[None]
    scaling = _propose_scaling_map(monkeypatch, pair.spacing)
    stages = InstanceOptimization(steps=0, prealign="auto")
    predict = lambda m: truth if m is moving else 0.5 * truth  # noqa: E731  (true on the image as it is)
    ddf = stages.register(predict, fixed, moving, hyper, pair.spacing)
    record = stages.record
    assert record["prealign_applied"].item() == 0.0 and "start_network" not in record
    assert record["start_objective_without_map"].item() < record["start_objective_with_map"].item()
    assert torch.equal(ddf, truth)  # the network alone on the moving image as it is
    rough = 3.0 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))  # much elastic energy
    predict = lambda m: rough if m is moving else torch.zeros_like(truth)  # noqa: E731
    kept = stages.register(predict, fixed, moving, hyper, pair.spacing)
    record = stages.record
    assert record["prealign_applied"].item() == 1.0
    assert record["start_objective_with_map"].item() < record["start_objective_without_map"].item()
    assert torch.equal(kept, compose_affine(scaling, torch.zeros_like(truth)))


@pytest.mark.slow
def test_a_breathing_only_pair_is_not_moved(breathing):
    pair, fixed, moving = breathing
    affine, record = auto_prealign(fixed, moving, pair.spacing, steps=40)
    assert affine is None and record["prealign_applied"].item() == 0.0
    stages = InstanceOptimization(steps=0, prealign="auto", prealign_steps=40)
    ddf = stages.register(None, fixed, moving, torch.tensor([[0.083, 0.03]]), pair.spacing)
    assert ddf.abs().max() == 0.0 and stages.record["prealign_applied"].item() == 0.0


def test_a_network_start_worse_than_the_identity_is_not_taken(breathing):
    pair, fixed, moving = breathing
    hyper = torch.tensor([[0.083, 0.03]])
    truth = torch.from_numpy(pair.displacement)[None]
    bad = -2.0 * truth  # a start that moves the anatomy the wrong way
    kwargs = {"similarity": "mind", "levels": 2, "grid": 2.0}
    assert start_objective(fixed, moving, 0.083, 0.03, bad, **kwargs) > start_objective(fixed, moving, 0.083, 0.03, None, **kwargs)
    assert start_objective(fixed, moving, 0.083, 0.03, truth, **kwargs) < start_objective(fixed, moving, 0.083, 0.03, None, **kwargs)
    stages = InstanceOptimization(steps=5, levels=2, prealign="none")
    from_bad = stages.register(lambda m: bad, fixed, moving, hyper, pair.spacing)
    assert stages.record["start_network"].item() == 0.0
    from_identity = InstanceOptimization(steps=5, levels=2, prealign="none").register(None, fixed, moving, hyper, pair.spacing)
    assert torch.allclose(from_bad, from_identity, atol=1e-5)  # continued from the identity
    stages.register(lambda m: truth, fixed, moving, hyper, pair.spacing)
    assert stages.record["start_network"].item() == 1.0  # a good start is kept
    finest = start_objective(fixed, moving, 0.083, 0.03, truth, similarity="mind", levels=1, grid=2.0)
    assert torch.allclose(stages.record["start_objective_network"], finest)  # judged on the finest grid
    without = InstanceOptimization(steps=5, levels=2, prealign="none", select_start="false")
    assert not torch.allclose(without.register(lambda m: bad, fixed, moving, hyper, pair.spacing), from_identity)


@pytest.mark.parametrize("prealign", ["none", "auto"])
def test_a_pair_s_descriptors_are_computed_once_for_the_start_s_choice_and_the_optimisation(breathing, monkeypatch,
                                                                                           prealign):
    """With the start's choice on, the MIND descriptors of both images are computed once per registration (not once
    per start objective, again by the optimisation and, with ``prealign auto``, by its check), and the field is
    exactly the one they give recomputed."""
    from elastic_hypermorph_bundle.losses import similarity

    pair, fixed, moving = breathing
    truth = torch.from_numpy(pair.displacement)[None]
    expected = instance_optimize(fixed, moving, 0.083, 0.03, truth, steps=5, levels=2)  # the network's start wins
    calls = []
    row = similarity.SIMILARITIES["mind"]
    counted = row._replace(prepare=lambda image: calls.append(1) or row.prepare(image))
    monkeypatch.setitem(similarity.SIMILARITIES, "mind", counted)
    stages = InstanceOptimization(steps=5, levels=2, prealign=prealign)
    ddf = stages.register(lambda m: truth, fixed, moving, torch.tensor([[0.083, 0.03]]), pair.spacing)
    assert stages.record["start_network"].item() == 1.0 and len(calls) == 2  # fixed and moving, once each
    if prealign == "auto":  # a breathing-only pair: checked, and left as it is
        assert stages.record["prealign_applied"].item() == 0.0
    assert torch.equal(ddf, expected)
