"""The regularizer table: every regularizer a model can be conditioned on, by name, with what a hyperparameter row
means. One row is read by the training loss (:class:`~.registration.RegistrationLoss`: the energy), the
hyperparameter space (:class:`~elastic_hypermorph_bundle.hyperparams.HyperSpace`: the columns), the test-time
optimisation (:class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`: the row's Lamé
parameters) and the sweep's figures (the columns), so a new regularizer is one more row here (plus its test).

Rows, per sample ``b`` with hyperparameter row ``h_b`` and field ``u_b`` (voxels)::

    "elastic"        h_b = [lam, mu]   R_b = R(u_b; lam, mu)                 (lam, mu) = (h_b0, h_b1)
    "diffusion"      h_b = [alpha]     R_b = alpha * mean |∇u_b|² / D        no Lamé parameters
    "elastic_fixed"  h_b = [alpha]     R_b = alpha * R(u_b; lam0, mu0)       (lam, mu) = alpha * (lam0, mu0)

``R`` is :func:`~.elastic.elastic_energy` (linear in ``(lam, mu)``, so ``alpha R(u; lam0, mu0) = R(u; alpha lam0,
alpha mu0)``: the test-time optimisation of an ``"elastic_fixed"`` model runs the elastic energy at those values);
the diffusion energy is MONAI's :class:`~monai.losses.DiffusionLoss` (central differences, averaged over channels
and voxels). ``(lam0, mu0)`` are the constants of a row that ``needs_constants`` (``fixed_lam``/``fixed_mu`` of
training, recorded on the model card).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from monai.losses import DiffusionLoss

from ..physics import LAI_FOOK, LameParameters
from .elastic import elastic_energy

__all__ = ["Regularizer", "REGULARIZERS", "FIXED_LAME", "get_regularizer"]

#: the fixed (lam, mu) of the ``"elastic_fixed"`` baseline when none are given: a tenth of Lai-Fook's lung tissue
#: values (:data:`~elastic_hypermorph_bundle.physics.LAI_FOOK`), the scale of the images' [0, 1] intensities
FIXED_LAME = LameParameters(lam=LAI_FOOK.lam * 0.1, mu=LAI_FOOK.mu * 0.1)

#: the energy of a row: ``(field (B, D, *spatial), hyper (B, H), spacing or None, constants or None) -> (B,)``
Energy = Callable[[torch.Tensor, torch.Tensor, "Sequence[float] | None", "LameParameters | None"], torch.Tensor]
#: the Lamé parameters of rows: ``(hyper (B, H), constants or None) -> (lam (B,), mu (B,))``
Lame = Callable[[torch.Tensor, "LameParameters | None"], "tuple[torch.Tensor, torch.Tensor]"]


class Regularizer(NamedTuple):
    """One row of the regularizer table.

    Attributes:
        names: the hyperparameter columns of a row ``h_b`` (``HyperSpace.names``).
        energy: the per-sample weighted energy ``(B,)`` (see :data:`Energy`).
        lame: the ``(lam, mu)`` of rows for the test-time optimisation's elastic energy, or ``None`` when the
            regularizer has none (the optimisation is then off).
        needs_constants: the energy uses the constants ``(lam0, mu0)`` (``fixed_lam``/``fixed_mu``).
        uses_spacing: the energy takes the voxel size (a physical energy), so ``spacing`` applies to it.
    """

    names: tuple[str, ...]
    energy: Energy
    lame: Lame | None
    needs_constants: bool = False
    uses_spacing: bool = True


_DIFFUSION = DiffusionLoss(reduction="none")


def _elastic(field, hyper, spacing, constants):
    return elastic_energy(field, hyper[:, 0], hyper[:, 1], spacing)


def _diffusion(field, hyper, spacing, constants):
    return hyper[:, 0] * _DIFFUSION(field).flatten(1).mean(1)


def _elastic_fixed(field, hyper, spacing, constants):
    return hyper[:, 0] * elastic_energy(field, constants.lam, constants.mu, spacing)


REGULARIZERS: dict[str, Regularizer] = {
    "elastic": Regularizer(("lam", "mu"), _elastic, lame=lambda hyper, constants: (hyper[:, 0], hyper[:, 1])),
    "diffusion": Regularizer(("alpha",), _diffusion, lame=None, uses_spacing=False),
    "elastic_fixed": Regularizer(
        ("alpha",), _elastic_fixed, lame=lambda hyper, constants: (hyper[:, 0] * constants.lam, hyper[:, 0] * constants.mu),
        needs_constants=True,
    ),
}


def get_regularizer(name: str) -> Regularizer:
    """The row of ``name``.

    Raises:
        ValueError: for a name not in :data:`REGULARIZERS`.
    """
    if name not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {tuple(REGULARIZERS)}, got {name!r}.")
    return REGULARIZERS[name]
