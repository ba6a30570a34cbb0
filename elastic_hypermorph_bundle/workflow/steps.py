"""Registration of each pair at one hyperparameter row: the iteration of MONAI evaluators (validation,
evaluation, inference)."""

from __future__ import annotations

import time

import torch
from monai.data.utils import affine_to_spacing
from monai.engines.utils import IterationEvents

from ..data.transforms import PAIR_KEYS
from ..forward import network_input, plain, weighted_ddf
from ..networks import warp_label
from ..networks.grid import NetworkGrid
from .instance import InstanceOptimization

__all__ = ["RegisterStep"]


class RegisterStep:
    """``iteration_update`` of a :class:`monai.engines.SupervisedEvaluator`: register every pair of the batch with
    the network at one hyperparameter row.

    ``x = cat([moving_image, fixed_image], dim=1)``, ``ddf = network(x, weights=w)`` with
    ``w = network.generate_weights(hyper)``, generated on the first iteration of each evaluator run and reused for
    all batches of that run (the network only changes between runs, e.g. between validations during training).

    The engine output (decollated into one dict per pair by the evaluator) holds:

    * ``"pred"``: the DDF ``(B, D, *spatial)`` in voxels of the network grid (package conventions);
    * ``"warped_mask"``: the moving mask warped (nearest), when the batch has ``"moving_mask"``; the moving image
      is not warped here: what needs it warps it, the writer the file in HU (its one full warp; the preview's
      cuts, :func:`~elastic_hypermorph_bundle.networks.warp.warp_cuts`), the metrics the window for LNCC;
    * the batch's images, masks and points (keypoints/landmarks) on the network grid, and ``"pair_id"``;
    * ``"spacing"``: ``(B, D)`` voxel size of the network grid in mm (from the fixed image's affine);
    * ``"hyper"``: ``(B, H)`` the row used; ``"runtime"``: ``(B,)`` seconds of the network (and the mask's warp) per
      pair.

    With ``instance`` (:class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`), the pair is first
    pre-aligned (the network sees the pre-aligned moving image), and the network's field is then optimised for the
    pair at the same row's ``(lam, mu)``; ``"pred"`` is the total field (pre-alignment composed with the optimised
    one) and ``"runtime"`` counts all stages.

    Args:
        hyper: one hyperparameter row, ``(1, H)`` or ``(H,)`` (e.g. ``HyperSpace.point(lam, mu)``), checked against
            the model's trained range by the caller.
        instance: the test-time stages around the network; ``None`` (or all stages off) registers with the
            network alone.
        network_grid: the grid the network was trained on; a pair registered on another grid (e.g. the images'
            own, ``registration_grid="image"``) is brought onto it for the network and the field back.
        init: ``"network"`` (the network's prediction starts the optimisation) or ``"identity"`` (no model: the
            registration is the instance optimisation's alone, which then needs steps on some level, ``instance.optimizes``).
    """

    def __init__(
        self,
        hyper: torch.Tensor,
        instance: InstanceOptimization | None = None,
        network_grid: NetworkGrid | None = None,
        init: str = "network",
    ) -> None:
        hyper = torch.as_tensor(hyper, dtype=torch.float32)
        if hyper.ndim == 1:
            hyper = hyper.unsqueeze(0)
        if hyper.ndim != 2 or hyper.shape[0] != 1:
            raise ValueError(f"hyper must be one row of shape (1, H) or (H,), got shape {tuple(hyper.shape)}.")
        self.hyper = hyper
        self.instance = instance if instance is not None and instance.enabled else None
        self.network_grid = network_grid
        if init not in ("network", "identity"):
            raise ValueError(f"init must be 'network' or 'identity', got {init!r}.")
        if init == "identity" and instance is not None and not instance.has_elastic_parameters:
            raise ValueError(
                f"--init identity registers by the elastic instance optimisation alone, which the "
                f"{instance.regularizer} regularizer does not have: pass --regularizer elastic (or elastic_fixed)."
            )
        if init == "identity" and (self.instance is None or not self.instance.optimizes):
            raise ValueError("--init identity registers by instance optimisation alone: it needs --instance_steps > 0.")
        self.use_network = init == "network"
        self._weights: dict | None = None

    def __call__(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("RegisterStep needs a batch dict with 'fixed_image' and 'moving_image'.")
        missing = [key for key in ("fixed_image", "moving_image") if key not in batchdata]
        if missing:
            raise ValueError(f"batch is missing {missing}; the transforms must load the pair's images.")
        device = engine.state.device
        batch = {
            key: value.to(device, non_blocking=engine.non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in batchdata.items()
        }
        fixed, moving = batch["fixed_image"], batch["moving_image"]
        # unwrap DistributedDataParallel: weight generation is a method of the module itself
        network = getattr(engine.network, "module", engine.network)
        start = time.perf_counter()
        hyper = self.hyper.to(device)
        shape, spacing = tuple(fixed.shape[2:]), self._spacing(fixed)[0].tolist()
        grid = self.network_grid
        convert = grid is not None and not grid.matches(shape, spacing)

        def predict(network_moving: torch.Tensor) -> torch.Tensor:
            x = network_input(plain(network_moving).float(), plain(fixed).float())
            with engine.mode(engine.network), torch.autocast(
                device.type, enabled=bool(engine.amp) and device.type == "cuda", **engine.amp_kwargs
            ):
                if self._weights is None or engine.state.iteration == 1:
                    self._weights = network.generate_weights(hyper)
                ddf = weighted_ddf(network, grid.to_network(x, spacing) if convert else x, self._weights)
            return grid.from_network(ddf, shape, spacing) if convert else ddf

        if self.instance is None:
            ddf = plain(predict(moving)).float()
        else:
            # one spacing for the batch: inference and evaluation register one pair per batch
            mask, covered = self.instance.mask(batch)
            ddf = self.instance.register(
                predict if self.use_network else None, plain(fixed).float(), plain(moving).float(),
                hyper.expand(fixed.shape[0], -1), spacing, mask, covered=covered,
            )
        with torch.no_grad():
            warped_mask = warp_label(batch["moving_mask"], ddf) if "moving_mask" in batch else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runtime = (time.perf_counter() - start) / fixed.shape[0]

        output = {key: batch[key] for key in PAIR_KEYS if key in batch}
        output["pred"] = ddf
        if warped_mask is not None:
            output["warped_mask"] = warped_mask
        if "pair_id" in batch:
            output["pair_id"] = batch["pair_id"]
        output["spacing"] = self._spacing(fixed)
        output["hyper"] = self.hyper.to(device).expand(fixed.shape[0], -1)
        output["runtime"] = torch.full((fixed.shape[0],), runtime)
        if self.instance is not None and self.instance.record:  # the stages' decisions, for the run's record
            output["stages"] = {key: value.detach().cpu() for key, value in self.instance.record.items()}
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # the evaluator decollates on this event
        return engine.state.output

    @staticmethod
    def _spacing(image: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` voxel sizes from a batched MetaTensor's affines (ones for a plain tensor)."""
        batch, dims = image.shape[0], image.ndim - 2
        affine = getattr(image, "affine", None)
        if affine is None:
            return torch.ones(batch, dims)
        affine = torch.as_tensor(affine, dtype=torch.float64).reshape(-1, dims + 1, dims + 1).expand(batch, -1, -1)
        return torch.stack([torch.as_tensor(affine_to_spacing(a, r=dims)) for a in affine]).float()

