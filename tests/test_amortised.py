"""Amortised optimisation (issue 19, item 3a): the term that pulls the network's field at a cached (lam, mu) towards
the instance optimisation's, its cache of targets, the training step that uses it and the config that wires it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from elastic_hypermorph_bundle.data.transforms import registration_transforms
from elastic_hypermorph_bundle.forward import plain
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.losses.amortised import AmortisedTargets, amortised_error, amortised_targets
from elastic_hypermorph_bundle.networks import HyperUNet
from elastic_hypermorph_bundle.optimize import instance_optimize
from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
from elastic_hypermorph_bundle.workflow.amortised import build_targets, default_grid, training_keys
from elastic_hypermorph_bundle.workflow.datalists import pair_datalist
from elastic_hypermorph_bundle.workflow.train_step import TrainStep, loss_terms

pytestmark = pytest.mark.filterwarnings("ignore:.*Using PyTorch native grid_sample")

ROOT = Path(__file__).resolve().parents[1]
SMALL_NET = dict(encoder_features=(4,), decoder_features=(4, 4), hyper_hidden=8, hyper_layers=2)
GRID = [[0.0, 0.0], [1.0, 1.0]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three simulated pairs at 16^3 (with lung masks), shared by the tests that read a dataset."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("amortised") / "data", num_pairs=3, spatial_size=(16, 16, 16), seed=0)


def _cache(path: Path, pairs=("p0", "p1"), size: int = 16) -> Path:
    fields = torch.randn(len(pairs), len(GRID), 3, size, size, size, generator=torch.Generator().manual_seed(0))
    np.savez(path, pair_ids=np.array(pairs), hyper=np.array(GRID, np.float32), fields=fields.numpy().astype(np.float16))
    return path


def test_the_error_is_zero_at_the_target_and_the_mean_squared_difference_in_voxels():
    target = torch.randn(2, 3, 8, 8, 8)
    assert torch.equal(amortised_error(target, target), torch.zeros(2))
    offset = torch.tensor([1.0, 2.0, 2.0]).view(1, 3, 1, 1, 1)  # a constant shift: (1 + 4 + 4) / 3 voxels²
    assert torch.allclose(amortised_error(target + offset, target), torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="another grid"):
        amortised_error(target, target[..., :4])


def test_the_masked_error_is_the_mean_over_the_mask():
    generator = torch.Generator().manual_seed(2)
    ddf, target = torch.randn(2, 3, 6, 6, 6, generator=generator), torch.randn(2, 3, 6, 6, 6, generator=generator)
    # a mask of ones is the unmasked error
    assert torch.allclose(amortised_error(ddf, target, torch.ones(2, 1, 6, 6, 6)), amortised_error(ddf, target))
    # fields that differ only outside the mask: 0
    mask = torch.zeros(2, 1, 6, 6, 6)
    mask[:, :, 1:4, 2:5, :3] = 1
    outside = target + torch.randn(2, 3, 6, 6, 6, generator=generator) * (1 - mask)
    assert torch.equal(amortised_error(outside, target, mask), torch.zeros(2))
    # a shift (1, 2, 2) voxels inside the mask and anything outside it: (1 + 4 + 4) / 3 voxels² per sample
    offset = torch.tensor([1.0, 2.0, 2.0]).view(1, 3, 1, 1, 1)
    assert torch.allclose(amortised_error(outside + offset * mask, target, mask), torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="does not fit"):
        amortised_error(ddf, target, mask[..., :3])
    mask[1] = 0
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] is empty"):
        amortised_error(ddf, target, mask)


def test_a_masked_term_refuses_a_batch_without_a_mask_and_needs_the_fixed_mask_loaded(tmp_path):
    path = _cache(tmp_path / "targets.npz")
    masked = AmortisedTargets(path, mask="true")
    ddf, target = torch.zeros(1, 3, 4, 4, 4), torch.ones(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="no 'fixed_mask'"):
        masked(ddf, target)
    assert float(masked(ddf, target, torch.ones(1, 1, 4, 4, 4))) == pytest.approx(1.0)
    assert training_keys(masked) == ["fixed_image", "moving_image", "fixed_mask"]
    assert training_keys(AmortisedTargets(path)) == training_keys(None) == ["fixed_image", "moving_image"]
    with pytest.raises(ValueError, match="--amortised_mask"):
        amortised_targets(None, mask="maybe")


def test_the_cache_is_checked_and_off_by_default(tmp_path):
    path = _cache(tmp_path / "targets.npz")
    assert amortised_targets(None, 1.0) is None and amortised_targets(str(path), 0.0) is None
    assert amortised_targets(str(path), 0.5).weight == 0.5
    with pytest.raises(ValueError, match="amortised_weight"):
        AmortisedTargets(path, weight=-1)
    with pytest.raises(ValueError, match="amortised_fraction"):
        AmortisedTargets(path, fraction=0)
    with pytest.raises(FileNotFoundError, match="amortised_targets"):
        AmortisedTargets(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", pair_ids=np.array(["p0"]), hyper=np.zeros((2, 2), np.float32),
             fields=np.zeros((1, 3, 3, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        AmortisedTargets(tmp_path / "bad.npz")


def test_a_cached_batch_trains_at_grid_points_with_the_term_and_its_gradient_reaches_the_hypernetwork(tmp_path):
    cache = AmortisedTargets(_cache(tmp_path / "targets.npz"), weight=2.0, fraction=1.0)
    space = HyperSpace("elastic")
    torch.manual_seed(0)
    network = HyperUNet(spatial_dims=3, hyper_dims=2, **SMALL_NET)
    images = torch.rand(4, 2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    batches = [{"fixed_image": images[0], "moving_image": images[1], "pair_id": ["p1", "p0"]},
               {"fixed_image": images[2], "moving_image": images[3], "pair_id": ["p0", "other"]}]
    outputs = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0), loss_function=RegistrationLoss(kernel_size=3),
        iteration_update=TrainStep(space, seed=0, amortised=cache), decollate=False)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(dict(engine.state.output)))
    trainer.run()
    cached, uncached = outputs
    # the cached batch: each sample at a grid point, the term is w * mean squared difference to that point's target
    rows = [next(i for i, point in enumerate(GRID) if torch.equal(row, torch.tensor(point))) for row in cached["hyper"]]
    targets = torch.stack([cache.fields[pair, point].float() for pair, point in zip((1, 0), rows)])
    assert float(cached["amortised"]) == pytest.approx(2.0 * float(amortised_error(cached["pred"].detach(), targets).mean()), rel=1e-5)
    assert float(cached["loss"]) == pytest.approx(
        float(cached["similarity"] + cached["regularization"] + cached["amortised"]), rel=1e-5)
    # a batch with a pair the cache does not hold keeps its sampled rows and the unsupervised loss
    assert "amortised" not in uncached and set(loss_terms(cached)) == {"loss", "similarity", "regularization", "amortised"}
    assert not any(torch.equal(row, torch.tensor(point)) for row in uncached["hyper"] for point in GRID)
    # the term's gradient reaches the hypernetwork (the part that maps (lam, mu) to the weights)
    network.zero_grad()
    hyper = cache.hyper
    cache(network(torch.cat([images[1], images[0]], 1), hyper), cache.fields[[1, 0], [0, 1]].float()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.hypernetwork.parameters())


def test_a_grid_point_outside_the_trained_range_is_refused(tmp_path):
    cache = AmortisedTargets(_cache(tmp_path / "targets.npz"))
    with pytest.raises(ValueError, match="outside the trained range"):
        TrainStep(HyperSpace("elastic", lam_range=(0.0, 0.5)), amortised=cache)
    with pytest.raises(ValueError, match="alpha"):
        TrainStep(HyperSpace("diffusion"), amortised=cache)


def test_train_config_wires_the_term(tmp_path):
    path = _cache(tmp_path / "targets.npz")
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    assert parser.get_parsed_content("train#iteration_update").amortised is None  # off by default
    parser["amortised_targets"], parser["amortised_weight"], parser["amortised_fraction"] = str(path), 0.3, 0.25
    parser.parse()
    step = parser.get_parsed_content("train#iteration_update")
    assert (step.amortised.path, step.amortised.weight, step.amortised.fraction) == (str(path), 0.3, 0.25)
    assert not step.amortised.masked and parser.get_parsed_content("train#datalist#keys") == ["fixed_image", "moving_image"]


def test_the_masked_term_trains_on_the_datasets_fixed_mask_and_refuses_a_batch_without_one(tmp_path, dataset):
    """train.json with --amortised_mask true loads the fixed (lung) mask into the batches, and the term is the
    error over it; a batch without its mask (a dataset without masks) stops training, naming the option."""
    data = dataset
    pair = pair_datalist(data, "train")[0]
    fields = torch.randn(1, 1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    np.savez(tmp_path / "targets.npz", pair_ids=np.array([pair["pair_id"]]), hyper=np.array([[0.5, 0.5]], np.float32),
             fields=fields.numpy())
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"dataset_dir": str(data), "spatial_size": [16, 16, 16], "amortised_targets": str(tmp_path / "targets.npz"),
                   "amortised_fraction": 1.0, "amortised_mask": "true", "num_workers": 0, "train#datalist#split": "all"})
    parser.parse()
    datalist = [p for p in parser.get_parsed_content("train#datalist") if p["pair_id"] == pair["pair_id"]]
    assert set(datalist[0]) == {"pair_id", "fixed_image", "moving_image", "fixed_mask"}
    loaded = parser.get_parsed_content("train#preprocessing")(datalist[0])
    batch = {key: loaded[key][None] for key in ("fixed_image", "moving_image", "fixed_mask")} | {"pair_id": [pair["pair_id"]]}
    assert 0 < float(batch["fixed_mask"].sum()) < batch["fixed_mask"].numel()
    step = parser.get_parsed_content("train#iteration_update")
    torch.manual_seed(0)
    network = HyperUNet(spatial_dims=3, hyper_dims=2, **SMALL_NET)
    outputs = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch, {k: v for k, v in batch.items() if k != "fixed_mask"}],
        network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.0),
        loss_function=RegistrationLoss(kernel_size=3), iteration_update=step, decollate=False)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(dict(engine.state.output)))
    with pytest.raises(ValueError, match="no 'fixed_mask'"):
        trainer.run()
    (masked,) = outputs  # the first batch trained, the one without its mask was refused
    expected = amortised_error(masked["pred"].detach(), fields[:, 0], batch["fixed_mask"].as_tensor())
    assert float(masked["amortised"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(masked["amortised"]) != pytest.approx(float(amortised_error(masked["pred"].detach(), fields[:, 0])), rel=1e-3)


def test_the_targets_are_the_instance_optimisation_of_each_training_pair_on_the_network_grid(tmp_path, dataset):
    data = dataset
    grid = [(0.0, 0.0), (0.5, 0.25)]
    path = build_targets(data, tmp_path / "targets.npz", spatial_size=[16, 16, 16], grid=grid, max_pairs=1, steps=2,
                         dtype="float32")
    cache = AmortisedTargets(path)
    pair = pair_datalist(data, "train", keys=["fixed_image", "moving_image"])[0]
    assert list(cache.index) == [pair["pair_id"]] and cache.hyper.tolist() == [list(row) for row in grid]
    loaded = registration_transforms([16, 16, 16], with_masks=False, with_keypoints=False, with_landmarks=False)(pair)
    fixed, moving = (plain(loaded[key])[None].float() for key in ("fixed_image", "moving_image"))
    for point, (lam, mu) in enumerate(grid):
        expected = instance_optimize(fixed, moving, lam, mu, None, steps=2)[0]
        assert torch.allclose(cache.fields[0, point], expected, atol=1e-5)
    assert not torch.allclose(cache.fields[0, 0], cache.fields[0, 1])  # (lam, mu) change the optimum
    with pytest.raises(ValueError, match="exists"):
        build_targets(data, path, spatial_size=[16, 16, 16], grid=grid, max_pairs=1, steps=2)
    assert default_grid()[0] == (0.0, 0.0) and len(default_grid()) == 10
