"""Unsupervised registration loss: a similarity (local NCC by default) plus a hyperparameter-weighted regularizer,
per sample."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.utils import LossReduction

from ..physics import LameParameters
from .reduction import ReducedLoss
from .regularizers import FIXED_LAME, REGULARIZERS, get_regularizer
from .similarity import LNCC_WINDOW, get_similarity

__all__ = ["RegistrationLoss", "REGULARIZERS", "training_loss", "FIXED_LAME"]

WEIGHTINGS = ("paper", "hypermorph")
REGULARIZED_FIELDS = ("displacement", "velocity")


class RegistrationLoss(ReducedLoss):
    """Similarity of the warped moving image to the fixed image plus a regularizer of the deformation, with every
    weight taken per sample from its row of ``hyper`` (Reithmeir et al., arXiv:2311.08239; HyperMorph, Hoopes et al.,
    IPMI 2021).

    Per sample ``b`` with hyperparameter row ``h_b``::

        sim_b = S(warped_b, fixed_b)         similarity="lncc": MONAI LocalNormalizedCrossCorrelationLoss, window
                                             kernel_size^D, averaged over channels and voxels (in [-1, 0], lower is
                                             better); another row of the similarity table (:mod:`.similarity`)
                                             compares its prepared images the same way
        reg_b = R(u_b; lam_b, mu_b)          regularizer="elastic",       h_b = [lam, mu]
              = alpha_b * mean |∇u_b|² / D   regularizer="diffusion",     h_b = [alpha]
              = alpha_b * R(u_b; lam0, mu0)  regularizer="elastic_fixed", h_b = [alpha], (lam0, mu0) = fixed_lam/mu
                                             (any row of the regularizer table, :mod:`.regularizers`)
        loss_b = sim_b + reg_b               weighting="paper" (eq. 3 of the paper; the weight is absorbed in h)
               = (1 - Σ h_b) sim_b + reg_b   weighting="hypermorph" (as in the HyperMorph code)

    ``R`` is :func:`~elastic_hypermorph_bundle.losses.elastic.elastic_energy`. The batch result is the mean (or sum)
    of the ``loss_b``, so a batch with different hyperparameters per sample equals the mean of single-sample losses.

    Args:
        regularizer: a name of the regularizer table :data:`~.regularizers.REGULARIZERS` (``"elastic"``,
            ``"diffusion"`` or ``"elastic_fixed"``).
        weighting: ``"paper"`` or ``"hypermorph"``. The latter needs ``Σ h_b <= 1``, otherwise the similarity weight
            would be negative.
        spatial_dims: number of spatial dimensions ``D``.
        kernel_size: local NCC window size per axis (9 in the paper).
        regularize: ``"displacement"`` regularizes the final displacement ``u`` (the elastic model describes the
            displacement of tissue, so this is the physically meaningful choice); ``"velocity"`` regularizes the
            stationary velocity field of a diffeomorphic network instead (as VoxelMorph/HyperMorph do).
        fixed_lam: Lamé ``lam`` of a regularizer with constants (``"elastic_fixed"``; e.g.
            ``physics.BROCK.lam * 0.01``).
        fixed_mu: shear modulus ``mu`` of that regularizer.
        spacing: voxel size per axis for the elastic regularizers (see ``elastic_energy``); ``None`` is unit spacing.
        reduction: ``"none"`` returns ``(B,)`` per-sample values; ``"mean"`` / ``"sum"`` reduce over the batch.
        similarity: a name of the similarity table :data:`~.similarity.SIMILARITIES` (``"lncc"``, the paper's, or
            ``"mind"``).
    """

    def __init__(
        self,
        regularizer: str = "elastic",
        weighting: str = "paper",
        spatial_dims: int = 3,
        kernel_size: int = LNCC_WINDOW,
        regularize: str = "displacement",
        fixed_lam: float | None = None,
        fixed_mu: float | None = None,
        spacing: Sequence[float] | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        similarity: str = "lncc",
    ) -> None:
        super().__init__(reduction)
        row = get_regularizer(regularizer)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
        if regularize not in REGULARIZED_FIELDS:
            raise ValueError(f"regularize must be one of {REGULARIZED_FIELDS}, got {regularize!r}.")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        self._similarity = get_similarity(similarity, spatial_dims)
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size (the local window) must be a positive odd integer, got {kernel_size}.")
        if row.needs_constants:
            for name, value in (("fixed_lam", fixed_lam), ("fixed_mu", fixed_mu)):
                if value is None or not math.isfinite(value) or value < 0:
                    raise ValueError(f"regularizer={regularizer!r} needs a finite {name} >= 0, got {value}.")
        elif fixed_lam is not None or fixed_mu is not None:
            needing = [name for name, other in REGULARIZERS.items() if other.needs_constants]
            raise ValueError(f"fixed_lam and fixed_mu apply to regularizer={needing} only, not {regularizer!r}.")
        if not row.uses_spacing and spacing is not None:
            raise ValueError(f"spacing applies to the elastic regularizers only, not to regularizer={regularizer!r}.")
        if spacing is not None and (len(spacing) != spatial_dims or min(spacing) <= 0):
            raise ValueError(f"spacing must hold {spatial_dims} positive voxel sizes, got {spacing}.")
        self.regularizer = regularizer
        self._regularizer = row
        self.weighting = weighting
        self.spatial_dims = spatial_dims
        self.regularize = regularize
        self.fixed_lam = fixed_lam
        self.fixed_mu = fixed_mu
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.similarity = similarity
        self.kernel_size = int(kernel_size)
        self._constants = LameParameters(fixed_lam, fixed_mu) if row.needs_constants else None

    @property
    def hyper_dims(self) -> int:
        """Number of hyperparameter columns: 2 (``[lam, mu]``) for ``"elastic"``, 1 (``[alpha]``) for the
        baselines (the row's ``names``)."""
        return len(self._regularizer.names)

    def _check_hyper(self, hyper: torch.Tensor, batch: int) -> torch.Tensor:
        columns = "[" + ", ".join(self._regularizer.names) + "]"
        if hyper.ndim != 2 or hyper.shape[1] != self.hyper_dims or hyper.shape[0] not in (1, batch):
            raise ValueError(
                f"hyper must have shape (B, {self.hyper_dims}) with columns {columns} for regularizer="
                f"{self.regularizer!r} and B = 1 or the batch size {batch}, got shape {tuple(hyper.shape)}."
            )
        # values are inspected on the host only: on a GPU each check would wait for the device (a sync per call)
        on_host = hyper.device.type == "cpu"
        if on_host and (not torch.isfinite(hyper).all() or (hyper < 0).any()):
            raise ValueError("hyper must be finite and non-negative.")
        if on_host and self.weighting == "hypermorph" and (hyper.sum(1) > 1).any():
            raise ValueError(
                'weighting="hypermorph" weights the similarity by 1 - sum(hyper row), which needs every row sum '
                f"<= 1, got row sums {hyper.sum(1).tolist()}."
            )
        return hyper.expand(batch, -1)

    def _regularization(self, field: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted regularizer, shape ``(B,)``."""
        return self._regularizer.energy(field, hyper, self.spacing, self._constants)

    def similarity_map(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The per-voxel similarity ``(B, 1, *spatial)`` of the warped moving image to the fixed one (lower is
        better), as the loss's ``sim_b`` averages it."""
        row = self._similarity
        return row.compare(row.prepare(warped), row.prepare(fixed), self.kernel_size)

    def forward(
        self,
        warped: torch.Tensor,
        fixed: torch.Tensor,
        ddf: torch.Tensor,
        hyper: torch.Tensor,
        velocity: torch.Tensor | None = None,
        return_components: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """
        Args:
            warped: moving image warped by ``ddf``, ``(B, C, *spatial)``.
            fixed: fixed image, same shape as ``warped``.
            ddf: displacement field ``(B, D, *spatial)`` in voxels.
            hyper: ``(B, H)`` hyperparameters (``[lam, mu]`` or ``[alpha]``); a single row ``(1, H)`` is shared by
                the whole batch.
            velocity: stationary velocity field ``(B, D, *spatial')``, required when ``regularize="velocity"``.
            return_components: also return the parts, as ``dict(loss=, similarity=, regularization=)``, each reduced
                like the loss; ``similarity`` is the unweighted ``sim_b``, ``regularization`` the weighted ``reg_b``.

        Raises:
            ValueError: when ``hyper`` does not match the regularizer or the batch, a velocity is needed but missing,
                the batch sizes of the inputs differ, and as MONAI's losses and ``elastic_energy``.
        """
        batch = ddf.shape[0]
        if warped.shape[0] != batch or fixed.shape[0] != batch:
            raise ValueError(
                f"warped, fixed and ddf must share the batch size, got {warped.shape[0]}, {fixed.shape[0]}, {batch}."
            )
        if self.regularize == "velocity":
            if velocity is None:
                raise ValueError('regularize="velocity" needs the velocity field, got velocity=None.')
            if velocity.shape[0] != batch:
                raise ValueError(f"velocity must have batch size {batch}, got shape {tuple(velocity.shape)}.")
        hyper = self._check_hyper(hyper, batch)
        field = velocity if self.regularize == "velocity" else ddf
        if field.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expecting a {self.regularize} field with {self.spatial_dims} spatial dimensions, "
                f"got shape {tuple(field.shape)}."
            )

        similarity = self.similarity_map(warped, fixed).flatten(1).mean(1)
        regularization = self._regularization(field, hyper.to(field))
        similarity_weight = 1 - hyper.sum(1).to(similarity) if self.weighting == "hypermorph" else 1.0
        loss = similarity_weight * similarity + regularization
        if not return_components:
            return self.reduce(loss)
        return {
            "loss": self.reduce(loss),
            "similarity": self.reduce(similarity),
            "regularization": self.reduce(regularization),
        }


def training_loss(
    regularizer: str = "elastic",
    fixed_lam: float | None = None,
    fixed_mu: float | None = None,
    **kwargs,
) -> RegistrationLoss:
    """The :class:`RegistrationLoss` of ``configs/train.json``: for a regularizer with constants
    (``"elastic_fixed"``) the fixed Lamé parameters default to :data:`FIXED_LAME`; for the other regularizers they
    must stay unset (as the loss requires). ``kwargs`` go to :class:`RegistrationLoss` (``weighting``,
    ``kernel_size``, ``similarity``, ...)."""
    if get_regularizer(regularizer).needs_constants:
        fixed_lam = FIXED_LAME.lam if fixed_lam is None else float(fixed_lam)
        fixed_mu = FIXED_LAME.mu if fixed_mu is None else float(fixed_mu)
    return RegistrationLoss(regularizer, fixed_lam=fixed_lam, fixed_mu=fixed_mu, **kwargs)
