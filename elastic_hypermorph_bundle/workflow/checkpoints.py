"""The checkpoints of a training run in ``ckpt_dir``: checking and preparing the folder before a run, saving the
last training state every epoch and resuming from it.

Files: ``checkpoint_epoch=<N>.pt`` (the last training state: model, optimizer, trainer), ``model_best.pt`` (the
validator's best model with its saver's state and the record of its metric and epoch), ``split.json`` (the data split); the trained model ``model.pt`` + ``model.json`` is written at the
end by :class:`~elastic_hypermorph_bundle.workflow.export.ExportTrainedModel`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from ..atomic import AtomicCheckpointSaver, check_output_folder, readable_checkpoint, remove_partial_files
from ..losses.elastic import NonFiniteFieldError
from . import parse_flag
from .datalists import check_split, write_split
from .train_step import TrainingDivergedError, diverged_message

__all__ = [
    "LAST_CHECKPOINT_PREFIX",
    "BEST_CHECKPOINT",
    "SPLIT_FILE",
    "REPLACED_PREFIX",
    "remove_replaced",
    "checkpoints_newest_first",
    "latest_checkpoint",
    "prepare_outputs",
    "LastCheckpoint",
    "BEST_RECORD",
    "BestMetricRecord",
    "BestModelSaver",
    "best_metric_record",
]

logger = logging.getLogger("elastic_hypermorph_bundle")

#: ``CheckpointSaver(save_interval=1, n_saved=1)`` names the last checkpoint ``checkpoint_epoch=<N>.pt``
LAST_CHECKPOINT_PREFIX = "checkpoint_epoch="
#: the validator's ``CheckpointSaver(key_metric_filename=...)`` writes the best model here
BEST_CHECKPOINT = "model_best.pt"
#: the data split of a training, kept with its model in ``ckpt_dir`` (the model card points at it)
SPLIT_FILE = "split.json"
#: ``--overwrite true`` sets the earlier training aside in ``ckpt_dir/.replaced-<random>/`` until the new one completes
REPLACED_PREFIX = ".replaced-"


def checkpoints_newest_first(ckpt_dir: str | Path) -> list[Path]:
    """The ``checkpoint_epoch=<N>.pt`` files of ``ckpt_dir``, largest ``N`` first."""
    pattern = re.compile(re.escape(LAST_CHECKPOINT_PREFIX) + r"(\d+)\.pt$")
    found = [(int(m.group(1)), path) for path in Path(ckpt_dir).glob("*.pt") if (m := pattern.match(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The ``checkpoint_epoch=<N>.pt`` with the largest ``N`` in ``ckpt_dir``, or None."""
    found = checkpoints_newest_first(ckpt_dir)
    return found[0] if found else None


def _trained_files(ckpt_dir: Path) -> list[Path]:
    names = {BEST_CHECKPOINT, "model.pt", "model.json", SPLIT_FILE}
    return sorted(p for p in ckpt_dir.glob("*") if p.name in names or p.name.startswith(LAST_CHECKPOINT_PREFIX))


def remove_replaced(ckpt_dir: str | Path) -> list[Path]:
    """Delete the earlier training set aside by an ``overwrite`` (:func:`prepare_outputs`) once the training
    replacing it has completed; returns the folders removed."""
    found = sorted(Path(ckpt_dir).glob(f"{REPLACED_PREFIX}*")) if Path(ckpt_dir).is_dir() else []
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
    if found:
        logger.info("removed the earlier training replaced by this one: %s", [str(f) for f in found])
    return found


def prepare_outputs(
    ckpt_dir: str | Path,
    output_dir: str | Path,
    dataset_dir: str | Path,
    seed: int = 0,
    split_file: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    main_process: bool = True,
) -> Path:
    """Check and create the output folders of a training run; call it after the datalists are built so that a run
    failing on its inputs writes nothing.

    * ``resume``: ``ckpt_dir`` must hold a ``checkpoint_epoch=<N>.pt`` (training goes on from it), and this run's
      data split must be the one recorded in ``ckpt_dir/split.json``.
    * otherwise, a ``ckpt_dir`` holding checkpoints, a trained model or a split is refused unless ``overwrite``,
      which sets them aside (only these files: ``checkpoint_epoch=*.pt``, ``model_best.pt``, ``model.pt``,
      ``model.json``, ``split.json``) in ``ckpt_dir/.replaced-<random>/``: they are deleted when the new training
      completes (:func:`remove_replaced`), and stay there, whole, if it fails or is killed.

    The main process then creates both folders and writes the data split to ``ckpt_dir/split.json``
    (:func:`~elastic_hypermorph_bundle.workflow.datalists.write_split`), with the model it describes: two trainings
    sharing ``output_dir`` (logs) keep their own splits, and each model card points at its own. Returns the path
    of ``split.json``.

    Raises:
        NotADirectoryError, PermissionError: ``ckpt_dir`` or ``output_dir`` is a file or not writable
            (:func:`~elastic_hypermorph_bundle.atomic.check_output_folder`).
        FileNotFoundError: ``resume`` without a checkpoint.
        FileExistsError: existing trained files without ``overwrite``.
        ValueError: ``resume`` with another data split than the recorded one.
    """
    ckpt_dir, output_dir = Path(ckpt_dir), Path(output_dir)
    resume, overwrite = parse_flag("resume", resume), parse_flag("overwrite", overwrite)
    check_output_folder(ckpt_dir, "ckpt_dir")
    check_output_folder(output_dir, "output_dir")
    existing = _trained_files(ckpt_dir) if ckpt_dir.is_dir() else []
    if resume:
        if latest_checkpoint(ckpt_dir) is None:
            raise FileNotFoundError(
                f"resume=true but ckpt_dir {ckpt_dir} holds no {LAST_CHECKPOINT_PREFIX}<N>.pt checkpoint to resume from."
            )
    elif existing and not overwrite:
        raise FileExistsError(
            f"ckpt_dir {ckpt_dir} already holds training outputs ({', '.join(p.name for p in existing)}); "
            "pass --resume true to continue that training or --overwrite true to replace it."
        )
    split_path = ckpt_dir / SPLIT_FILE
    if resume and split_path.is_file():
        check_split(split_path, dataset_dir, seed=seed, split_file=split_file)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.barrier()  # every rank has checked ckpt_dir before the main process writes to it
    if main_process:
        if existing and overwrite and not resume:
            aside = Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=ckpt_dir))
            for path in existing:
                os.replace(path, aside / path.name)
            logger.info(
                "overwrite=true: the earlier training's %s moved to %s; deleted when this training completes, kept "
                "if it fails", [p.name for p in existing], aside,
            )
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not split_path.is_file():
            split_path = write_split(dataset_dir, ckpt_dir, seed=seed, split_file=split_file)
    if distributed:
        dist.barrier()  # no rank may start before the main process has cleaned up
    return split_path


#: the entry of ``model_best.pt`` that records which validation made it the best (:class:`BestMetricRecord`)
BEST_RECORD = "best_metric"


class BestMetricRecord:
    """The validator's best key metric as a checkpoint entry: saved with the weights it belongs to, in
    ``model_best.pt``, so that the model card describes those weights (also after a resume, or a run whose last
    epoch had no validation), and restored into the validator on resume.

    ``state_dict()``: ``{"key_metric": name, "best_metric": value, "best_metric_epoch": epoch}`` of the engine's
    state (MONAI workflows keep ``key_metric_name``, ``best_metric``, ``best_metric_epoch`` there).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict:
        state = self.engine.state
        return {
            "key_metric": str(getattr(state, "key_metric_name", None)),
            "best_metric": float(getattr(state, "best_metric", float("nan"))),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
        }

    def load_state_dict(self, record: dict) -> None:
        self.engine.state.best_metric = float(record["best_metric"])
        self.engine.state.best_metric_epoch = int(record["best_metric_epoch"])


class BestModelSaver(AtomicCheckpointSaver):
    """The validator's key-metric saver (:class:`~elastic_hypermorph_bundle.atomic.AtomicCheckpointSaver`, same
    arguments) that saves, beside the weights, the :class:`BestMetricRecord` of the validator it is attached to
    (as ``model_best.pt``'s ``best_metric`` entry): the file says which epoch and metric its weights are."""

    def attach(self, engine: Engine) -> None:
        self.save_dict[BEST_RECORD] = BestMetricRecord(engine)  # the Checkpoint objects share this dict
        super().attach(engine)


def best_metric_record(path: str | Path) -> dict | None:
    """The :class:`BestMetricRecord` saved in a ``model_best.pt`` (None for a file without one, e.g. written by
    an earlier version, or an unreadable file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    record = state.get(BEST_RECORD) if isinstance(state, dict) else None
    return dict(record) if isinstance(record, dict) and int(record.get("best_metric_epoch", -1)) >= 1 else None


class LastCheckpoint:
    """Trainer handler for interrupted runs: saves the last training state and, with ``resume``, goes on from it.

    * ``save``: after every ``interval`` epochs, model, optimizer and trainer state (epoch, iteration) are written to
      ``ckpt_dir/checkpoint_epoch=<N>.pt``, replacing the previous one (MONAI ``CheckpointSaver``).
    * ``resume``: when the trainer starts, that state is restored from the latest ``checkpoint_epoch=<N>.pt``
      (MONAI ``CheckpointLoader``), and the best-model tracking of ``best_saver`` (the validator's key-metric
      ``CheckpointSaver``, saved with ``key_metric_save_state=True``) from ``model_best.pt``, so that only a better
      model replaces it. Training goes on up to the trainer's ``max_epochs`` (raise ``--epochs`` to train longer).

    The trainer itself is part of the saved state, so this handler takes it at :meth:`attach` instead of from the
    config (which would be a circular reference). In distributed runs every rank resumes; only the main process
    saves (``save=False`` elsewhere). A run stopped by a non-finite field in validation (the weights of the last step
    overflow) is reported as :class:`TrainingDivergedError`, like a divergence met by :class:`TrainStep`.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        resume: bool = False,
        save: bool = True,
        best_saver: CheckpointSaver | None = None,
        interval: int = 1,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.resume = parse_flag("resume", resume)
        self.save = bool(save)
        self.best_saver = best_saver
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        # the trainer's network and optimizer exist only after its handlers are attached: bind them at start
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._explain_divergence)

    @staticmethod
    def _explain_divergence(engine: Engine, error: BaseException) -> None:
        """Re-raise a failure of the run; a non-finite field met by validation (the updated weights overflow) is
        reported as :class:`TrainingDivergedError`, with the iteration and what to try. (Attach this handler
        before ``StatsHandler``, which re-raises the original error.)"""
        cause = error
        while cause is not None and not isinstance(cause, NonFiniteFieldError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None and not isinstance(error, TrainingDivergedError):
            raise TrainingDivergedError(
                diverged_message(engine, "validation met a non-finite displacement field (the updated weights overflow)")
            ) from error
        raise error

    def _start(self, engine: Engine) -> None:
        state = {"model": engine.network, "optimizer": engine.optimizer, "trainer": engine}
        if self.save:
            remove_partial_files(self.ckpt_dir)  # leftovers of a save interrupted by a kill
        if self.resume:
            # an unreadable newest checkpoint (e.g. written by another tool, or damaged) is skipped with a warning
            last = readable_checkpoint(checkpoints_newest_first(self.ckpt_dir))
            if last is None:
                raise FileNotFoundError(
                    f"resume=true but {self.ckpt_dir} holds no readable {LAST_CHECKPOINT_PREFIX}<N>.pt checkpoint."
                )
            engine.logger.info("resuming from %s", last)
            loaders = [CheckpointLoader(str(last), state, map_location=_map_location(engine))]
            best = self.ckpt_dir / BEST_CHECKPOINT
            if self.best_saver is not None and best.is_file() and readable_checkpoint([best]) is not None:
                restore = {"checkpointer": self.best_saver}
                record = self.best_saver.save_dict.get(BEST_RECORD)
                if record is not None and best_metric_record(best) is not None:
                    restore[BEST_RECORD] = record  # the validator goes on from the saved best, as its saver does
                loaders.append(CheckpointLoader(str(best), restore, map_location="cpu"))
            for loader in loaders:
                loader.logger = engine.logger
                loader(engine)
        if self.save:
            AtomicCheckpointSaver(str(self.ckpt_dir), state, save_interval=self.interval, n_saved=1).attach(engine)
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._remove_older)

    def _remove_older(self, engine: Engine) -> None:
        """Delete the checkpoints other than the one just saved (a resumed run's saver does not know them)."""
        just_saved = f"{LAST_CHECKPOINT_PREFIX}{engine.state.epoch}.pt"
        for path in checkpoints_newest_first(self.ckpt_dir):
            if path.name != just_saved:
                path.unlink()


def _map_location(engine: Engine) -> dict | str:
    """Checkpoints saved on ``cuda:0`` (the main process) load onto this process's device."""
    device = torch.device(engine.state.device)
    return {"cuda:0": str(device)} if device.type == "cuda" else "cpu"
