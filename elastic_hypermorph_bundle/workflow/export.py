"""The end of a training run: the trained model ``model.pt`` and its card ``model.json`` in ``ckpt_dir``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..atomic import atomic_torch_save
from ..data.io import volume_grid
from ..hyperparams import HyperSpace
from ..losses import RegistrationLoss
from ..model_card import ModelCard, network_kwargs_for
from .checkpoints import BEST_CHECKPOINT, best_metric_record, remove_replaced

__all__ = ["ExportTrainedModel", "data_voxel_size"]

logger = logging.getLogger("elastic_hypermorph_bundle")


def data_voxel_size(datalist: Sequence[dict]) -> list[float]:
    """The median voxel size (mm, per axis) of the images of ``datalist`` (pair dicts with ``fixed_image`` and
    ``moving_image`` paths), read from their headers."""
    sizes = [
        np.linalg.norm(volume_grid(pair[key])[1][:3, :3], axis=0)
        for pair in datalist
        for key in ("fixed_image", "moving_image")
        if key in pair
    ]
    return [round(float(v), 6) for v in np.median(np.stack(sizes), axis=0)]


class ExportTrainedModel:
    """Trainer handler: when training completes, write the bundle's trained model to ``ckpt_dir``:

    * ``model.pt``: the network state dict of ``model_best.pt`` (best key metric of validation), or of the final
      weights when no validation ran;
    * ``model.json``: the :class:`~elastic_hypermorph_bundle.model_card.ModelCard` that inference, evaluation and
      sweeps check their settings against: trained space, network, preprocessing (``spatial_size``, ``pixdim``,
      ``hu_window``), and ``epochs`` (trained), ``weights`` (``"best"`` or ``"final"``),
      ``best_metric``/``best_metric_epoch``/``key_metric``, ``split_file``, ``training`` (settings of the run given
      by the config: loss weighting, fixed Lamé parameters, learning rate, ...).

    Then an earlier training that this one overwrote (set aside by ``prepare_outputs``) is deleted. Attach to the
    main process only in distributed runs.

    Args:
        ckpt_dir: where ``model_best.pt`` is and ``model.pt`` + ``model.json`` go.
        hyper_space, network_name, network_kwargs: the trained model (``hyper_dims`` and ``hyper_scale`` of the
            network default to the space's, as :func:`~elastic_hypermorph_bundle.model_card.network_kwargs_for`).
        spatial_size, pixdim, hu_window: the preprocessing of training.
        split_file: the ``split.json`` of the run.
        training: settings of the run to record (learning rate, seed, ...).
        loss: the training loss; its ``similarity``, ``weighting``, ``regularize``, ``fixed_lam`` and ``fixed_mu``
            are recorded in ``training``.
        evaluator: the validator, whose best metric is recorded.
        datalist: the training pairs; without ``pixdim`` (no resampling) the median voxel size of their images is
            recorded as ``data_pixdim``, the resolution the network learned at, to which inference resamples
            images on another grid (:class:`~elastic_hypermorph_bundle.networks.grid.NetworkGrid`).
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
        loss: RegistrationLoss | None = None,
        evaluator: Engine | None = None,
        datalist: Sequence[dict] | None = None,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        training = dict(training or {})
        if loss is not None:
            recorded = ("similarity", "weighting", "regularize", "fixed_lam", "fixed_mu")
            training.update({key: getattr(loss, key) for key in recorded})
        self.card = {
            "hyper_space": hyper_space,
            "network_name": network_name,
            "network_kwargs": network_kwargs_for(network_kwargs, hyper_space),
            "spatial_size": spatial_size,
            "pixdim": pixdim,
            "hu_window": hu_window,
            "split_file": None if split_file is None else str(split_file),
            "training": training,
        }
        if pixdim is None and datalist:
            self.card["data_pixdim"] = data_voxel_size(datalist)
        self.evaluator = evaluator

    def _best_metric(self, best: Path) -> dict:
        """``key_metric``, ``best_metric``, ``best_metric_epoch`` of the weights in ``best``: as recorded in the file
        (:class:`~.checkpoints.BestMetricRecord`), else the validator's state if it holds a best, else nothing (a
        validator that did not run in this process, e.g. after a resume, knows no best: the card then says none
        rather than a wrong one)."""
        record = best_metric_record(best)
        if record is None and self.evaluator is not None and int(getattr(self.evaluator.state, "best_metric_epoch", -1)) >= 1:
            state = self.evaluator.state
            record = {"key_metric": state.key_metric_name, "best_metric": float(state.best_metric),
                      "best_metric_epoch": int(state.best_metric_epoch)}  # fmt: skip
        if record is None:
            logger.warning("%s records no metric (written by an earlier version): the model card gives none.", best)
            return {}
        return record

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
        if source == "best":
            card.update(self._best_metric(best))
        ModelCard(**card).save(self.ckpt_dir)
        logger.info("trained model (%s weights, %d epochs) written to %s", source, engine.state.epoch, self.ckpt_dir)
        remove_replaced(self.ckpt_dir)  # an earlier training this one overwrote is no longer needed
