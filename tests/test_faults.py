"""Bad inputs and faults, second round (issue 24): nothing outside the output folder touched, nothing silently
wrong, and one clear line for each refused input. In-process and small (16^3-32^3): a few seconds each."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from elastic_hypermorph_bundle.workflow.writers import OutputFiles

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(files: OutputFiles, *names: str) -> None:
    for name in names:
        files.new(name).write_text(f"{name} of this run")


# ------------------------------------------------------------------ 1. records never reach outside the folder


@pytest.mark.parametrize("escape", ["../victim.txt", "../X2/deep.txt", "absolute", "link/inside.txt"])
def test_an_overwrite_refuses_a_record_naming_a_file_outside_the_output_folder(tmp_path, escape):
    out, other = tmp_path / "X", tmp_path / "X2"
    out.mkdir()
    other.mkdir()
    victim, deep = tmp_path / "victim.txt", other / "deep.txt"
    victim.write_text("user file")
    deep.write_text("user file")
    named = {"absolute": str(victim), "link/inside.txt": "link/inside.txt"}.get(escape, escape)
    if escape == "link/inside.txt":  # a folder inside that is a link to one outside
        (other / "inside.txt").write_text("user file")
        (out / "link").symlink_to(other, target_is_directory=True)
    (out / OutputFiles.MANIFEST).write_text(json.dumps({"files": [named]}))
    before = {**_tree(tmp_path)}
    files = OutputFiles(out, overwrite=True)
    with pytest.raises(ValueError, match=rf"{re.escape(OutputFiles.MANIFEST)}.*{re.escape(named)}.*outside"):
        files.run(lambda: _write(files, "metrics.csv"))
    assert _tree(tmp_path) == before and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "X2", "victim.txt"]  # no staging folder left


def test_an_overwrite_removes_only_the_earlier_files_never_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "out"
    first = OutputFiles(out)
    first.run(lambda: _write(first, "a/ddf.nii.gz", "metrics.csv"))
    (out / "user").mkdir()  # an empty folder of the user's, e.g. made for notes
    (out / "kept").mkdir()  # a folder of the user's that a (crafted) record names
    (out / "kept" / "notes.txt").write_text("user file")
    record = json.loads((out / OutputFiles.MANIFEST).read_text())
    (out / OutputFiles.MANIFEST).write_text(json.dumps({"files": [*record["files"], "kept"]}))
    second = OutputFiles(out, overwrite=True)
    second.run(lambda: _write(second, "metrics.csv"))
    assert set(_tree(out)) == {"metrics.csv", "kept/notes.txt", OutputFiles.MANIFEST}
    assert (out / "user").is_dir() and not (out / "a").exists()


def test_an_output_path_is_refused_if_it_leaves_the_output_folder(tmp_path):
    files = OutputFiles(tmp_path / "out")
    with pytest.raises(ValueError, match=r"\.\./escape\.txt.*outside"):
        files.new("../escape.txt")


# -------------------------------------- 2. an existing file is no output folder; writability checked before work


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_file_as_output_dir_is_refused_before_any_work(tmp_path, overwrite):
    afile = tmp_path / "afile"
    afile.write_text("user file")
    files = OutputFiles(afile, overwrite=overwrite)
    worked = []
    with pytest.raises(NotADirectoryError, match=rf"output_dir {afile} is a file"):
        files.run(lambda: worked.append(1))
    assert not worked and afile.read_text() == "user file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    below = OutputFiles(afile / "sub", overwrite=overwrite)
    with pytest.raises(NotADirectoryError, match=rf"{afile} is a file"):
        below.run(lambda: worked.append(1))
    assert not worked and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    from elastic_hypermorph_bundle.workflow import writers

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root writes into read-only folders: ask the kernel's answer for a user
        access = os.access
        monkeypatch.setattr(writers.os, "access", lambda path, mode: Path(path) != out and access(path, mode))
    try:
        files = OutputFiles(out, overwrite=True)
        worked = []
        with pytest.raises(PermissionError, match=rf"output_dir {out} is not writable"):
            files.run(lambda: worked.append(1))
        assert not worked and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        # a folder still to be made below a read-only one: named before any work too
        below = OutputFiles(out / "new" / "deeper")
        with pytest.raises(PermissionError, match=rf"cannot be created: {out} is not writable"):
            below.run(lambda: worked.append(1))
        assert not worked and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    finally:
        out.chmod(0o755)


# ------------------------------------------------------------------------------- small files for the data checks


def _nifti(path: Path, array, affine=None) -> Path:
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def _ct(shape=(8, 8, 8), seed=0):
    """A small volume in Hounsfield units: air (-1000) around soft tissue (~40), a little noise."""
    import numpy as np

    volume = np.full(shape, -1000.0, dtype=np.float32)
    volume[2:-2, 2:-2, 2:-2] = 40.0
    return volume + np.random.default_rng(seed).normal(0, 5, shape).astype(np.float32)


# ------------------------------------------------------------------------------- 3. points outside the image


def test_points_outside_their_image_are_refused_naming_the_file_and_the_count(tmp_path):
    import numpy as np

    from elastic_hypermorph_bundle.data.io import Learn2RegDataError, write_points
    from elastic_hypermorph_bundle.data.learn2reg import validate_pairs

    pair = {"fixed_image": str(_nifti(tmp_path / "f.nii.gz", _ct())), "pair_id": "a",
            "moving_image": str(_nifti(tmp_path / "m.nii.gz", _ct(seed=1)))}  # fmt: skip
    points = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [7.0, 7.0, 7.0], [3.5, 4.0, 6.4]])
    pair["fixed_keypoints"] = str(write_points(tmp_path / "f.csv", points))
    pair["moving_keypoints"] = str(write_points(tmp_path / "m.csv", points + 0.4))  # the last two at 7.4, 6.8: inside
    validate_pairs([pair], voxels=False)
    outside = points.copy()
    outside[1] = [-3.0, 2.0, 2.0]
    outside[2] = [2.0, 9.0, 2.0]
    write_points(tmp_path / "f.csv", outside)
    with pytest.raises(Learn2RegDataError, match=r"2 of 4 points in .*f\.csv lie outside .*\(8, 8, 8\).*f\.nii\.gz"):
        validate_pairs([pair], voxels=False)


# ------------------------------------------------------------------------------- 5. case ids must be unique


def test_two_image_names_giving_one_case_id_are_refused_naming_both(tmp_path):
    from elastic_hypermorph_bundle.data.io import Learn2RegDataError
    from elastic_hypermorph_bundle.data.learn2reg import discover_pairs

    for prefix in ("LungCT", "LungCTb"):
        for phase in ("0000", "0001"):
            _nifti(tmp_path / "imagesTr" / f"{prefix}_0006_{phase}.nii.gz", _ct())
    with pytest.raises(Learn2RegDataError, match=r"case id 0006_0006: .*LungCT_0006_0000.*LungCTb_0006_0000"):
        discover_pairs(tmp_path)  # plain layout
    entries = [{"fixed": f"./imagesTr/{p}_0006_0000.nii.gz", "moving": f"./imagesTr/{p}_0006_0001.nii.gz"}
               for p in ("LungCT", "LungCTb")]  # fmt: skip
    (tmp_path / "LungCT_dataset.json").write_text(json.dumps({"training_paired_images": entries}))
    with pytest.raises(Learn2RegDataError, match=r"case id 0006_0006: .*LungCT_0006_0000.*LungCTb_0006_0000"):
        discover_pairs(tmp_path)  # JSON layout
    # the same pair listed twice (train and val lists) is one pair
    (tmp_path / "LungCT_dataset.json").write_text(
        json.dumps({"training_paired_images": entries[:1], "registration_val": entries[:1]})
    )
    assert [p["pair_id"] for p in discover_pairs(tmp_path).pairs] == ["0006_0006"]


# ------------------------------------------------------------------------------- 6. intensities not in HU


@pytest.mark.parametrize(
    "name, convert, hint",
    [
        ("uint8", lambda hu: ((hu + 1000) / 1500 * 255).clip(0, 255).astype("uint8"), "Hounsfield"),
        ("hu_over_1000", lambda hu: (hu / 1000).astype("float32"), "Hounsfield"),
    ],
)
def test_intensities_that_are_not_hounsfield_units_are_named_with_their_range(tmp_path, caplog, name, convert, hint):
    from elastic_hypermorph_bundle.data.transforms import registration_transforms

    hu = _ct()
    paths = {"fixed_image": str(_nifti(tmp_path / "hu.nii.gz", hu)),
             "moving_image": str(_nifti(tmp_path / f"{name}.nii.gz", convert(hu)))}  # fmt: skip
    with caplog.at_level("WARNING", logger="elastic_hypermorph_bundle"):
        registration_transforms(hu_window=(-1000.0, 500.0))(paths)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # the HU image is not named
    assert f"{name}.nii.gz" in warnings[0] and hint in warnings[0] and "hu_window" in warnings[0]
    low, high = float(convert(hu).min()), float(convert(hu).max())
    assert f"{low:.4g}" in warnings[0] and f"{high:.4g}" in warnings[0]


# ------------------------------------------------------------- 7. the card's best metric is that of its weights


def _validator(network, scores: dict[int, float], ckpt_dir: Path):
    """A MONAI SupervisedEvaluator whose key metric at global epoch ``e`` is ``scores[e]``, with the validator's
    best-model saver of ``configs/train.json``."""
    from ignite.metrics import Average
    from monai.engines import SupervisedEvaluator

    from elastic_hypermorph_bundle.workflow.checkpoints import BestModelSaver

    def step(engine, batch):
        return {"score": torch.tensor(scores[engine.state.epoch])}

    saver = BestModelSaver(str(ckpt_dir), {"model": network}, save_key_metric=True,
                           key_metric_filename="model_best.pt", key_metric_save_state=True)  # fmt: skip
    validator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=[0], network=network, iteration_update=step,
        key_val_metric={"val_mean_dice": Average(output_transform=lambda output: output["score"])},
        val_handlers=[saver],
    )  # fmt: skip
    return validator, saver


def test_the_model_card_describes_the_best_weights_after_a_resume(tmp_path):
    from ignite.engine import Engine

    from elastic_hypermorph_bundle.hyperparams import HyperSpace
    from elastic_hypermorph_bundle.workflow.checkpoints import LastCheckpoint
    from elastic_hypermorph_bundle.workflow.export import ExportTrainedModel

    scores = {1: 0.5, 2: 0.9511, 3: 0.7}
    network = torch.nn.Linear(2, 2)
    validator, _ = _validator(network, scores, tmp_path)
    for epoch in (1, 2):
        with torch.no_grad():
            network.weight.fill_(epoch)
        validator.run(global_epoch=epoch)
    # the run is killed; the resumed one's validator starts with no best of its own
    trainer = Engine(lambda engine, batch: None)
    trainer.network, trainer.optimizer = network, torch.optim.SGD(network.parameters(), lr=0.1)
    trainer.state.device = "cpu"
    torch.save({"model": network.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "trainer": {"iteration": 2, "epoch_length": 1, "max_epochs": 3}},
               tmp_path / "checkpoint_epoch=2.pt")  # fmt: skip
    resumed, saver = _validator(network, scores, tmp_path)
    LastCheckpoint(tmp_path, resume=True, save=False, best_saver=saver)._start(trainer)
    assert resumed.state.best_metric == pytest.approx(0.9511) and resumed.state.best_metric_epoch == 2
    with torch.no_grad():
        network.weight.fill_(3)
    resumed.run(global_epoch=3)  # worse: model_best.pt keeps the epoch-2 weights
    assert resumed.state.best_metric_epoch == 2
    export = ExportTrainedModel(tmp_path, HyperSpace(), "HyperUNet", {}, spatial_size=None, evaluator=resumed)
    # a resume with nothing left to train, or whose last epoch has no validation: a validator that never ran
    idle, _ = _validator(network, scores, tmp_path / "other")
    for validator_seen in (resumed, idle):
        export.evaluator = validator_seen
        trainer.state.epoch = 3
        export(trainer)
        card = json.loads((tmp_path / "model.json").read_text())
        assert (card["best_metric"], card["best_metric_epoch"], card["key_metric"]) == (
            pytest.approx(0.9511), 2, "val_mean_dice"
        )
        assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].eq(2).all()


# ------------------------------------------------ 8, 13, 15. override values an id cannot take, ids a model ignores


def _cli(*args: str) -> list[str]:
    """``sys.argv`` of ``python -m monai.bundle run ...``."""
    import monai

    return [str(Path(monai.__file__).parent / "bundle" / "__main__.py"), "run", *args]


INFERENCE = str(ROOT / "configs" / "inference.json")
EVALUATE = f"['{INFERENCE}','{ROOT / 'configs' / 'evaluate.json'}']"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lam", "None"], r"--lam None: monai.bundle run ignores a null override.*0\.083"),
        (["--seed", "abc"], r"--seed must be a whole number, got 'abc'"),
        (["--instance_steps", "true"], r"--instance_steps must be a whole number or a list of whole numbers.*got 'true'"),
        (["--instance_steps", "2.5"], r"--instance_steps must be a whole number or a list .*got 2\.5"),
        (["--instance_steps", "[50,50,2.5]"], r"--instance_steps must be a whole number or a list .*got \[50, 50, 2\.5\]"),
        (["--mu", "soft"], r"--mu must be a number, got 'soft'"),
        (["--write_outputs", "maybe"], r"^--write_outputs must be true or false, got 'maybe'"),
    ],
)
def test_override_values_an_id_cannot_take_are_refused_naming_the_id(args, message):
    from elastic_hypermorph_bundle.cli import InvalidOverrideError, check_overrides

    with pytest.raises(InvalidOverrideError, match=message):
        check_overrides(_cli("--config_file", EVALUATE, *args))


def test_override_values_that_an_id_can_take_pass():
    from elastic_hypermorph_bundle.cli import check_overrides

    check_overrides(_cli("--config_file", EVALUATE, "--instance_steps", "[50,50,20]"))  # one count per level
    check_overrides(_cli("--config_file", EVALUATE, "--seed", "3", "--instance_steps", "0", "--lam", "1",
                         "--instance_grid", "1.5", "--write_outputs", "TRUE", "--amp", "false", "--split_file",
                         "split.json", "--lam_range", "[0, 2]", "--hyper_rank", "$None", "--ckpt_path", "m.pt"))  # fmt: skip


def test_instance_steps_are_one_count_for_every_level_or_one_per_level():
    """``instance_steps`` as inference.json passes it: a number is that many steps on every level, a list one count
    per level (coarsest first); all zero is no optimisation; another length or a negative count is refused by id."""
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

    assert InstanceOptimization(steps=4).steps == InstanceOptimization(steps=[4, 4, 4]).steps == (4, 4, 4)
    assert InstanceOptimization(steps=[50, 50, 20]).steps == (50, 50, 20)
    assert not InstanceOptimization(steps=[0, 0, 0], prealign="none").enabled
    assert InstanceOptimization(steps=[0, 0, 5], prealign="none").optimizes
    with pytest.raises(ValueError, match=r"instance_steps \[50, 20\] gives 2 levels' steps, but the optimisation "
                                         r"has 3 levels"):
        InstanceOptimization(steps=[50, 20])
    with pytest.raises(ValueError, match=r"instance_steps must be >= 0 on every level, got \[5, -1\]"):
        InstanceOptimization(steps=[5, -1], levels=2)


def test_a_hyperparameter_the_model_does_not_use_is_refused():
    from elastic_hypermorph_bundle.cli import InvalidOverrideError, check_overrides
    from elastic_hypermorph_bundle.hyperparams import HyperSpace

    with pytest.raises(InvalidOverrideError, match=r"--alpha is not used by this model: .*'elastic' takes --lam, --mu"):
        check_overrides(_cli("--config_file", INFERENCE, "--alpha", "0.5"), hyper_space=HyperSpace("elastic"))
    with pytest.raises(InvalidOverrideError, match=r"--lam is not used .*'diffusion' takes --alpha"):
        check_overrides(_cli("--config_file", INFERENCE, "--lam", "0.5"), hyper_space=HyperSpace("diffusion"))
    check_overrides(_cli("--config_file", INFERENCE, "--alpha", "0.5"), hyper_space=HyperSpace("diffusion"))
    check_overrides(_cli("--config_file", INFERENCE, "--lam", "0.5", "--mu", "0.1"), hyper_space=HyperSpace("elastic"))


# ------------------------------------------------------------- 4. what the network does not see is said


def test_the_network_grid_names_a_crop_once(caplog):
    from elastic_hypermorph_bundle.networks.grid import NetworkGrid

    grid = NetworkGrid((32, 32, 32))  # a card with pixdim null: no resampling
    with caplog.at_level("WARNING", logger="elastic_hypermorph_bundle"):
        assert grid.to_network(torch.zeros(1, 1, 32, 32, 32), (1.0, 1.0, 1.0)).shape == (1, 1, 32, 32, 32)
        assert not caplog.records
        for _ in range(2):  # the same pair's images twice, e.g. at two (lam, mu)
            assert grid.to_network(torch.zeros(1, 1, 64, 64, 40), (0.5, 0.5, 0.5)).shape == (1, 1, 32, 32, 32)
    (record,) = caplog.records
    assert "central 32x32x32 voxels of this 64x64x40 image (32, 32, 8 voxels cropped" in record.getMessage()
    assert "pixdim is null" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="elastic_hypermorph_bundle"):  # resampled to 2 mm, it fits
        NetworkGrid((32, 32, 32), (2.0, 2.0, 2.0)).to_network(torch.zeros(1, 1, 63, 63, 39), (1.0, 1.0, 1.0))
    assert not caplog.records


# ------------------------------------------- 9, 11. a checkpoint the bundle will not load is named in one line


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle payload ran",))


def test_a_pickle_checkpoint_is_refused_in_one_line_naming_the_file(tmp_path):
    import pickle

    from elastic_hypermorph_bundle.atomic import UnsafeCheckpointError
    from elastic_hypermorph_bundle.model_card import check_checkpoint, load_trained_network

    model = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Payload()}, model)
    for load in (check_checkpoint, lambda path: load_trained_network(path, torch.nn.Linear(1, 1))):
        with pytest.raises(UnsafeCheckpointError) as info:
            load(model)
        message = str(info.value)
        assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, ValueError)
        assert str(model) in message and "will not load it" in message and "\n" not in message
        assert "weights_only set to False" not in message


def test_model_best_pt_loads_as_the_network_or_is_refused_naming_model_pt(tmp_path):
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    from elastic_hypermorph_bundle.model_card import check_checkpoint

    network = torch.nn.Linear(2, 2)
    validator, _ = _validator(network, {1: 0.8}, tmp_path)
    with torch.no_grad():
        network.weight.fill_(5.0)
    validator.run(global_epoch=1)
    best = tmp_path / "model_best.pt"
    assert check_checkpoint(best) == best  # this version's layout: the weights under "model"
    loaded = torch.nn.Linear(2, 2)
    CheckpointLoader(str(best), {"model": loaded}, map_location="cpu")(Engine(lambda e, b: None))  # as inference.json
    assert loaded.weight.eq(5.0).all()
    earlier = tmp_path / "earlier" / "model_best.pt"  # an earlier version's flat layout
    earlier.parent.mkdir()
    torch.save({**network.state_dict(), "checkpointer": {"saved": [(0.8, "model_best.pt")]}}, earlier)
    with pytest.raises(ValueError, match=rf"--ckpt_path {re.escape(str(earlier.with_name('model.pt')))}"):
        check_checkpoint(earlier)


# ------------------------------------------------------------------ 10. a full disk is named, once, by folder


@pytest.mark.parametrize("failure", ["enospc", "torch"])
def test_a_full_disk_is_named_with_its_folder_and_the_previous_file_kept(tmp_path, monkeypatch, failure):
    import errno
    from collections import namedtuple

    from elastic_hypermorph_bundle import atomic

    path = atomic.atomic_torch_save({"w": torch.ones(3)}, tmp_path / "checkpoint_epoch=1.pt")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: usage(10**9, 10**9, 0 if failure == "torch" else 10**8))

    def full(stream):
        stream.write(b"half a checkpoint")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(atomic.NoSpaceError, match=rf"^no space left on {re.escape(str(tmp_path))} \(writing model\.pt\)"):
        atomic.atomic_write(tmp_path / "model.pt", full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]
    assert torch.load(path, weights_only=True)["w"].eq(1).all()
    monkeypatch.undo()  # the real free space
    with pytest.raises(RuntimeError, match="unrelated"):  # other failures pass through unchanged
        atomic.atomic_write(tmp_path / "model.pt", lambda stream: (_ for _ in ()).throw(RuntimeError("unrelated")))


def test_a_full_disk_is_the_one_clean_last_line(capsys):
    from elastic_hypermorph_bundle import cli
    from elastic_hypermorph_bundle.atomic import NoSpaceError

    try:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        except RuntimeError as inner:
            raise NoSpaceError("no space left on /data/models (writing model.pt)") from inner
    except NoSpaceError as error:
        cli._clean_excepthook(type(error), error, error.__traceback__)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[-1] == "NoSpaceError: no space left on /data/models (writing model.pt)"


# ---------------------------------------------------- 14. --init identity: messages that match what runs


def test_init_identity_needs_no_card_takes_any_lame_parameters_and_names_the_diffusion_regularizer(tmp_path, caplog):
    from elastic_hypermorph_bundle.hyperparams import HyperSpace
    from elastic_hypermorph_bundle.model_card import trained_hyper_space
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization
    from elastic_hypermorph_bundle.workflow.inference import hyper_row
    from elastic_hypermorph_bundle.workflow.steps import RegisterStep

    space = HyperSpace("elastic")
    with caplog.at_level("WARNING", logger="elastic_hypermorph_bundle"):
        assert trained_hyper_space(tmp_path / "none" / "model.pt", space, init="identity") is space
        row = hyper_row(space, lam=3.0, mu=2.0, init="identity")  # no network: no trained range
    assert row.tolist() == [[3.0, 2.0]] and not caplog.records
    with pytest.raises(ValueError, match="never saw such values"):
        hyper_row(space, lam=3.0, mu=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        hyper_row(space, lam=-1.0, mu=2.0, init="identity")
    diffusion = InstanceOptimization(steps=5, hyper_space=HyperSpace("diffusion"))
    with pytest.raises(ValueError, match="diffusion regularizer does not have: pass --regularizer elastic") as info:
        RegisterStep(torch.tensor([[0.1]]), instance=diffusion, init="identity")
    assert "instance_steps" not in str(info.value)


def test_training_refuses_a_file_as_its_folders_before_any_work(tmp_path):
    from elastic_hypermorph_bundle.workflow.checkpoints import prepare_outputs

    data = tmp_path / "data"  # never read: the folders are checked first
    afile = tmp_path / "afile"
    afile.write_text("user file")
    for ckpt_dir, output_dir, name in ((afile, tmp_path / "eval", "ckpt_dir"), (tmp_path / "m", afile / "x", "output_dir")):
        with pytest.raises(NotADirectoryError, match=rf"^{name} .* is a file, not a folder"):
            prepare_outputs(ckpt_dir, output_dir, data, overwrite=True)
    assert afile.read_text() == "user file" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_model_trained_without_pixdim_reads_other_grids_at_its_training_voxel_size(tmp_path, caplog):
    from ignite.engine import Engine

    from elastic_hypermorph_bundle.hyperparams import HyperSpace
    from elastic_hypermorph_bundle.model_card import network_grid
    from elastic_hypermorph_bundle.workflow.export import ExportTrainedModel

    pairs = [{"fixed_image": str(_nifti(tmp_path / f"f{i}.nii.gz", _ct((32, 32, 32)))),
              "moving_image": str(_nifti(tmp_path / f"m{i}.nii.gz", _ct((32, 32, 32))))} for i in range(2)]  # fmt: skip
    engine = Engine(lambda e, b: None)
    engine.network, engine.state.epoch = torch.nn.Linear(1, 1), 1
    ExportTrainedModel(tmp_path / "models", HyperSpace(), "HyperUNet", {}, spatial_size=(32, 32, 32), datalist=pairs)(engine)
    card = json.loads((tmp_path / "models" / "model.json").read_text())
    assert card["pixdim"] is None and card["data_pixdim"] == [1.5, 1.5, 2.0]
    grid = network_grid((32, 32, 32), None, ckpt_path=tmp_path / "models" / "model.pt")
    assert grid.target_pixdim == (1.5, 1.5, 2.0)
    # the same anatomy on a grid twice as fine: seen whole at the trained voxel size, not as its central crop
    fine = torch.nn.functional.interpolate(torch.rand(1, 1, 32, 32, 32), size=(63, 63, 63), mode="trilinear",
                                           align_corners=True)  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING", logger="elastic_hypermorph_bundle"):
        assert grid.to_network(fine, (0.75, 0.75, 1.0)).shape == (1, 1, 32, 32, 32)
    assert grid.resampled_shape((63, 63, 63), (0.75, 0.75, 1.0)) == (32, 32, 32) and not caplog.records
