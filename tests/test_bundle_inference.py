"""Inference, evaluation and export of the bundle: RegisterStep, ignite metrics, writers, configs.

Fast unit tests run in-process; the end-to-end tests (marked slow) go through ``python -m monai.bundle`` on a
tiny simulated dataset and a randomly initialised model saved like training saves one (model.pt + model.json), or
a small model briefly trained in-process with the bundle's training step.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
from elastic_hypermorph_bundle.data.transforms import registration_transforms
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.losses.elastic import elastic_energy
from elastic_hypermorph_bundle.networks import HyperUNet
from elastic_hypermorph_bundle.workflow.datalists import pair_datalist
from elastic_hypermorph_bundle.workflow.ignite_metrics import PairMean
from elastic_hypermorph_bundle.metrics import metric_columns
from elastic_hypermorph_bundle.model_card import ModelCard, trained_hyper_space
from elastic_hypermorph_bundle.workflow import parse_flag
from elastic_hypermorph_bundle.workflow.inference import inference_datalist, single_pair
from elastic_hypermorph_bundle.workflow.steps import RegisterStep
from elastic_hypermorph_bundle.workflow.export import ExportTrainedModel
from elastic_hypermorph_bundle.workflow.train_step import TrainStep
from elastic_hypermorph_bundle.workflow.writers import OutputFiles

ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 32, 32)
NETWORK_KWARGS = {"spatial_dims": 3, "in_channels": 2, "hyper_dims": 2, "hyper_rank": 4, "diffeomorphic": False,
                  "hyper_scale": [1.0, 1.0]}
SCHEMA = ROOT.parent / "shared" / "reference" / "meta_schema_20240725.json"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three simulated pairs (train/val/test one each) at 32^3."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "LungCT", num_pairs=3, spatial_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory, save_model) -> Path:
    """A random HyperUNet whose flow head is scaled up, so that its fields are voxel-sized and depend on hyper
    (the near-zero head of an untrained network would make every field nearly zero and equal)."""
    torch.manual_seed(0)
    network = HyperUNet(**NETWORK_KWARGS)
    with torch.no_grad():
        network.flow.weight.normal_(0.0, 0.05)
    return save_model(tmp_path_factory.mktemp("models"), network, HyperSpace(), NETWORK_KWARGS, spatial_size=SIZE)


def _bundle(*args: str, configs: tuple[str, ...] = ("inference.json",), processes: int = 0) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` from outside the bundle root with absolute config paths, as a user would;
    ``processes > 0``: under ``torchrun --nproc_per_node processes``, each process (and a run with
    ``processes=1``, as a reference) of one thread."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "monai.bundle"]
    if processes:
        env["OMP_NUM_THREADS"] = "1"
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                    "-m", "monai.bundle"]
    cmd = [*launcher, "run", *_run_args(args, configs)]
    return subprocess.run(cmd, cwd=ROOT.parent, env=env, capture_output=True, text=True, timeout=600)


def _run_args(args, configs: tuple[str, ...] = ("inference.json",)) -> list[str]:
    """The arguments after ``monai.bundle run``: absolute config paths, the bundle root, then ``args``."""
    config = str([str(ROOT / "configs" / name) for name in configs])
    return ["--config_file", config, "--bundle_root", str(ROOT), "--meta_file", str(ROOT / "configs" / "metadata.json"),
            *args]


def _common(dataset: Path, model: Path, output_dir: Path, network_alone: bool = True) -> list[str]:
    """Arguments of a run on the tiny dataset; ``network_alone`` turns the test-time stages off, so that the written
    field is the network's own (compared with an eager forward pass below)."""
    stages = ["--instance_steps", "0", "--prealign", "none"] if network_alone else []
    return ["--dataset_dir", str(dataset), "--ckpt_path", str(model), "--output_dir", str(output_dir),
            "--spatial_size", "[32, 32, 32]", "--num_workers", "0", *stages]


def _identity_pair(spatial=(8, 8, 8)) -> dict:
    mask = torch.zeros(1, *spatial)
    mask[:, 2:6, 2:6, 2:6] = 1
    points = torch.tensor([[2.0, 3.0, 4.0], [5.0, 4.0, 3.0]])
    return {"pred": torch.zeros(3, *spatial), "fixed_mask": mask, "moving_mask": mask.clone(), "warped_mask": mask.clone(),
            "fixed_keypoints": points, "moving_keypoints": points + torch.tensor([1.0, 0.0, 0.0]),
            "spacing": torch.tensor([2.0, 1.0, 1.0]), "pair_id": "0001_0001"}


# ---------------------------------------------------------------- unit tests


def test_metrics_of_known_fields():
    pair = _identity_pair()
    shifted = dict(pair, pair_id="0002_0002", pred=torch.zeros(3, 8, 8, 8).index_fill_(0, torch.tensor([0]), 1.0))
    dice, tre, folding, sdlogj = (PairMean(m) for m in ("dice_mean", "tre_mm", "folding_percent", "sd_log_jacobian"))
    for metric in (dice, tre, folding, sdlogj):
        metric.reset()
        metric.update([pair, shifted])
    assert dice.compute() == pytest.approx(1.0)
    # zero field: TRE = 1 voxel * 2 mm; shift of 1 voxel along x matches the moving points: TRE = 0
    assert tre.compute() == pytest.approx((2.0 + 0.0) / 2)
    assert folding.compute() == 0.0 and sdlogj.compute() == pytest.approx(0.0, abs=1e-6)


def test_lncc_scores_the_registered_moving_image_warped_as_the_step_warped_it():
    """The registration step hands no warped image over: the metrics warp the pair's moving image (the network's
    window) themselves, and its LNCC is the value of the step's former warp, bit for bit."""
    from elastic_hypermorph_bundle.metrics import pair_metrics
    from elastic_hypermorph_bundle.networks import warp_image
    from elastic_hypermorph_bundle.workflow.ignite_metrics import registered_pair_metrics

    generator = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(2, 1, 10, 9, 8, generator=generator)
    pred = 2 * torch.randn(3, 10, 9, 8, generator=generator)
    pair = {"pred": pred, "fixed_image": fixed, "moving_image": moving, "pair_id": "0001_0001"}
    before = pair_metrics(pred, fixed_image=fixed, warped_image=warp_image(moving[None], pred[None])[0])["lncc"]
    assert registered_pair_metrics(pair)["lncc"] == before and 0 < before < 1


def test_a_pair_repeated_by_a_padding_sampler_counts_once():
    """DistributedSampler(even_divisible=True) hands a pair to two ranks to fill them: the validation score that
    picks the best checkpoint must stay the mean over the distinct pairs."""
    pair = _identity_pair()  # TRE 2 mm
    other = dict(pair, pair_id="0002_0002", pred=torch.zeros(3, 8, 8, 8).index_fill_(0, torch.tensor([0]), 1.0))
    tre = PairMean("tre_mm")
    tre.reset()
    tre.update([pair, other])
    tre.update([dict(pair)])  # the padded repeat of the first pair
    assert tre.compute() == pytest.approx((2.0 + 0.0) / 2)


def test_metric_without_data_is_nan():
    metric = PairMean("dice_mean")
    metric.reset()
    metric.update([{"pred": torch.zeros(3, 8, 8, 8)}])
    assert np.isnan(metric.compute())


def test_register_step_generates_weights_once_per_run(dataset):
    pairs = [dict(single_pair(*(str(dataset / "imagesTr" / f"LungCT_000{i}_000{p}.nii.gz") for p in (0, 1)),
                              *(str(dataset / "masksTr" / f"LungCT_000{i}_000{p}.nii.gz") for p in (0, 1)))[0])
             for i in (1, 2)]
    transform = registration_transforms(spatial_size=SIZE, with_keypoints=False)
    loader = torch.utils.data.DataLoader([transform(p) for p in pairs], batch_size=1,
                                         collate_fn=list_data_collate)
    network = HyperUNet(**NETWORK_KWARGS)
    calls = []
    generate = network.generate_weights
    network.generate_weights = lambda hyper: calls.append(hyper.clone()) or generate(hyper)
    evaluator = SupervisedEvaluator("cpu", loader, network, iteration_update=RegisterStep(torch.tensor([0.3, 0.2])),
                                    key_val_metric={"dice": PairMean("dice_mean")})
    evaluator.run()
    evaluator.run()
    assert len(calls) == 2 and torch.equal(calls[0], torch.tensor([[0.3, 0.2]]))  # once per run, not per batch
    output = evaluator.state.output[0]
    assert output["pred"].shape == (3, *SIZE) and set(output["warped_mask"].unique().tolist()) <= {0.0, 1.0}
    assert output["pair_id"] == "0002_0002" and 0.0 <= evaluator.state.metrics["dice"] <= 1.0


def test_output_files_refuse_existing_and_discard_only_their_own(tmp_path):
    (tmp_path / "old.txt").write_text("earlier run")
    files = OutputFiles(tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite true"):
        files.new("old.txt")

    def failing_run():
        files.new("pair/a.nii.gz").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        files.run(failing_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    replacing = OutputFiles(tmp_path, overwrite="true")
    replacing.run(lambda: replacing.new("old.txt").write_text("new run"))
    assert (tmp_path / "old.txt").read_text() == "new run"


def test_parse_flag():
    assert parse_flag("x", "True") and not parse_flag("x", "false") and parse_flag("x", True)
    with pytest.raises(ValueError, match="--overwrite must be true or false"):
        parse_flag("overwrite", "yes")


def test_single_pair_grids(tmp_path):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), affine), tmp_path / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.diag([2.0, 1.5, 1.5, 1.0])), tmp_path / "moving.nii.gz")
    far = affine.copy()
    far[2, 3] = 100.0
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), far), tmp_path / "far.nii.gz")
    single_pair(str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"))  # another grid: resampled later
    with pytest.raises(ValueError, match="do not overlap"):
        single_pair(str(tmp_path / "fixed.nii.gz"), str(tmp_path / "far.nii.gz"))
    with pytest.raises(ValueError, match="--moving is missing"):
        single_pair(str(tmp_path / "fixed.nii.gz"), None)
    with pytest.raises(FileNotFoundError):
        single_pair(str(tmp_path / "fixed.nii.gz"), str(tmp_path / "absent.nii.gz"))
    assert single_pair(str(tmp_path / "fixed.nii.gz"), str(tmp_path / "fixed.nii.gz"))[0]["pair_id"] == "fixed_fixed"


def test_a_single_pair_takes_its_own_points(dataset):
    images, points = dataset / "imagesTr", dataset / "keypointsTr"
    pair = {"fixed": str(images / "LungCT_0001_0000.nii.gz"), "moving": str(images / "LungCT_0001_0001.nii.gz")}
    (entry,) = inference_datalist(**pair, fixed_points=str(points / "LungCT_0001_0000.csv"),
                                  moving_points=str(points / "LungCT_0001_0001.csv"))
    assert entry["fixed_keypoints"].endswith("LungCT_0001_0000.csv") and entry["moving_keypoints"].endswith("0001.csv")
    with pytest.raises(ValueError, match="--moving_points is missing"):
        inference_datalist(**pair, fixed_points=str(points / "LungCT_0001_0000.csv"))
    with pytest.raises(ValueError, match="--fixed_points/--moving_points need --fixed and --moving"):
        inference_datalist(dataset, fixed_points="a.csv", moving_points="b.csv")


def test_model_card_checks(model):
    assert trained_hyper_space(str(model), HyperSpace()).ranges == ((0.0, 1.0), (0.0, 1.0))
    with pytest.raises(ValueError, match="--regularizer elastic"):
        trained_hyper_space(str(model), HyperSpace("diffusion"))
    card = ModelCard.load(model)
    with pytest.raises(ValueError, match="diffeomorphic=True"):
        card.check_network("HyperUNet", {**NETWORK_KWARGS, "diffeomorphic": True})
    card.check_network("HyperUNet", {**NETWORK_KWARGS, "default_hyper": [0.1, 0.1]})


# ---------------------------------------------------------------- end to end through monai.bundle


def _eager_ddf(model: Path, dataset: Path, pair_id: str, hyper) -> torch.Tensor:
    network = HyperUNet(**NETWORK_KWARGS)
    network.load_state_dict(torch.load(model, weights_only=True))
    case = int(pair_id.split("_")[0])
    pair = {f"{r}_image": str(dataset / "imagesTr" / f"LungCT_{case:04d}_000{p}.nii.gz") for r, p in (("fixed", 0), ("moving", 1))}
    data = registration_transforms(spatial_size=SIZE, with_masks=False, with_keypoints=False)(pair)
    with torch.no_grad():
        return network(torch.cat([data["moving_image"], data["fixed_image"]])[None].as_tensor(), torch.tensor([hyper]))[0]


def _ddf(path: Path) -> torch.Tensor:
    """A written ``ddf.nii.gz`` (channel-last) as a ``(D, *spatial)`` DDF."""
    return torch.as_tensor(nib.load(path).get_fdata(dtype=np.float32)).movedim(-1, 0)


@pytest.mark.slow
def test_inference_writes_the_field_of_the_requested_hyperparameters(dataset, model, tmp_path):
    fields = {}
    for lam, mu in ((0.05, 0.02), (0.9, 0.8)):
        out = tmp_path / f"lam{lam}"
        result = _bundle(*_common(dataset, model, out), "--lam", str(lam), "--mu", str(mu), "--write_ddf", "true",
                         "--write_submission", "true")
        assert result.returncode == 0, result.stderr[-3000:]
        (pair_id,) = [p.name for p in out.iterdir() if p.name not in ("submission", OutputFiles.MANIFEST)]
        ddf = _ddf(out / pair_id / "ddf.nii.gz")
        torch.testing.assert_close(ddf, _eager_ddf(model, dataset, pair_id, [lam, mu]), atol=1e-4, rtol=1e-4)
        submission = nib.load(out / "submission" / f"disp_{pair_id}.nii.gz")
        fixed = nib.load(dataset / "imagesTr" / f"LungCT_{pair_id[:4]}_0000.nii.gz")
        assert submission.shape == (*fixed.shape, 3) and np.allclose(submission.affine, fixed.affine)
        assert (out / pair_id / "preview.png").stat().st_size > 0 and (out / pair_id / "warped_mask.nii.gz").is_file()
        fields[lam] = ddf
    assert (fields[0.05] - fields[0.9]).abs().max() > 1e-3  # the hyperparameters reach the network
    # (a second run into the same folder is refused: test_evaluation_writes_plausible_metrics)


SMALL_NET = {"encoder_features": [8, 8, 8], "decoder_features": [8, 8, 8, 8]}


def _briefly_trained_model(dataset: Path, ckpt_dir: Path, space: HyperSpace, steps: int = 100) -> Path:
    """A small HyperUNet trained as ``configs/train.json`` trains (``TrainStep``: one ``space.sample`` row per
    sample, elastic ``RegistrationLoss``, Adam at lr 1e-3) for ``steps`` full batches of the train and val pairs,
    exported with ``ExportTrainedModel`` (model.pt + model.json)."""
    keys = ("fixed_image", "moving_image")
    transform = registration_transforms(spatial_size=SIZE, with_masks=False, with_keypoints=False)
    pairs = [transform(pair) for split in ("train", "val") for pair in pair_datalist(dataset, split, keys=keys)]
    loader = torch.utils.data.DataLoader(pairs, batch_size=len(pairs), collate_fn=list_data_collate)
    kwargs = {**NETWORK_KWARGS, "hyper_scale": space.high.tolist(), **SMALL_NET}
    torch.manual_seed(0)
    network = HyperUNet(**kwargs)
    trainer = SupervisedTrainer(
        "cpu", steps, loader, network, torch.optim.Adam(network.parameters(), lr=1e-3), RegistrationLoss("elastic"),
        iteration_update=TrainStep(space, seed=0),
        train_handlers=[ExportTrainedModel(ckpt_dir, space, "HyperUNet", kwargs, spatial_size=SIZE)],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches this small gain little from more, and on a busy machine threads stall each other
    try:
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    return ckpt_dir / "model.pt"


@pytest.mark.slow
def test_stiffer_hyperparameters_give_a_smoother_field_of_a_trained_model(dataset, tmp_path):
    """The issue's end-to-end promise: after (brief) training over lam, mu in [0, 10], inference at the stiff end
    writes a different and smoother field (lower elastic energy) for the held-out test pair than at the soft end."""
    model = _briefly_trained_model(dataset, tmp_path / "model", HyperSpace(lam_range=[0, 10], mu_range=[0, 10]))
    small_net = [arg for key, value in SMALL_NET.items() for arg in (f"--network_kwargs#{key}", json.dumps(value))]
    fields = {}
    for name, value in (("soft", "0"), ("stiff", "10")):
        out = tmp_path / name
        result = _bundle(*_common(dataset, model, out), *small_net, "--lam", value, "--mu", value, "--write_ddf", "true")
        assert result.returncode == 0, result.stderr[-3000:]
        (pair_id,) = [p.name for p in out.iterdir() if p.name not in ("submission", OutputFiles.MANIFEST)]
        fields[name] = _ddf(out / pair_id / "ddf.nii.gz")
    soft, stiff = fields["soft"], fields["stiff"]
    assert soft.abs().max() > 0.5  # trained: a voxel-sized field (an untrained flow head gives ~0)
    assert (soft - stiff).abs().max() > 0.1
    energy = {name: elastic_energy(field[None], 1.0, 1.0).item() for name, field in fields.items()}
    assert energy["stiff"] < 0.7 * energy["soft"], energy


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--lam", "1.5"], "outside the trained range"),
        (["--fixed", "FIXED", "--moving", "MISMATCH"], "do not overlap"),
        (["--regularizer", "diffusion"], "--regularizer elastic"),
        (["--hu_window", "[-900, 400]"], "--hu_window [-900.0, 400.0] (trained: [-1000.0, 500.0])"),
        (["--diffeomorphic", "maybe"], "--diffeomorphic must be true or false"),
    ],
)
def test_inference_failures_are_clear_and_leave_nothing(dataset, model, tmp_path, args, message,
                                                       bundle_run_in_process):
    mismatch = tmp_path / "moving.nii.gz"
    fixed = dataset / "imagesTr" / "LungCT_0001_0000.nii.gz"
    image = nib.load(fixed)
    far = image.affine.copy()
    far[:3, 3] += 1000.0  # mm: nowhere near the fixed image
    nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32), far), mismatch)
    args = [{"FIXED": str(fixed), "MISMATCH": str(mismatch)}.get(a, a) for a in args]
    result = bundle_run_in_process(_run_args([*_common(dataset, model, tmp_path / "out"), *args]))
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def network_evaluation(dataset, model, tmp_path_factory) -> Path:
    """The output folder of one evaluation of the network alone (the test-time stages off), run once and read by
    the tests of its metrics and of the instance optimisation's gain over it."""
    out = tmp_path_factory.mktemp("evaluation") / "eval"
    result = _bundle(*_common(dataset, model, out), configs=("inference.json", "evaluate.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_evaluation_writes_plausible_metrics(dataset, model, network_evaluation, tmp_path, bundle_run_in_process):
    out = network_evaluation
    record = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert record["num_pairs"] == 1 and [r["pair_id"] for r in rows] == [record["pairs"][0]["pair_id"], "mean"]
    mean = record["mean"]
    assert 0.0 < mean["dice_mean"] <= 1.0 and 0.0 < mean["dice_before"] <= 1.0
    assert mean["tre_mm"] > 0 and mean["tre_before_mm"] > 0
    assert 0.0 <= mean["folding_percent"] <= 100.0 and mean["sd_log_jacobian"] > 0 and mean["runtime_s"] > 0
    assert mean["elastic_energy"] == pytest.approx(0.083 * mean["energy_volume"] + 0.03 * mean["energy_shear"])
    assert list(rows[0]) == ["pair_id", *metric_columns([1], with_points=True, before=True), "runtime_s"]
    assert record["info"]["hyper"] == pytest.approx([0.083, 0.03])
    # a second run into the same folder (at other hyperparameters) refuses and leaves the earlier outputs untouched
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    again = bundle_run_in_process(_run_args([*_common(dataset, model, out), "--lam", "0.9", "--mu", "0.8"],
                                            configs=("inference.json", "evaluate.json")))
    assert again.returncode != 0 and "--overwrite true" in again.stderr
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    other = bundle_run_in_process(_run_args([*_common(dataset, model, tmp_path / "eval64"), "--spatial_size",
                                             "[64, 64, 64]"], configs=("inference.json", "evaluate.json")))
    assert other.returncode != 0 and "(trained: [32, 32, 32])" in other.stderr


@pytest.mark.slow
def test_evaluation_with_instance_optimisation_beats_the_network_alone(dataset, model, network_evaluation, tmp_path):
    """The default inference/evaluation runs pre-alignment + instance optimisation after the network; on a random
    network's field it must end far better than the network alone (and than no registration)."""
    out = tmp_path / "optimised"
    # the steps as a list, one per level (30 on each of the 3: the command line's list syntax, end to end)
    result = _bundle(*_common(dataset, model, out, network_alone=False), "--instance_steps", "[30,30,30]",
                     configs=("inference.json", "evaluate.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    means = {name: json.loads((folder / "metrics.json").read_text())["mean"]
             for name, folder in (("alone", network_evaluation), ("optimised", out))}
    assert means["optimised"]["tre_mm"] < 0.7 * means["alone"]["tre_mm"]
    assert means["optimised"]["tre_mm"] < 0.7 * means["optimised"]["tre_before_mm"]
    assert means["optimised"]["dice_mean"] > means["alone"]["dice_mean"]
    assert means["optimised"]["runtime_s"] > means["alone"]["runtime_s"]
    # the stages' decisions are in the run's record: pre-alignment similarities, the start taken and its objective
    row = json.loads((tmp_path / "optimised" / "metrics.json").read_text())["pairs"][0]
    assert row["prealign_applied"] in (0.0, 1.0) and row["prealign_similarity_identity"] > 0
    assert row["start_network"] in (0.0, 1.0) and "start_objective_network" in row


@pytest.mark.slow
def test_two_processes_register_each_pair_once_and_match_one_process(dataset, model, tmp_path):
    """``multi_gpu_evaluate.json`` under ``torchrun`` (2 Gloo processes of one thread): the 3 pairs split 2 + 1, each
    registered once, every output file and metric identical to one process of one thread, written as one set."""
    args = [*_common(dataset, model, tmp_path / "x", network_alone=False), "--split", "all", "--instance_steps", "3",
            "--write_outputs", "true"]
    runs = {}
    for name, processes, extra in (("one", 1, ()), ("two", 2, ("multi_gpu_evaluate.json",))):
        out = tmp_path / name
        args[args.index("--output_dir") + 1] = str(out)
        result = _bundle(*args, configs=("inference.json", "evaluate.json", *extra), processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        # one optimisation per pair over all processes (the metric rows alone would hide a pair done twice)
        assert len(re.findall(r"instance optimisation level 1/\d+ \(\S+\) step 1/", result.stdout + result.stderr)) == 3
        runs[name] = out
    one, two = runs["one"], runs["two"]
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    assert len([f for f in files if f.endswith("/transform.nii.gz")]) == 3
    assert not list(tmp_path.glob(".*staging*"))
    for name in files:
        if name.endswith(".nii.gz"):
            assert np.array_equal(nib.load(one / name).get_fdata(), nib.load(two / name).get_fdata()), name
    records = [json.loads((out / "metrics.json").read_text()) for out in (one, two)]
    for record in records:
        for row in (record["mean"], *record["pairs"]):
            row.pop("runtime_s")
    assert records[0] == records[1] and records[0]["num_pairs"] == 3


@pytest.mark.slow
def test_registration_without_a_model_by_instance_optimisation_alone(dataset, tmp_path, bundle_run_in_process):
    out = tmp_path / "no_model"
    args = ["--dataset_dir", str(dataset), "--ckpt_path", str(tmp_path / "none" / "model.pt"), "--output_dir",
            str(out), "--num_workers", "0", "--init", "identity", "--instance_steps", "30"]
    result = _bundle(*args, configs=("inference.json", "evaluate.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    mean = json.loads((out / "metrics.json").read_text())["mean"]
    assert mean["tre_mm"] < 0.6 * mean["tre_before_mm"]
    refused = bundle_run_in_process(_run_args([*args[:-1], "0", "--output_dir", str(tmp_path / "refused")],
                                              configs=("inference.json", "evaluate.json")))
    assert refused.returncode != 0 and "needs --instance_steps > 0" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(not SCHEMA.is_file(), reason="offline copy of the metadata schema not available")
def test_verify_metadata():
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(ROOT / "configs" / "metadata.json"),
         "--filepath", str(SCHEMA)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "verified with no error" in result.stdout + result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_verify_net_in_out_and_export_reproduces_eager(model, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    config, meta = str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "metadata.json")
    verify_net_in_out("network_def", meta_file=meta, config_file=config, ckpt_path=str(model), device="cpu")
    ts_path = tmp_path / "model.ts"
    ckpt_export("network_def", filepath=str(ts_path), ckpt_file=str(model), meta_file=meta, config_file=config,
                ckpt_path=str(model), use_trace=True, input_shape=[1, 2, 32, 32, 32], bundle_root=str(ROOT))
    exported = torch.jit.load(str(ts_path))
    network = HyperUNet(**NETWORK_KWARGS, default_hyper=[0.083, 0.03])
    network.load_state_dict(torch.load(model, weights_only=True))
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), network(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the bundle as zoo users run it

#: ``python -m monai.bundle`` with the package importable only from the bundle copy given as the first argument,
#: as for a downloaded bundle that is not installed (whatever this environment has installed: an editable install's
#: finder, site-packages); the import statement of a config that finds no package gets MONAI's lazy placeholder
_NOT_INSTALLED = """
import importlib.machinery, os, runpy, sys
copy = os.path.realpath(sys.argv.pop(1))
class OnlyTheBundleCopy:
    def find_spec(self, name, path=None, target=None):
        if name != "elastic_hypermorph_bundle":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
        if spec is None or not os.path.realpath(spec.origin).startswith(copy + os.sep):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return spec
sys.meta_path.insert(0, OnlyTheBundleCopy())
sys.argv[0] = "monai.bundle"
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory) -> Path:
    """The bundle as downloaded from the model zoo: package and configs, not installed."""
    import shutil

    copy = tmp_path_factory.mktemp("zoo") / "elastic_hypermorph_bundle"
    for folder in ("elastic_hypermorph_bundle", "configs"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _zoo_run(copy: Path, cwd: Path, config_file: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", _NOT_INSTALLED, str(copy), "run", "--config_file", config_file, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["bundle_root", "elsewhere"])
def test_a_downloaded_bundle_runs_with_only_its_root_on_the_path(bundle_copy, dataset, model, tmp_path, where):
    """MONAI evaluates a config's imports before ``run`` puts the bundle root on ``sys.path``: the configs must
    not need the package before that, so that the bundle runs from its root or from anywhere (absolute paths and
    ``--bundle_root``) without being installed."""
    out = tmp_path / "out"
    if where == "bundle_root":
        cwd, config, root = bundle_copy, "configs/inference.json", "."
    else:
        cwd, config, root = tmp_path, str(bundle_copy / "configs" / "inference.json"), str(bundle_copy)
    result = _zoo_run(bundle_copy, cwd, config, "--bundle_root", root, *_common(dataset, model, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(out.glob("*/transform.nii.gz"))) == 1 and not (out / "submission").exists()  # one field by default
