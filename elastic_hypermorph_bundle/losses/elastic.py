"""Linear elastic regularizer of a dense displacement field (Reithmeir et al., arXiv:2311.08239, eq. 2).

    R(u; lam, mu) = ∫ mu/4 Σ_{i,j} (∂_i u_j + ∂_j u_i)² + lam/2 (div u)² dx

``mu`` (shear modulus) penalises the symmetric part of the displacement gradient (shear and stretch), ``lam``
penalises volume change. Translations and infinitesimal rotations (skew-symmetric gradients) cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.utils import LossReduction

from ..networks.spatial import all_finite
from .reduction import ReducedLoss

__all__ = ["elastic_energy", "ElasticLoss", "NonFiniteFieldError"]


class NonFiniteFieldError(ValueError):
    """A displacement field holds NaN or inf values (e.g. from a network whose training diverged)."""


def _per_sample_weight(value: float | torch.Tensor, name: str, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a number, a 0-d tensor or a ``(B,)`` tensor) as a ``(B,)`` tensor on ``like``'s device/dtype."""
    weight = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if weight.ndim == 0:
        weight = weight.expand(batch)
    elif weight.shape != (batch,):
        raise ValueError(
            f"{name} must be a number or a tensor of shape (B,) = ({batch},), got shape {tuple(weight.shape)}."
        )
    # values are inspected on the host only: on a GPU each check would wait for the device (a sync per call)
    if weight.device.type == "cpu" and not torch.isfinite(weight).all():
        raise ValueError(f"{name} must be finite, got {value}.")
    if weight.device.type == "cpu" and (weight < 0).any():
        raise ValueError(f"{name} must be non-negative, got {value}.")
    return weight


def _cells(dims: int) -> tuple[tuple, list[tuple]]:
    """Index of the interior cells ``x`` (the first ``N_k - 1`` indices along every axis ``k``) of one channel
    ``(B, *spatial)`` of a field, and of ``x + e_i`` for each axis ``i``."""
    base = (slice(None),) + (slice(0, -1),) * dims
    return base, [base[: axis + 1] + (slice(1, None),) + base[axis + 2:] for axis in range(dims)]


def _strain(ddf: torch.Tensor, j: int, i: int, scale: Sequence[float] | None) -> torch.Tensor:
    """``g_ji = c_ji (u_j(x + e_i) - u_j(x))`` on the interior cells ``x`` (:func:`_cells`), a new
    ``(B, *(N_k - 1))`` tensor; ``c_ji = s_j / s_i`` for the voxel sizes ``scale`` (1 without)."""
    base, shifted = _cells(ddf.ndim - 2)
    channel = ddf[:, j]
    difference = channel[shifted[i]] - channel[base]
    return difference.mul_(scale[j] / scale[i]) if scale is not None and i != j else difference


def _sum_squares(value: torch.Tensor) -> torch.Tensor:
    flat = value.flatten(1)
    return torch.linalg.vecdot(flat, flat)


class _StrainMeans(torch.autograd.Function):
    """Per-sample means ``(B,)`` over the interior cells of ``Σ_ij (g_ij + g_ji)²`` (shear) and ``(Σ_i g_ii)²``
    (volume) for the strains ``g`` of :func:`_strain`, differentiable in the field. The backward pass is their
    closed-form gradient (``4 (g_ij + g_ji)`` and ``2 div u δ_ij`` per cell, over the cell count) passed through
    the adjoint of the differences (each value added at ``x + e_i`` and subtracted at ``x``), computed from the
    saved field a strain pair at a time: autograd through the stacked ``D²`` differences, their symmetrisation and
    squares kept a dozen field-sized tensors per call (288 MiB of a full-size training step's saved tensors) and
    made the energy 30 % of a finest-level optimisation step on a CPU; holding all ``D²`` strains at once in the
    backward pass instead raised a full-size training step's peak memory, which falls at the start of the backward
    pass."""

    @staticmethod
    def forward(ctx, ddf: torch.Tensor, scale: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(ddf)
        ctx.scale = scale
        dims = ddf.ndim - 2
        diagonal = [_strain(ddf, i, i, scale) for i in range(dims)]
        cells = diagonal[0][0].numel()
        shear = 4 * sum(_sum_squares(strain) for strain in diagonal)
        divergence = sum(diagonal)
        del diagonal
        for i in range(dims):
            for j in range(i + 1, dims):
                shear = shear + 2 * _sum_squares(_strain(ddf, j, i, scale).add_(_strain(ddf, i, j, scale)))
        return shear / cells, _sum_squares(divergence) / cells

    @staticmethod
    def backward(ctx, grad_shear: torch.Tensor, grad_volume: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ddf,) = ctx.saved_tensors
        scale = ctx.scale
        dims = ddf.ndim - 2
        base, shifted = _cells(dims)
        result = ddf.new_zeros(ddf.shape)

        def add_adjoint(j: int, i: int, weight: torch.Tensor) -> None:
            # the gradient ``weight`` with respect to the difference of u_j along axis i, through its adjoint
            channel = result[:, j]
            channel[shifted[i]] += weight
            channel[base] -= weight

        cells = math.prod(n - 1 for n in ddf.shape[2:])
        per_sample = (-1,) + (1,) * dims
        shear_weight = (grad_shear * (4 / cells)).reshape(per_sample)
        volume_weight = (grad_volume * (2 / cells)).reshape(per_sample)
        diagonal = [_strain(ddf, i, i, scale) for i in range(dims)]
        divergence = sum(diagonal)
        for i in range(dims):
            add_adjoint(i, i, diagonal[i].mul_(2 * shear_weight).addcmul_(divergence, volume_weight))
            diagonal[i] = None
        del divergence
        for i in range(dims):
            for j in range(i + 1, dims):
                symmetric = _strain(ddf, j, i, scale).add_(_strain(ddf, i, j, scale)).mul_(shear_weight)
                factor = 1.0 if scale is None else scale[j] / scale[i]
                add_adjoint(j, i, symmetric if factor == 1.0 else symmetric * factor)
                add_adjoint(i, j, symmetric if factor == 1.0 else symmetric.mul_(1.0 / factor))
        return result, None


def elastic_energy(
    ddf: torch.Tensor,
    lam: float | torch.Tensor,
    mu: float | torch.Tensor,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Per-sample linear elastic energy ``R(u; lam, mu)`` of a displacement field, shape ``(B,)``.

    Discretisation: the gradient ``∂_i u_j`` is the forward difference ``u_j(x + e_i) - u_j(x)``, evaluated on the
    interior cells where every forward difference exists (the first ``N_k - 1`` indices along each axis ``k``), and
    the integral is the mean over those cells (an energy density, independent of the grid size). Hence for every
    linear field ``u(x) = A x`` (``u_j = Σ_i A[j, i] x_i``) the value is exactly
    ``mu/4 Σ_{i,j} (A[i, j] + A[j, i])² + lam/2 (tr A)²`` whatever the grid size.

    With zero boundary values, integration by parts gives
    ``∫ mu/4 Σ (∂_i u_j + ∂_j u_i)² = mu/2 ∫ |∇u|² + mu/2 ∫ (div u)²``: the regularizer is the diffusion
    regularizer ``mu/2 |∇u|²`` plus a divergence penalty ``(lam + mu)/2 (div u)²``.

    Args:
        ddf: displacement field ``(B, D, *spatial)`` in voxels; channel ``j`` is the displacement along spatial axis
            ``j`` (tensor axis ``j + 2``) and is differentiated along that same axis in ``div u``.
        lam: first Lamé parameter, a non-negative number or a ``(B,)`` tensor (one value per sample).
        mu: shear modulus, a non-negative number or a ``(B,)`` tensor.
        spacing: voxel size per spatial axis (e.g. mm). When given, the gradient is that of the displacement in
            physical units with respect to physical position, ``∂_i u_j * s_j / s_i`` (dimensionless strain),
            while the integral stays a mean over cells. ``None`` means unit spacing (the gradient in voxels per voxel).

    Raises:
        ValueError: when ``ddf`` is not ``(B, D, *spatial)`` with ``D`` channels, a spatial size is below 2, ``ddf``
            is not finite, ``lam``/``mu`` are negative, not finite or not of shape ``(B,)``, or ``spacing`` does not
            hold ``D`` positive values.
    """
    dims = ddf.ndim - 2
    if dims < 1:
        raise ValueError(f"ddf must have shape (B, D, *spatial), got shape {tuple(ddf.shape)}.")
    if ddf.shape[1] != dims:
        raise ValueError(
            f"ddf must have one channel per spatial dimension ({dims}), got {ddf.shape[1]} channels "
            f"(shape {tuple(ddf.shape)})."
        )
    if min(ddf.shape[2:]) < 2:
        raise ValueError(
            f"every spatial size of ddf must be at least 2 for forward differences, got {tuple(ddf.shape[2:])}."
        )
    # on a GPU a check is a sync per call: the caller checks there
    if ddf.device.type == "cpu" and not all_finite(ddf):
        raise NonFiniteFieldError("ddf contains non-finite values (nan or inf).")
    if spacing is not None and (len(spacing) != dims or min(spacing) <= 0):
        raise ValueError(f"spacing must hold {dims} positive voxel sizes, got {spacing}.")
    batch = ddf.shape[0]
    lam = _per_sample_weight(lam, "lam", batch, ddf)
    mu = _per_sample_weight(mu, "mu", batch, ddf)

    # half precision (a network's field under autocast) is summed in float32: a sum of squares over a field's cells
    # overflows float16 long before the mean does
    reduced = ddf.dtype in (torch.float16, torch.bfloat16)
    shear, volume = _StrainMeans.apply(ddf.float() if reduced else ddf,
                                       None if spacing is None else tuple(float(s) for s in spacing))
    return mu / 4 * shear + lam / 2 * volume


class ElasticLoss(ReducedLoss):
    """Linear elastic regularization loss ``R(u; lam, mu)``, see :func:`elastic_energy` for formula and
    discretisation. ``lam`` and ``mu`` are given per call, as numbers or per-sample ``(B,)`` tensors, so that a
    hypernetwork can sample them per batch element.

    Args:
        spatial_dims: number of spatial dimensions ``D`` of the displacement field (1, 2 or 3).
        reduction: ``"none"`` returns the per-sample energies ``(B,)``; ``"mean"`` / ``"sum"`` reduce over the batch.
        spacing: voxel size per spatial axis (see :func:`elastic_energy`); ``None`` is unit spacing.

    Example::

        loss = ElasticLoss(spatial_dims=3)
        value = loss(ddf, lam=torch.tensor([0.08, 0.5]), mu=torch.tensor([0.03, 0.1]))
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        reduction: LossReduction | str = LossReduction.MEAN,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__(reduction)
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if spacing is not None and (len(spacing) != spatial_dims or min(spacing) <= 0):
            raise ValueError(f"spacing must hold {spatial_dims} positive voxel sizes, got {spacing}.")
        self.spatial_dims = spatial_dims
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)

    def forward(self, ddf: torch.Tensor, lam: float | torch.Tensor, mu: float | torch.Tensor) -> torch.Tensor:
        """
        Args:
            ddf: displacement field ``(B, spatial_dims, *spatial)`` in voxels.
            lam: first Lamé parameter, non-negative number or ``(B,)`` tensor.
            mu: shear modulus, non-negative number or ``(B,)`` tensor.

        Raises:
            ValueError: when ``ddf`` does not have ``spatial_dims`` spatial axes, and as :func:`elastic_energy`.
        """
        if ddf.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expecting ddf with {self.spatial_dims} spatial dimensions, got ddf of shape {tuple(ddf.shape)}."
            )
        return self.reduce(elastic_energy(ddf, lam, mu, self.spacing))
