"""The training iteration wired by ``configs/train.json``: one HyperMorph step per batch.

HyperMorph training (Hoopes et al., IPMI 2021): every sample of every batch gets its own hyperparameter row drawn
from the model's :class:`~elastic_hypermorph_bundle.hyperparams.HyperSpace`; the network is conditioned on it and the
loss weights its regularizer by it, so one network learns the whole family of regularized registrations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor

from ..hyperparams import HyperSpace
from ..forward import training_terms
from ..losses.amortised import AmortisedTargets

__all__ = ["TrainStep", "TrainingDivergedError", "diverged_message", "loss_terms", "LOSS_TERMS"]

#: the scalars of a training step's output, logged by the Stats/TensorBoard handlers ("amortised" only on the
#: batches trained with amortised optimisation's term)
LOSS_TERMS = ("loss", "similarity", "regularization", "amortised")


class TrainStep:
    """``iteration_update`` of a :class:`monai.engines.SupervisedTrainer`: one HyperMorph training step.

    For a batch of pairs (``"moving_image"``, ``"fixed_image"``, ``(B, 1, *spatial)``):

    1. draw ``hyper`` ``(B, H)``, one row per sample, with ``hyper_space.sample`` from a generator seeded by
       ``(seed, rank, iteration)`` (so resumed and distributed runs draw reproducible, rank-distinct rows);
    2. forward, warp and loss terms with :func:`~elastic_hypermorph_bundle.forward.training_terms` (through the
       trainer's ``inferer`` and under autocast if the trainer has ``amp``; ``FORWARD_COMPLETED`` fires between the
       forward pass and the loss);
    3. backward and optimizer step (through the trainer's ``GradScaler`` with AMP); without AMP a non-finite
       displacement field (checked on the CPU), loss or updated weights (one device sync per batch) raises
       :class:`TrainingDivergedError`, naming the iteration and what to try.

    With ``amortised`` (amortised optimisation, :mod:`~elastic_hypermorph_bundle.losses.amortised`), a batch whose
    pairs all have cached targets is, with the cache's probability, trained at one of its grid points (drawn per
    sample, replacing step 1's rows) with the term ``amortised(ddf, targets)`` added to the loss (and logged as
    ``"amortised"``); a masked term averages over the batch's ``"fixed_mask"`` ``(B, 1, *spatial)`` and refuses a
    batch without one.

    Returns (and stores in ``engine.state.output``): ``"image"`` (network input), ``"pred"`` (DDF), ``"hyper"``, and
    the scalars ``"loss"``, ``"similarity"`` (LNCC, unweighted) and ``"regularization"`` (weighted).

    Args:
        hyper_space: the hyperparameters the network is conditioned on.
        seed: base seed of the hyperparameter draws.
        amortised: the cached targets and their term (``None``: off).

    Raises:
        ValueError: ``amortised`` has grid points outside ``hyper_space``'s trained ranges, or the model is not
            conditioned on ``(lam, mu)``.
    """

    def __init__(self, hyper_space: HyperSpace, seed: int = 0, amortised: AmortisedTargets | None = None) -> None:
        self.hyper_space = hyper_space
        self.seed = int(seed)
        if amortised is not None:
            if tuple(hyper_space.names) != ("lam", "mu"):
                raise ValueError(f"amortised targets are (lam, mu) grid points; the {hyper_space.regularizer!r} "
                                 f"regularizer's rows are {list(hyper_space.names)}.")
            hyper_space.check(amortised.hyper)  # raises for a grid point outside the trained ranges
        self.amortised = amortised

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
        generator = self._generator(engine.state.iteration)
        hyper = self.hyper_space.sample(moving.shape[0], generator, device)
        drawn = None if self.amortised is None else self.amortised.draw(batchdata.get("pair_id"), generator, device)
        if drawn is not None:
            hyper, targets = drawn
        engine.state.output = {"hyper": hyper}

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = bool(engine.amp) and engine.scaler is not None

        def forward_completed(ddf: torch.Tensor) -> None:
            engine.state.output["pred"] = ddf
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            if not use_amp and ddf.device.type == "cpu" and not torch.isfinite(ddf).all():  # free on the CPU
                raise TrainingDivergedError(diverged_message(engine, "the predicted displacement field is not finite (NaN/inf)"))

        terms = training_terms(
            engine.network, engine.loss_function, moving, fixed, hyper, inferer=engine.inferer, amp=use_amp,
            amp_kwargs=engine.amp_kwargs, on_forward=forward_completed,
        )
        engine.state.output["image"] = terms.pop("image")
        ddf = terms.pop("pred")
        terms.pop("warped")
        if drawn is not None:
            mask = batchdata.get("fixed_mask") if self.amortised.masked else None
            if mask is not None:
                mask = convert_to_tensor(mask, track_meta=False).to(device, non_blocking=engine.non_blocking)
            terms["amortised"] = self.amortised(ddf.float(), targets, mask)
            terms["loss"] = terms["loss"] + terms["amortised"]
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
                    values = ", ".join(f"{key}={float(terms[key]):.4g}" for key in LOSS_TERMS if key in terms)
                    what = f"the training loss is not finite ({values})"
                raise TrainingDivergedError(diverged_message(engine, what))
        for key in LOSS_TERMS:
            if key in terms:
                engine.state.output[key] = terms[key].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # the trainer decollates on this event
        return engine.state.output


class TrainingDivergedError(FloatingPointError):
    """Training produced non-finite values (the optimisation diverged); the message says where and what to try."""


def diverged_message(engine: Engine, what: str) -> str:
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
    return {key: float(first[key]) for key in LOSS_TERMS if key in first}
