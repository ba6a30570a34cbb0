"""Nothing lost, nothing silently wrong: atomic checkpoints under a real SIGKILL, resume past a damaged checkpoint,
unknown overrides refused, one clean error line, safe checkpoint loading (issue 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from elastic_hypermorph_bundle.atomic import (
    AtomicDiskSaver,
    atomic_torch_save,
    atomic_write_text,
    readable_checkpoint,
    remove_partial_files,
)
from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "configs" / "train.json")
TINY = {
    "spatial_size": [32, 32, 32],
    "num_workers": 0,
    "network_kwargs#encoder_features": [4, 4, 4, 4],
    "network_kwargs#decoder_features": [4, 4, 4, 4, 4, 4, 4],
    "network_kwargs#hyper_hidden": 8,
    "network_kwargs#hyper_layers": 2,
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("lung") / "LungCT", num_pairs=3, spatial_size=(32, 32, 32))


# ------------------------------------------------------------------------------------------------ atomic writes


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = atomic_write_text(tmp_path / "model.json", "old")

    def failing(stream):
        stream.write(b"half of the new")
        raise OSError("disk full")

    from elastic_hypermorph_bundle.atomic import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


def test_disk_saver_removes_the_replaced_checkpoint_only_after_the_next_save(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"a": torch.ones(2)}, "checkpoint_epoch=1.pt")
    saver.remove("checkpoint_epoch=1.pt")  # ignite asks for the removal before the next save
    assert (tmp_path / "checkpoint_epoch=1.pt").is_file()
    saver({"a": torch.zeros(2)}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]
    fixed = AtomicDiskSaver(tmp_path, filename="model_best.pt")
    fixed({"a": torch.ones(1)}, "ignored.pt")
    fixed.remove("ignored.pt")
    fixed({"a": torch.full((1,), 3.0)}, "ignored.pt")
    assert torch.load(tmp_path / "model_best.pt", weights_only=True)["a"].item() == 3.0


def test_readable_checkpoint_skips_a_truncated_file_with_a_warning(tmp_path, caplog):
    good = atomic_torch_save({"w": torch.arange(1000.0)}, tmp_path / "checkpoint_epoch=1.pt")
    bad = tmp_path / "checkpoint_epoch=2.pt"
    bad.write_bytes(good.read_bytes()[:300])
    with caplog.at_level("WARNING", logger="elastic_hypermorph_bundle"):
        assert readable_checkpoint([bad, good]) == good
    assert "checkpoint_epoch=2.pt" in caplog.text and "cannot be read" in caplog.text
    (tmp_path / ".checkpoint_epoch=3.pt.partial-abc").write_bytes(b"x")
    assert [p.name for p in remove_partial_files(tmp_path)] == [".checkpoint_epoch=3.pt.partial-abc"]


# ------------------------------------------------------------------------------- a real SIGKILL during a save

_SLOW_SAVE_RUN = """
import sys, time, io, torch
from pathlib import Path
marker = Path(sys.argv[1])
original = torch.save

def slow_save(obj, f, *args, **kwargs):
    # the epoch-2 training checkpoint (one training pair: iteration 2): write half of it, tell the parent, and hang until killed
    if isinstance(obj, dict) and isinstance(obj.get("trainer"), dict) and obj["trainer"].get("iteration") == 2:
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        stream = open(f, "wb") if isinstance(f, (str, Path)) else f
        stream.write(data[: len(data) // 2])
        stream.flush()
        marker.write_text("saving")
        time.sleep(600)
    return original(obj, f, *args, **kwargs)

torch.save = slow_save
from monai.bundle import run
run("training", config_file=sys.argv[2], **eval(sys.argv[3]))
"""


def _overrides(dataset: Path, root: Path, epochs: int, **extra) -> dict:
    return {
        "bundle_root": str(ROOT), "dataset_dir": str(dataset), "ckpt_dir": str(root / "models"),
        "output_dir": str(root / "eval"), "epochs": epochs, "val_interval": 1, **TINY, **extra,
    }  # fmt: skip


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_keeps_the_previous_one_and_resume_goes_on(dataset, tmp_path):
    marker = tmp_path / "saving"
    script = tmp_path / "slow_save_run.py"
    script.write_text(textwrap.dedent(_SLOW_SAVE_RUN))
    args = [sys.executable, str(script), str(marker), TRAIN, repr(_overrides(dataset, tmp_path, 3))]
    process = subprocess.Popen(args, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), process.communicate(timeout=30)[0].decode()[-3000:]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    models = tmp_path / "models"
    # the epoch-1 checkpoint and the best model survive, complete; no truncated epoch-2 file exists
    assert not (models / "checkpoint_epoch=2.pt").exists()
    assert torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 1
    torch.load(models / "model_best.pt", weights_only=True)

    # a damaged newer checkpoint (e.g. copied half-way) is skipped by name on resume
    (models / "checkpoint_epoch=7.pt").write_bytes((models / "checkpoint_epoch=1.pt").read_bytes()[:500])
    code = "import sys; from monai.bundle import run; run('training', config_file=sys.argv[1], **eval(sys.argv[2]))"
    result = subprocess.run(
        [sys.executable, "-c", code, TRAIN, repr(_overrides(dataset, tmp_path, 2, resume=True))],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "skipping checkpoint" in log and "checkpoint_epoch=7.pt" in log
    assert sorted(p.name for p in models.iterdir()) == [
        "checkpoint_epoch=2.pt", "model.json", "model.pt", "model_best.pt", "split.json",
    ]  # fmt: skip
    assert torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["iteration"] == 2


# ------------------------------------------------------------------------------- strict override ids (item 4)



def _cli(*args: str) -> list[str]:
    """``sys.argv`` of ``python -m monai.bundle run ...``."""
    import monai

    return [str(Path(monai.__file__).parent / "bundle" / "__main__.py"), "run", *args]


def test_check_overrides_refuses_misspelled_ids_naming_the_closest(tmp_path):
    from elastic_hypermorph_bundle.cli import UnknownOverrideError, check_overrides

    evaluate = f"['{ROOT / 'configs' / 'inference.json'}','{ROOT / 'configs' / 'evaluate.json'}']"
    with pytest.raises(UnknownOverrideError, match=r"--lamda \(did you mean --lam\b") as info:
        check_overrides(_cli("--config_file", evaluate, "--lamda", "0.1", "--mu=0.2"))
    assert "--mu" not in str(info.value)
    inference = str(ROOT / "configs" / "inference.json")
    with pytest.raises(UnknownOverrideError, match=r"--write_previw \(did you mean --write_preview"):
        check_overrides(_cli("--config_file", inference, "--write-previw", "false"))
    # an id from --args_file is checked too; MONAI's own run arguments are not config ids
    args_file = tmp_path / "args.json"
    args_file.write_text('{"config_file": "%s", "ckpt_pth": "x.pt"}' % inference)
    with pytest.raises(UnknownOverrideError, match=r"--ckpt_pth \(did you mean --ckpt_path"):
        check_overrides(_cli("--args_file", str(args_file), "--meta_file", "configs/metadata.json"))


def test_check_overrides_accepts_defined_nested_and_run_ids():
    from elastic_hypermorph_bundle.cli import check_overrides, parse_run_arguments

    check_overrides(_cli(
        "training", "--meta_file", "configs/metadata.json", "--config_file", TRAIN, "--logging_file", "x.conf",
        "--lam", "0.2", "--train#dataloader#num_workers", "0", "--validate::dataset::cache_rate", "0",
        "--network_kwargs#encoder_features", "[4,4,4,4]", "--resume", "--tracking", "mlflow", "--tracking_uri", "file:x",
    ))  # fmt: skip
    assert parse_run_arguments(["training", "--lam", "-0.5", "--amp", "--x=[1, 2]"]) == {
        "run_id": "training", "lam": -0.5, "amp": True, "x": [1, 2],
    }  # fmt: skip
    # programmatic use (this process is pytest, not `monai.bundle run`) is not checked
    check_overrides()
    check_overrides(["python", "run", "--lamda", "1"])


# ------------------------------------------------------------------------------------- one clean error (item 9)


def test_clean_excepthook_prints_the_root_cause_once(capsys):
    from elastic_hypermorph_bundle import cli

    def fail(error, levels=2):
        try:
            try:
                raise error
            except Exception as inner:
                if levels == 1:
                    raise RuntimeError("Failed to evaluate ConfigExpression: $x") from inner
                raise RuntimeError("Failed to evaluate ConfigExpression: $y") from fail(error, levels - 1)
        except RuntimeError as outer:
            return outer

    outer = fail(FileExistsError("outputs exist: out/metrics.csv"))
    assert isinstance(cli.real_cause(outer), FileExistsError)
    try:  # an error raised from another (adding context) is the one shown
        try:
            raise ValueError("ddf contains non-finite values")
        except ValueError as inner:
            raise FloatingPointError("training diverged at iteration 2") from inner
    except FloatingPointError as translated:
        assert cli.real_cause(fail(translated)) is translated
    cli._clean_excepthook(type(outer), outer, outer.__traceback__)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "FileExistsError: outputs exist: out/metrics.csv" and len(lines) == 2
    unexpected = fail(IndexError("index 3 is out of bounds"))
    cli._clean_excepthook(type(unexpected), unexpected, unexpected.__traceback__)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "IndexError: index 3 is out of bounds"
    assert "Traceback" in err and "ConfigExpression" not in err  # the cause's own traceback, without the wrapper


@pytest.mark.slow
def test_command_line_error_ends_with_its_cause_once_and_unknown_ids_are_refused(tmp_path):
    base = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "configs" / "inference.json"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    missing = tmp_path / "no_such_dataset"
    result = subprocess.run([*base, "--dataset_dir", str(missing)], env=_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: dataset_dir") and str(missing) in last, result.stderr[-3000:]
    assert result.stderr.count("is not a folder") == 1 and "Failed to evaluate" not in result.stderr
    result = subprocess.run([*base, "--lamda", "0.1"], env=_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("UnknownOverrideError: unknown override id(s): --lamda")


# ------------------------------------------------------------- damaged and non-3D images named before any work (7, 8)


def _nifti(path: Path, array) -> str:
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return str(path)


def test_damaged_2d_4d_and_nan_images_are_named_before_any_work(tmp_path):
    import numpy as np

    from elastic_hypermorph_bundle.data.io import Learn2RegDataError, read_nifti_grid
    from elastic_hypermorph_bundle.data.learn2reg import validate_pairs
    from elastic_hypermorph_bundle.workflow.inference import single_pair

    volume = np.random.default_rng(0).normal(size=(16, 16, 16))
    fixed = _nifti(tmp_path / "fixed.nii.gz", volume)
    moving = _nifti(tmp_path / "moving.nii.gz", volume)
    validate_pairs([{"fixed_image": fixed, "moving_image": moving, "pair_id": "a"}])

    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(Path(moving).read_bytes()[: int(Path(moving).stat().st_size * 0.6)])
    assert read_nifti_grid(truncated)[0] == (16, 16, 16)  # the header alone looks fine
    with pytest.raises(Learn2RegDataError, match=r"truncated\.nii\.gz.*truncated or damaged"):
        single_pair(fixed, str(truncated))
    flat = _nifti(tmp_path / "slice.nii.gz", volume[:, :, 0])
    with pytest.raises(Learn2RegDataError, match=r"slice\.nii\.gz is a 2D image of shape \(16, 16\)"):
        validate_pairs([{"fixed_image": flat, "moving_image": flat, "pair_id": "b"}])
    series = _nifti(tmp_path / "series.nii.gz", np.stack([volume, volume], axis=-1))
    with pytest.raises(Learn2RegDataError, match=r"series\.nii\.gz is a 4D image \(2 volumes\)"):
        validate_pairs([{"fixed_image": fixed, "moving_image": series, "pair_id": "c"}])
    single = _nifti(tmp_path / "single.nii.gz", volume[..., None])  # (X, Y, Z, 1) is one 3D volume
    validate_pairs([{"fixed_image": fixed, "moving_image": single, "pair_id": "d"}])
    nan = volume.copy()
    nan[3, 4, 5] = np.nan
    with pytest.raises(Learn2RegDataError, match=r"nan\.nii\.gz contains 1 non-finite voxel"):
        validate_pairs([{"fixed_image": fixed, "moving_image": _nifti(tmp_path / "nan.nii.gz", nan), "pair_id": "e"}])


@pytest.mark.slow
def test_training_with_a_nan_voxel_fails_cleanly_with_the_default_cache_workers(tmp_path):
    import nibabel as nib
    import numpy as np

    from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "LungCT", num_pairs=3, spatial_size=(16, 16, 16))
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    image = nib.load(images[0])
    array = np.asarray(image.dataobj, dtype=np.float32)
    array[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(array, image.affine), str(images[0]))  # float32 on disk, as many CTs are
    overrides = {**_overrides(data, tmp_path, 1), "spatial_size": [16, 16, 16]}
    overrides.pop("num_workers")  # the default cache/data-loading workers
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    result = subprocess.run(args, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert str(images[0]) in last and "non-finite voxel" in last
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


# ------------------------------------------------------------------------------ divergence is named (item 10)


def test_a_diverging_training_says_so_with_the_iteration_and_what_to_try():
    from monai.engines import SupervisedTrainer

    from elastic_hypermorph_bundle.hyperparams import HyperSpace
    from elastic_hypermorph_bundle.losses import RegistrationLoss
    from elastic_hypermorph_bundle.networks import HyperUNet
    from elastic_hypermorph_bundle.workflow.train_step import TrainingDivergedError, TrainStep

    torch.manual_seed(0)
    space = HyperSpace("elastic")
    network = HyperUNet(spatial_dims=3, hyper_dims=2, encoder_features=[4, 4, 4], decoder_features=[4, 4, 4, 4])
    generator = torch.Generator().manual_seed(1)
    batches = [{key: torch.rand(1, 1, 16, 16, 16, generator=generator) for key in ("fixed_image", "moving_image")}
               for _ in range(4)]  # fmt: skip
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=10, train_data_loader=batches, network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e3), iteration_update=TrainStep(space),
        loss_function=RegistrationLoss(regularizer="elastic", spatial_dims=3, kernel_size=3),
    )  # fmt: skip
    with pytest.raises(TrainingDivergedError, match=r"training diverged at iteration \d+ \(epoch \d+\).*1000.*--learning_rate"):
        trainer.run()
    assert trainer.state.iteration < 40


# ------------------------------------------------------------------ the split stays with its model (item 3)


def test_trainings_sharing_an_output_dir_keep_their_own_splits(tmp_path):
    import json

    from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
    from elastic_hypermorph_bundle.workflow.checkpoints import prepare_outputs

    data = make_synthetic_dataset(tmp_path / "data", num_pairs=6, spatial_size=(16, 16, 16))
    shared = tmp_path / "eval"
    other = tmp_path / "other_split.json"  # a second training on another split (its val and test swapped)
    other.write_text(json.dumps({"train": ["0001_0001", "0002_0002", "0003_0003", "0004_0004"],
                                 "val": ["0006_0006"], "test": ["0005_0005"]}))  # fmt: skip
    first = prepare_outputs(tmp_path / "models_a", shared, data)
    recorded = first.read_text()
    second = prepare_outputs(tmp_path / "models_b", shared, data, split_file=other)
    assert first == tmp_path / "models_a" / "split.json" and second == tmp_path / "models_b" / "split.json"
    assert first.read_text() == recorded and not (shared / "split.json").exists()
    assert json.loads(first.read_text())["test"] == ["0006_0006"] and json.loads(second.read_text())["test"] == ["0005_0005"]
    # the split is part of the trained files: a new training into that folder is refused, a resume must use it
    with pytest.raises(FileExistsError, match="split.json"):
        prepare_outputs(tmp_path / "models_a", shared, data, split_file=other)
    (tmp_path / "models_a" / "checkpoint_epoch=1.pt").touch()
    with pytest.raises(ValueError, match=r"differs from .*models_a/split.json.*--split_file"):
        prepare_outputs(tmp_path / "models_a", shared, data, split_file=other, resume=True)
    assert prepare_outputs(tmp_path / "models_a", shared, data, resume=True) == first
    assert first.read_text() == recorded


# ----------------------------------------------------- outputs are staged and swapped in on success (item 2)


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_overwrite_keeps_the_earlier_results_and_a_successful_one_replaces_the_whole_set(tmp_path):
    from elastic_hypermorph_bundle.workflow.writers import OutputFiles

    out = tmp_path / "outputs" / "inference"

    def write(files: OutputFiles, names, fail_after=None):
        for index, name in enumerate(names):
            if index == fail_after:
                raise RuntimeError("killed half-way")
            files.new(name).write_text(f"{name} of this run")

    first = OutputFiles(out)
    first.run(lambda: write(first, ["submission/disp_1.nii.gz", "1/ddf.nii.gz", "1/warped_mask.nii.gz", "metrics.csv"]))
    earlier = _tree(out)
    assert set(earlier) == {"submission/disp_1.nii.gz", "1/ddf.nii.gz", "1/warped_mask.nii.gz", "metrics.csv",
                            OutputFiles.MANIFEST}  # fmt: skip

    # an overwrite that fails half-way (after replacing two of the files) leaves the earlier set exactly as it was
    failing = OutputFiles(out, overwrite=True)
    with pytest.raises(RuntimeError, match="killed half-way"):
        failing.run(lambda: write(failing, ["submission/disp_1.nii.gz", "1/ddf.nii.gz", "metrics.csv"], fail_after=2))
    assert _tree(out) == earlier and sorted(p.name for p in out.parent.iterdir()) == ["inference"]

    # a successful overwrite that writes fewer files (no masks) leaves none of the earlier run's files behind
    second = OutputFiles(out, overwrite="true")
    second.run(lambda: write(second, ["submission/disp_1.nii.gz", "1/ddf.nii.gz"]))
    assert set(_tree(out)) == {"submission/disp_1.nii.gz", "1/ddf.nii.gz", OutputFiles.MANIFEST}
    assert _tree(out)["1/ddf.nii.gz"] == "1/ddf.nii.gz of this run" and sorted(p.name for p in out.parent.iterdir()) == ["inference"]

    # a folder shared with other files (e.g. training logs): only the earlier run's set is replaced
    (out / "events.out.tfevents.1").write_text("training log")
    third = OutputFiles(out, overwrite=True)
    third.run(lambda: write(third, ["metrics.csv"]))
    assert set(_tree(out)) == {"metrics.csv", "events.out.tfevents.1", OutputFiles.MANIFEST}
    # without overwrite an existing output is refused and nothing changes
    before = _tree(out)
    refusing = OutputFiles(out)
    with pytest.raises(FileExistsError, match="--overwrite true"):
        refusing.run(lambda: write(refusing, ["new.csv", "metrics.csv"]))
    assert _tree(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["inference"]


# -------------------------------------------------------------- a pickle payload in model.pt is refused (item 12)


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: a checkpoint that runs code when loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_in_model_pt_is_refused_not_executed(tmp_path):
    import pickle

    from ignite.engine import Engine
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointLoader

    from elastic_hypermorph_bundle.model_card import load_trained_network
    from elastic_hypermorph_bundle.networks import HyperUNet

    marker = tmp_path / "payload_ran"
    model = tmp_path / "model.pt"
    torch.save({"model": {"weight": torch.zeros(1)}, "payload": _Payload(marker)}, model)
    network = HyperUNet(spatial_dims=3, hyper_dims=2, encoder_features=[4, 4, 4], decoder_features=[4, 4, 4, 4])
    # the package's own loading (sweep, benchmark)
    with pytest.raises(pickle.UnpicklingError):
        load_trained_network(model, network)
    # the configs' CheckpointLoader (inference, evaluation), as the configs build it
    for config_files, handlers in ((["inference.json"], "handlers"), (["inference.json", "evaluate.json"], "handlers")):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / name) for name in config_files])
        index = next(i for i, h in enumerate(parser[handlers]) if isinstance(h, dict) and h.get("_target_") == "CheckpointLoader")
        parser.update({"ckpt_path": str(model), "device": "$torch.device('cpu')"})
        loader = parser.get_parsed_content(f"{handlers}#{index}")
        assert isinstance(loader, CheckpointLoader)
        with pytest.raises(pickle.UnpicklingError):
            loader(Engine(lambda engine, batch: None))
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it (which is why the floors below matter)
    torch.load(model, weights_only=False)
    assert marker.exists()
    # torch >= 2.6 loads weights_only by default; MONAI >= 1.5.1's CheckpointLoader passes weights_only=True
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.6' in text and '"monai>=1.5.1' in text


def test_a_non_finite_field_in_validation_during_training_is_reported_as_divergence(tmp_path):
    from ignite.engine import Engine, Events

    from elastic_hypermorph_bundle.losses.elastic import NonFiniteFieldError, elastic_energy
    from elastic_hypermorph_bundle.workflow.checkpoints import LastCheckpoint
    from elastic_hypermorph_bundle.workflow.train_step import TrainingDivergedError

    trainer = Engine(lambda engine, batch: None)
    trainer.network = torch.nn.Linear(1, 1)
    trainer.optimizer = torch.optim.Adam(trainer.network.parameters(), lr=5.0)
    LastCheckpoint(tmp_path, save=False).attach(trainer)

    def validate(engine):  # as the validator's metrics meet the field of overflowing weights
        elastic_energy(torch.full((1, 3, 4, 4, 4), float("nan")), 1.0, 1.0)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    with pytest.raises(TrainingDivergedError, match=r"diverged at iteration 2 \(epoch 1\): validation .*rate is 5") as info:
        trainer.run([0, 1], max_epochs=3)
    assert isinstance(info.value.__cause__, NonFiniteFieldError)
    other = Engine(lambda engine, batch: (_ for _ in ()).throw(KeyError("unrelated")))
    other.network, other.optimizer = trainer.network, trainer.optimizer
    LastCheckpoint(tmp_path, save=False).attach(other)
    with pytest.raises(KeyError, match="unrelated"):  # other failures pass through unchanged
        other.run([0])


def test_clean_errors_keep_the_engine_logs_and_drop_only_their_tracebacks():
    import logging

    from monai.apps import get_logger

    from elastic_hypermorph_bundle import cli

    previous = logging.getLogRecordFactory()
    logging.setLogRecordFactory(cli._without_engine_tracebacks(previous))
    try:
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)

        stats = get_logger("monai.handlers.StatsHandler")  # as MONAI's StatsHandler makes its logger
        assert stats.handlers, "MONAI's own stdout handler must still be set up"
        keep = Keep()
        stats.addHandler(keep)
        stats.info("Epoch[1] Metrics -- val_mean_dice: 0.9")
        try:
            raise ValueError("bad input")
        except ValueError:
            stats.exception("Exception: bad input")
        stats.removeHandler(keep)
        assert [r.getMessage() for r in records] == ["Epoch[1] Metrics -- val_mean_dice: 0.9", "Exception: bad input"]
        assert records[1].exc_info is None
    finally:
        logging.setLogRecordFactory(previous)


def test_outputs_are_staged_inside_the_folder_when_its_parent_is_read_only(tmp_path, monkeypatch):
    import tempfile

    from elastic_hypermorph_bundle.workflow import writers

    out = tmp_path / "here"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    make = tempfile.mkdtemp

    def read_only_parent(prefix=None, dir=None):
        if Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied", str(dir))
        return make(prefix=prefix, dir=dir)

    monkeypatch.setattr(writers.tempfile, "mkdtemp", read_only_parent)
    failing = writers.OutputFiles(out, overwrite=True)
    with pytest.raises(RuntimeError):
        failing.run(lambda: (failing.new("a/ddf.nii.gz").write_text("x"), (_ for _ in ()).throw(RuntimeError("x"))))
    assert _tree(out) == {"notes.txt": "user file"} and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    files = writers.OutputFiles(out, overwrite=True)
    files.run(lambda: files.new("a/ddf.nii.gz").write_text("new"))
    assert set(_tree(out)) == {"notes.txt", "a/ddf.nii.gz", writers.OutputFiles.MANIFEST}


def test_an_overwriting_training_keeps_the_earlier_one_until_it_completes(tmp_path):
    from ignite.engine import Engine

    from elastic_hypermorph_bundle.hyperparams import HyperSpace
    from elastic_hypermorph_bundle.networks import HyperUNet
    from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
    from elastic_hypermorph_bundle.workflow.checkpoints import prepare_outputs
    from elastic_hypermorph_bundle.workflow.export import ExportTrainedModel

    data = make_synthetic_dataset(tmp_path / "data", num_pairs=3, spatial_size=(16, 16, 16))
    ckpt = tmp_path / "models"
    prepare_outputs(ckpt, tmp_path / "eval", data)
    earlier = {"model.pt": b"earlier weights", "model.json": b"{}", "checkpoint_epoch=9.pt": b"earlier state"}
    for name, content in earlier.items():
        (ckpt / name).write_bytes(content)
    earlier["split.json"] = (ckpt / "split.json").read_bytes()
    prepare_outputs(ckpt, tmp_path / "eval", data, overwrite=True)
    # the new training fails (or is killed) here: the earlier training is whole, set aside
    (aside,) = ckpt.glob(".replaced-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == earlier
    assert not (ckpt / "model.pt").exists() and (ckpt / "split.json").is_file()
    # when the new training completes and its model is written, the earlier one goes
    engine = Engine(lambda e, b: None)
    kwargs = {"encoder_features": [4, 4, 4], "decoder_features": [4, 4, 4, 4]}
    engine.network = HyperUNet(spatial_dims=3, hyper_dims=2, **kwargs)
    engine.state.epoch = 1
    ExportTrainedModel(ckpt, HyperSpace(), "HyperUNet", kwargs, spatial_size=None)(engine)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.json", "model.pt", "split.json"]
