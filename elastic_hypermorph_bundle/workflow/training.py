"""Training workflow pieces wired by ``configs/train.json``: the training iteration, output-folder checks, resuming,
the export of the trained model (``model.pt`` + ``model.json``) and distributed set-up.

HyperMorph training (Hoopes et al., IPMI 2021): every sample of every batch gets its own hyperparameter row drawn
from the model's :class:`~elastic_hypermorph_bundle.hyperparams.HyperSpace`; the network is conditioned on it and the
loss weights its regularizer by it, so one network learns the whole family of regularized registrations.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import ignite.distributed as idist
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import convert_to_tensor

from ..atomic import AtomicCheckpointSaver, atomic_torch_save, readable_checkpoint, remove_partial_files
from ..hyperparams import HyperSpace
from ..losses.elastic import NonFiniteFieldError
from ..model_card import ModelCard
from ..networks import warp_image
from . import parse_flag
from .datalists import check_split, write_split

__all__ = [
    "TrainStep",
    "TrainingDivergedError",
    "loss_terms",
    "latest_checkpoint",
    "prepare_outputs",
    "LastCheckpoint",
    "ExportTrainedModel",
    "init_distributed",
    "distributed_device",
    "LAST_CHECKPOINT_PREFIX",
    "BEST_CHECKPOINT",
    "SPLIT_FILE",
]

logger = logging.getLogger("elastic_hypermorph_bundle")

#: ``CheckpointSaver(save_interval=1, n_saved=1)`` names the last checkpoint ``checkpoint_epoch=<N>.pt``
LAST_CHECKPOINT_PREFIX = "checkpoint_epoch="
#: the validator's ``CheckpointSaver(key_metric_filename=...)`` writes the best model here
BEST_CHECKPOINT = "model_best.pt"
#: the data split of a training, kept with its model in ``ckpt_dir`` (the model card points at it)
SPLIT_FILE = "split.json"
_LOSS_TERMS = ("loss", "similarity", "regularization")


class TrainStep:
    """``iteration_update`` of a :class:`monai.engines.SupervisedTrainer`: one HyperMorph training step.

    For a batch of pairs (``"moving_image"``, ``"fixed_image"``, ``(B, 1, *spatial)``):

    1. draw ``hyper`` ``(B, H)``, one row per sample, with ``hyper_space.sample`` from a generator seeded by
       ``(seed, rank, iteration)`` (so resumed and distributed runs draw reproducible, rank-distinct rows);
    2. ``ddf, field = network(cat([moving, fixed], 1), hyper, return_velocity=True)``, through the trainer's
       ``inferer`` (a ``SimpleInferer``) and under autocast if the trainer has ``amp``;
    3. ``warped = warp_image(moving, ddf)`` and ``loss_function(warped, fixed, ddf, hyper, velocity=field,
       return_components=True)`` (a :class:`~elastic_hypermorph_bundle.losses.RegistrationLoss`), in float32;
    4. backward and optimizer step (through the trainer's ``GradScaler`` with AMP); without AMP a non-finite
       displacement field (checked on the CPU), loss or updated weights (one device sync per batch) raises
       :class:`TrainingDivergedError`, naming the iteration and what to try.

    Returns (and stores in ``engine.state.output``): ``"image"`` (network input), ``"pred"`` (DDF), ``"hyper"``, and
    the scalars ``"loss"``, ``"similarity"`` (LNCC, unweighted) and ``"regularization"`` (weighted).

    Args:
        hyper_space: the hyperparameters the network is conditioned on.
        seed: base seed of the hyperparameter draws.
    """

    def __init__(self, hyper_space: HyperSpace, seed: int = 0) -> None:
        self.hyper_space = hyper_space
        self.seed = int(seed)

    def _generator(self, iteration: int) -> torch.Generator:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = np.random.SeedSequence([self.seed, rank, iteration]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __call__(self, engine: Engine, batchdata: dict) -> dict:
        if batchdata is None or not {"fixed_image", "moving_image"} <= set(batchdata):
            raise ValueError("TrainStep needs batches with 'fixed_image' and 'moving_image' (B, 1, *spatial).")
        device = engine.state.device
        moving, fixed = (
            convert_to_tensor(batchdata[key], track_meta=False).to(device, non_blocking=engine.non_blocking)
            for key in ("moving_image", "fixed_image")
        )
        hyper = self.hyper_space.sample(moving.shape[0], self._generator(engine.state.iteration), device)
        image = torch.cat([moving, fixed], dim=1)
        engine.state.output = {"image": image, "hyper": hyper}

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = bool(engine.amp) and engine.scaler is not None
        with torch.autocast(device.type, enabled=use_amp, **engine.amp_kwargs):
            ddf, field = engine.inferer(image, engine.network, hyper, return_velocity=True)
        engine.state.output["pred"] = ddf
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        # warping and LNCC in float32: the local variances of LNCC lose too much precision in half precision
        ddf, field = ddf.float(), field.float()
        if not use_amp and ddf.device.type == "cpu" and not torch.isfinite(ddf).all():  # free on the CPU
            raise TrainingDivergedError(_diverged(engine, "the predicted displacement field is not finite (NaN/inf)"))
        terms = engine.loss_function(warp_image(moving, ddf), fixed, ddf, hyper, velocity=field, return_components=True)
        engine.state.output.update(terms)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        loss = terms["loss"]
        if use_amp:  # a non-finite loss is the GradScaler's to handle: it skips the step and lowers the scale
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
            # the one value check per batch on the device (the loss skips its per-call checks off the CPU): a
            # non-finite loss, or weights this step made non-finite (validation would meet them first)
            weights = torch.stack([torch.isfinite(p).all() for p in engine.network.parameters()]).all()
            if not bool(torch.isfinite(loss) & weights):
                if torch.isfinite(loss):
                    what = "the network's weights are not finite (NaN/inf) after this step"
                else:
                    values = ", ".join(f"{key}={float(terms[key]):.4g}" for key in _LOSS_TERMS)
                    what = f"the training loss is not finite ({values})"
                raise TrainingDivergedError(_diverged(engine, what))
        for key in _LOSS_TERMS:
            engine.state.output[key] = terms[key].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # the trainer decollates on this event
        return engine.state.output


class TrainingDivergedError(FloatingPointError):
    """Training produced non-finite values (the optimisation diverged); the message says where and what to try."""


def _diverged(engine: Engine, what: str) -> str:
    """The message of :class:`TrainingDivergedError`: iteration, epoch, learning rate, and what to try. (The input
    images are checked to be finite before training starts, ``validate_pairs``, so it is the optimisation.)"""
    rates = sorted({float(group["lr"]) for group in engine.optimizer.param_groups})
    rate = ", ".join(f"{r:g}" for r in rates)
    return (
        f"training diverged at iteration {engine.state.iteration} (epoch {engine.state.epoch}): {what}. The "
        f"learning rate is {rate}; try a lower --learning_rate (the default is 1e-4) and --amp false if AMP is "
        "on, then train again with --overwrite true (or --resume true, if the last checkpoint predates the "
        "divergence)."
    )


def loss_terms(output: dict | list[dict]) -> dict[str, float]:
    """``output_transform`` for Stats/TensorBoard handlers: ``{"loss", "similarity", "regularization"}`` of a
    :class:`TrainStep` output (a dict, or the per-sample dicts of a decollated batch, where they are replicated)."""
    first = output[0] if isinstance(output, list) else output
    return {key: float(first[key]) for key in _LOSS_TERMS if key in first}


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
      which deletes them (only these files: ``checkpoint_epoch=*.pt``, ``model_best.pt``, ``model.pt``,
      ``model.json``, ``split.json``).

    The main process then creates both folders and writes the data split to ``ckpt_dir/split.json``
    (:func:`~elastic_hypermorph_bundle.workflow.datalists.write_split`), with the model it describes: two trainings
    sharing ``output_dir`` (logs) keep their own splits, and each model card points at its own. Returns the path
    of ``split.json``.

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint.
        FileExistsError: existing trained files without ``overwrite``.
        ValueError: ``resume`` with another data split than the recorded one.
    """
    ckpt_dir, output_dir = Path(ckpt_dir), Path(output_dir)
    resume, overwrite = parse_flag("resume", resume), parse_flag("overwrite", overwrite)
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
            for path in existing:
                path.unlink()
            logger.info("overwrite=true: removed %s from %s", [p.name for p in existing], ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not split_path.is_file():
            split_path = write_split(dataset_dir, ckpt_dir, seed=seed, split_file=split_file)
    if distributed:
        dist.barrier()  # no rank may start before the main process has cleaned up
    return split_path


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
                _diverged(engine, "validation met a non-finite displacement field (the updated weights overflow)")
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
                loaders.append(CheckpointLoader(str(best), {"checkpointer": self.best_saver}, map_location="cpu"))
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


class ExportTrainedModel:
    """Trainer handler: when training completes, write the bundle's trained model to ``ckpt_dir``:

    * ``model.pt``: the network state dict of ``model_best.pt`` (best key metric of validation), or of the final
      weights when no validation ran;
    * ``model.json``: the :class:`~elastic_hypermorph_bundle.model_card.ModelCard` that inference, evaluation and
      sweeps check their settings against: trained space, network, preprocessing (``spatial_size``, ``pixdim``,
      ``hu_window``), and ``epochs`` (trained), ``weights`` (``"best"`` or ``"final"``),
      ``best_metric``/``best_metric_epoch``/``key_metric``, ``split_file``, ``training`` (settings of the run given
      by the config: loss weighting, fixed Lamé parameters, learning rate, ...).

    Attach to the main process only in distributed runs.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        hyper_space: HyperSpace,
        network_name: str,
        network_kwargs: dict,
        spatial_size: Sequence[int] | None,
        pixdim: Sequence[float] | None = None,
        hu_window: Sequence[float] = (-1000.0, 500.0),
        split_file: str | Path | None = None,
        training: dict | None = None,
        evaluator: Engine | None = None,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.card = {
            "hyper_space": hyper_space,
            "network_name": network_name,
            "network_kwargs": network_kwargs,
            "spatial_size": spatial_size,
            "pixdim": pixdim,
            "hu_window": hu_window,
            "split_file": None if split_file is None else str(split_file),
            "training": dict(training or {}),
        }
        self.evaluator = evaluator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        network = getattr(engine.network, "module", engine.network)  # unwrap DistributedDataParallel
        best = self.ckpt_dir / BEST_CHECKPOINT
        if best.is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)
            # a single saved object is stored flat, next to the saver's own state ("checkpointer")
            weights = state["model"] if "model" in state else {k: v for k, v in state.items() if k != "checkpointer"}
            source = "best"
        else:
            logger.warning("no %s (no validation ran): model.pt holds the final weights.", best)
            weights, source = network.state_dict(), "final"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(weights, self.ckpt_dir / "model.pt")
        card = {**self.card, "epochs": engine.state.epoch, "weights": source}
        if self.evaluator is not None and source == "best":
            card.update(
                key_metric=self.evaluator.state.key_metric_name,
                best_metric=float(self.evaluator.state.best_metric),
                best_metric_epoch=int(self.evaluator.state.best_metric_epoch),
            )
        ModelCard(**card).save(self.ckpt_dir)
        logger.info("trained model (%s weights, %d epochs) written to %s", source, engine.state.epoch, self.ckpt_dir)


def distributed_device() -> torch.device:
    """This process's device under ``torchrun``: ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed() -> int:
    """Join the ``torchrun`` process group (NCCL on CUDA, Gloo on CPU) unless already joined, select this process's
    GPU, register the group with ``ignite.distributed``, and return the rank."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("distributed training must be launched with torchrun (RANK/WORLD_SIZE are not set).")
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(distributed_device())
    # ignite sets up its view of the group with a collective call, on first use; make every rank take part now,
    # since some ignite objects (checkpoint savers) are created on the main process only
    idist.sync()
    return dist.get_rank()
