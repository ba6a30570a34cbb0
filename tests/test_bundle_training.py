"""Tests for the training workflow: the HyperMorph training step, output-folder rules, the trained-model export,
and end to end through ``python -m monai.bundle run`` (configs/train.json, configs/multi_gpu_train.json) on a tiny
simulated dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer

from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.model_card import ModelCard
from elastic_hypermorph_bundle.networks import HyperUNet
from elastic_hypermorph_bundle.physics import LAI_FOOK
from elastic_hypermorph_bundle.workflow.checkpoints import BEST_CHECKPOINT, latest_checkpoint, prepare_outputs
from elastic_hypermorph_bundle.workflow.export import ExportTrainedModel
from elastic_hypermorph_bundle.workflow.train_step import TrainStep, loss_terms

pytestmark = pytest.mark.filterwarnings("ignore:.*Using PyTorch native grid_sample")

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(BUNDLE_ROOT / "configs" / "train.json")
MULTI_GPU = str(BUNDLE_ROOT / "configs" / "multi_gpu_train.json")
#: a 1-level HyperUNet: in-process tests on 16^3 volumes
SMALL_NET = dict(encoder_features=(4,), decoder_features=(4, 4), hyper_hidden=8, hyper_layers=2)
#: network overrides of the end-to-end runs (the default 4-level net on 32^3, but narrow)
TINY_OVERRIDES = [
    "--spatial_size", "[32, 32, 32]",
    "--num_workers", "0",
    "--network_kwargs#encoder_features", "[4, 4, 4, 4]",
    "--network_kwargs#decoder_features", "[4, 4, 4, 4, 4, 4, 4]",
    "--network_kwargs#hyper_hidden", "8",
    "--network_kwargs#hyper_layers", "2",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- in-process tests


def _trainer(hyper_space: HyperSpace, batches: list[dict], seed: int = 0, epochs: int = 1) -> SupervisedTrainer:
    torch.manual_seed(0)
    network = HyperUNet(spatial_dims=3, hyper_dims=hyper_space.dims, **SMALL_NET)
    loss = RegistrationLoss(regularizer=hyper_space.regularizer, spatial_dims=3, kernel_size=3)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=batches,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-2),
        loss_function=loss,
        iteration_update=TrainStep(hyper_space, seed=seed),
    )


def _batches(num: int, batch_size: int = 2, size: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    shape = (batch_size, 1, size, size, size)
    return [
        {"fixed_image": torch.rand(shape, generator=generator), "moving_image": torch.rand(shape, generator=generator)}
        for _ in range(num)
    ]


def test_train_step_draws_rows_per_sample_and_updates_the_network():
    space = HyperSpace("elastic", lam_range=(0.1, 0.5), mu_range=(0.2, 0.3))
    trainer = _trainer(space, _batches(2))
    before = [p.detach().clone() for p in trainer.network.parameters()]
    rows = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: rows.append(e.state.output[0]["hyper"]))
    trainer.run()
    output = trainer.state.output[0]  # decollated: one dict per sample, scalars replicated
    assert {"image", "pred", "hyper", "loss", "similarity", "regularization"} <= set(output)
    assert output["pred"].shape == (3, 16, 16, 16)
    # paper weighting: loss = similarity + (weighted) regularization, per batch mean
    assert float(output["loss"]) == pytest.approx(float(output["similarity"] + output["regularization"]), abs=1e-5)
    assert set(loss_terms(trainer.state.output)) == {"loss", "similarity", "regularization"}
    # each sample has its own row inside the trained ranges
    samples = torch.stack([o["hyper"] for o in trainer.state.output])
    assert not torch.equal(samples[0], samples[1])
    assert ((samples >= space.low) & (samples <= space.high)).all()
    assert not torch.equal(rows[0], rows[1])  # new rows every iteration
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, trainer.network.parameters())]
    assert all(changed), "every parameter (hypernetwork and generated convs) must receive gradient updates"


def test_training_terms_are_forward_warp_and_loss_of_the_network_input():
    """The one training step of the bundle (engine, benchmark): x = cat([moving, fixed]), then the loss of the
    moving image warped by the predicted field, with the velocity for velocity regularization."""
    from elastic_hypermorph_bundle.forward import network_input, training_terms
    from elastic_hypermorph_bundle.networks import warp_image

    torch.manual_seed(0)
    network = HyperUNet(spatial_dims=3, hyper_dims=2, diffeomorphic=True, **SMALL_NET)
    moving, fixed = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    hyper = torch.tensor([[0.2, 0.1], [0.9, 0.5]])
    loss = RegistrationLoss("elastic", regularize="velocity")
    seen = []
    terms = training_terms(network, loss, moving, fixed, hyper, on_forward=seen.append)
    ddf, velocity = network(torch.cat([moving, fixed], dim=1), hyper, return_velocity=True)
    expected = loss(warp_image(moving, ddf), fixed, ddf, hyper, velocity=velocity, return_components=True)
    for key in ("loss", "similarity", "regularization"):
        assert float(terms[key]) == pytest.approx(float(expected[key]), rel=1e-5)
    assert torch.equal(terms["image"], torch.cat([moving, fixed], dim=1)) and seen[0] is terms["pred"]
    terms["loss"].backward()
    assert all(p.grad is not None for p in network.parameters())
    with pytest.raises(ValueError, match="one shape"):
        network_input(moving, fixed[:, :, :8])


def test_train_step_rows_depend_only_on_seed_and_iteration():
    space = HyperSpace("diffusion", alpha_range=(0.0, 1.0))

    def rows(seed):
        trainer = _trainer(space, _batches(2, batch_size=3), seed=seed)
        drawn = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: drawn.append(e.state.output[0]["hyper"]))
        trainer.run()
        return torch.stack(drawn)

    assert torch.equal(rows(3), rows(3))
    assert not torch.equal(rows(3), rows(4))


def test_train_step_rejects_batches_without_images():
    trainer = _trainer(HyperSpace("elastic"), [{"fixed_image": torch.rand(1, 1, 16, 16, 16)}])
    with pytest.raises(ValueError, match="moving_image"):
        trainer.run()


def test_latest_checkpoint_orders_epochs_numerically(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (9, 10, 2):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").touch()
    (tmp_path / "model.pt").touch()
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=10.pt"


def test_prepare_outputs_refuses_overwrites_and_resumes(tmp_path):
    data = tmp_path / "data"
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("not ours")
    # resume without a checkpoint: refused before anything is written
    with pytest.raises(FileNotFoundError, match="no checkpoint_epoch"):
        prepare_outputs(ckpt, out, data, resume=True)
    assert not out.exists()
    (ckpt / "model.pt").touch()
    (ckpt / "checkpoint_epoch=3.pt").touch()
    for resume in (False, "false"):  # the command line gives "--resume false" as a string
        with pytest.raises(FileExistsError, match="--resume true.*--overwrite true"):
            prepare_outputs(ckpt, out, data, resume=resume)
    with pytest.raises(ValueError, match="--overwrite must be true or false"):
        prepare_outputs(ckpt, out, data, overwrite="yes")
    assert not out.exists() and (ckpt / "model.pt").exists()
    # secondary ranks check but write nothing (and so need no dataset)
    prepare_outputs(ckpt, out, data, resume=True, main_process=False)
    assert (ckpt / "checkpoint_epoch=3.pt").exists() and not out.exists()


def test_prepare_outputs_overwrite_removes_only_training_files_and_writes_the_split(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_pairs=3, spatial_size=(16, 16, 16), seed=0)
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    ckpt.mkdir()
    for name in ("model.pt", "model.json", BEST_CHECKPOINT, "checkpoint_epoch=1.pt", "notes.txt"):
        (ckpt / name).touch()
    split = prepare_outputs(ckpt, out, data, seed=0, overwrite=True)
    (aside,) = ckpt.glob(".replaced-*")  # the earlier training waits there until the new one completes
    assert sorted(p.name for p in ckpt.iterdir() if p != aside) == ["notes.txt", "split.json"]
    assert sorted(p.name for p in aside.iterdir()) == sorted(["model.pt", "model.json", BEST_CHECKPOINT, "checkpoint_epoch=1.pt"])
    record = json.loads(split.read_text())
    assert split == ckpt / "split.json"
    assert {len(record[s]) for s in ("train", "val", "test")} == {1}


def test_export_trained_model_writes_clean_weights_and_a_card(tmp_path):
    space = HyperSpace("elastic_fixed", alpha_range=(0.0, 2.0), sampling="log_uniform")
    kwargs = dict(spatial_dims=3, in_channels=2, hyper_dims=1, default_hyper=torch.tensor([0.5]), **SMALL_NET)
    torch.manual_seed(0)
    best = HyperUNet(**kwargs)
    # as the validator's CheckpointSaver(key_metric_save_state=True) stores a single model
    torch.save({**best.state_dict(), "checkpointer": {"saved": [(0.9, BEST_CHECKPOINT)]}}, tmp_path / BEST_CHECKPOINT)
    engine = Engine(lambda e, b: None)
    engine.network = HyperUNet(**kwargs)  # the final weights differ from the best ones
    engine.state.epoch = 7
    ExportTrainedModel(tmp_path, space, "HyperUNet", kwargs, spatial_size=(16, 16, 16), training={"lr": 1e-4})(engine)

    restored = HyperUNet(**kwargs)
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict: no extra keys
    for key, value in best.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    card = _card(tmp_path / "model.json")
    assert card["epochs"] == 7 and card["weights"] == "best"
    expected = {**kwargs, "encoder_features": [4], "decoder_features": [4, 4], "default_hyper": [0.5]}
    assert card["network"]["name"] == "HyperUNet"
    assert {key: card["network"]["kwargs"][key] for key in expected} == expected
    HyperUNet(**card["network"]["kwargs"]).load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert card["spatial_size"] == [16, 16, 16] and card["training"] == {"lr": 1e-4}
    again = ModelCard.load(tmp_path / "model.json").hyper_space
    assert again.to_dict() == space.to_dict() and again.sampling == "log_uniform"


def test_export_without_validation_keeps_the_final_weights(tmp_path):
    engine = Engine(lambda e, b: None)
    torch.manual_seed(0)
    engine.network = HyperUNet(spatial_dims=3, hyper_dims=2, **SMALL_NET)
    engine.state.epoch = 1
    ExportTrainedModel(tmp_path, HyperSpace(), "HyperUNet", {}, spatial_size=None)(engine)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in engine.network.state_dict().items())
    assert _card(tmp_path / "model.json")["weights"] == "final"


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 simulated pairs at 32^3: 1 train, 1 val, 1 test."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("lung") / "LungCT", num_pairs=3, spatial_size=(32, 32, 32))


def _bundle(*args: str, run_id: str | None = "training", cwd: Path | None = None, torchrun: bool = False):
    """Run ``python -m monai.bundle run [run_id] ...`` (or under ``torchrun`` with 2 processes) from ``cwd``, with
    only the bundle root on the Python path."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle"]
        if torchrun
        else [sys.executable, "-m", "monai.bundle"]
    )
    command = [*launcher, "run", *([run_id] if run_id else []), *args, "--bundle_root", str(BUNDLE_ROOT)]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    return result.returncode, result.stdout + result.stderr


def _refused(run_in_process, *args: str) -> tuple[int, str]:
    """A training run that is to fail, as :func:`_bundle` runs it but in this process (conftest's
    ``bundle_run_in_process``): its exit status and what it printed."""
    result = run_in_process(["training", *args, "--bundle_root", str(BUNDLE_ROOT)])
    return result.returncode, result.stdout + result.stderr


def _train_args(dataset: Path, root: Path, epochs: int = 1, *extra: str) -> list[str]:
    return [
        "--config_file", TRAIN,
        "--meta_file", str(BUNDLE_ROOT / "configs" / "metadata.json"),
        "--dataset_dir", str(dataset),
        "--ckpt_dir", str(root / "models"),
        "--output_dir", str(root / "eval"),
        "--epochs", str(epochs),
        "--val_interval", "1",
        *TINY_OVERRIDES,
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_training_writes_checkpoints_refuses_to_overwrite_and_resumes(dataset, tmp_path, bundle_run_in_process):
    models = tmp_path / "models"
    rc, log = _bundle(*_train_args(dataset, tmp_path, 1), cwd=tmp_path)
    assert rc == 0, log[-3000:]
    assert sorted(p.name for p in models.iterdir()) == [
        "checkpoint_epoch=1.pt", "model.json", "model.pt", BEST_CHECKPOINT, "split.json",
    ]  # fmt: skip
    card = _card(models / "model.json")
    assert card["regularizer"] == "elastic" and card["names"] == ["lam", "mu"] and card["epochs"] == 1
    assert card["weights"] == "best" and card["key_metric"] == "val_mean_dice" and 0 < card["best_metric"] <= 1
    network = HyperUNet(**card["network"]["kwargs"])
    network.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    assert json.loads((models / "split.json").read_text())["val"] == ["0002_0002"]
    assert card["split_file"] == str(models / "split.json")  # the card points at the split kept with the model
    assert list((tmp_path / "eval").glob("events.out.tfevents.*")), "TensorBoard logs expected"
    first = torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)

    rc, log = _refused(bundle_run_in_process, *_train_args(dataset, tmp_path, 2))
    assert rc != 0 and "--resume true" in log and "--overwrite true" in log

    rc, log = _bundle(*_train_args(dataset, tmp_path, 2, "--resume", "true"), cwd=tmp_path)
    assert rc == 0, log[-3000:]
    assert "Restored all variables" in log and "Epoch: 1/2" not in log and "Epoch: 2/2" in log
    assert latest_checkpoint(models).name == "checkpoint_epoch=2.pt"
    assert not (models / "checkpoint_epoch=1.pt").exists()
    second = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
    assert second["trainer"]["iteration"] == 2  # one training pair, two epochs in total
    changed = [not torch.equal(first["model"][k], v) for k, v in second["model"].items() if k != "default_hyper"]
    assert any(changed), "the resumed run must keep training"
    assert _card(models / "model.json")["epochs"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("regularizer", ["diffusion", "elastic_fixed"])
def test_baselines_train_through_plain_run(dataset, tmp_path, regularizer):
    rc, log = _bundle(*_train_args(dataset, tmp_path, 1, "--regularizer", regularizer, "--alpha", "0.2"), run_id=None)
    assert rc == 0, log[-3000:]
    card = _card(tmp_path / "models" / "model.json")
    assert card["regularizer"] == regularizer and card["names"] == ["alpha"]
    assert card["network"]["kwargs"]["hyper_dims"] == 1
    assert card["training"]["validation_hyper"] == [[pytest.approx(0.2)]]
    if regularizer == "elastic_fixed":  # Lai-Fook's Lame parameters scaled by 0.1
        assert card["training"]["fixed_lam"] == pytest.approx(LAI_FOOK.lam * 0.1)
        assert card["training"]["fixed_mu"] == pytest.approx(LAI_FOOK.mu * 0.1)
    else:
        assert card["training"]["fixed_lam"] is None


@pytest.mark.slow
def test_two_process_gloo_training(dataset, tmp_path):
    config = f"['{TRAIN}','{MULTI_GPU}']"
    args = _train_args(dataset, tmp_path, 2)
    args[args.index(TRAIN)] = config
    rc, log = _bundle(*args, cwd=tmp_path, torchrun=True)
    assert rc == 0, log[-3000:]
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == [
        "checkpoint_epoch=2.pt", "model.json", "model.pt", BEST_CHECKPOINT, "split.json",
    ]  # fmt: skip
    weights = torch.load(models / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in weights)  # saved from the unwrapped network
    assert log.count("Epoch[2] Metrics -- val_") == 1, "only the main process logs"


@pytest.mark.slow
def test_missing_dataset_dir_fails_clearly_and_writes_nothing(tmp_path, bundle_run_in_process):
    rc, log = _refused(bundle_run_in_process, *_train_args(tmp_path / "no_such_dataset", tmp_path / "out"))
    assert rc != 0
    assert "dataset_dir" in log and "no_such_dataset" in log and "is not a folder" in log
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_out_of_range_validation_hyper_fails_before_writing(dataset, tmp_path, bundle_run_in_process):
    rc, log = _refused(bundle_run_in_process, *_train_args(dataset, tmp_path / "out", 1, "--lam", "3.0"))
    assert rc != 0 and "outside the trained range" in log
    assert not (tmp_path / "out").exists()


def _card(path: Path) -> dict:
    """A written model card as its JSON dict (read through the bundle's ModelCard)."""
    return ModelCard.load(path).to_dict()
