"""Registration metrics: Jacobian determinant, folding, SDlogJ, Dice, keypoint sampling and TRE.

Pure tensor functions (no state, no hard-coded device) following the package conventions of
:mod:`elastic_hypermorph_bundle`: DDFs ``(B, D, *spatial)`` in voxels, channel ``j`` along spatial axis ``j``,
backward mapping ``x -> x + u(x)``; points ``(N, D)`` 0-based voxel coordinates in array order.

Jacobian-based metrics mirror the Learn2Reg evaluation (``MDL-UzL/L2R``, ``evaluation/utils.py``): derivatives
by the central-difference stencil ``[-1/2, 0, 1/2]`` and a border of :data:`JACOBIAN_BORDER` voxels removed on
every side of every spatial axis, so that only voxels whose stencil lies fully inside the field are scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.metrics import compute_dice

from .forward import plain
from .losses.elastic import elastic_energy
from .networks.warp import warp_image, warp_label

__all__ = [
    "JACOBIAN_BORDER",
    "jacobian_determinant",
    "folding_percent",
    "sd_log_jacobian",
    "dice_per_label",
    "sample_field_at_points",
    "warp_points",
    "target_registration_error",
    "POINT_KINDS",
    "LNCC_KERNEL",
    "pair_metrics",
    "metric_columns",
]

JACOBIAN_BORDER = 2
"""Voxels cropped from each side of each spatial axis by the Jacobian metrics (as in the Learn2Reg evaluation)."""

_LOG_JACOBIAN_CLIP = (1e-9, 1e9)


def _check_batched_ddf(ddf: torch.Tensor) -> int:
    """Validate a ``(B, D, *spatial)`` DDF with ``D`` = number of spatial axes (2 or 3); return ``D``."""
    if ddf.ndim not in (4, 5) or ddf.shape[1] != ddf.ndim - 2:
        raise ValueError(
            f"ddf must have shape (B, D, *spatial) with D = number of spatial axes (2 or 3), got {tuple(ddf.shape)}."
        )
    return ddf.ndim - 2


def _check_single_ddf(ddf: torch.Tensor) -> int:
    """Validate a single-sample ``(D, *spatial)`` DDF (D = 2 or 3, every axis >= 2 voxels); return ``D``."""
    if ddf.ndim not in (3, 4) or ddf.shape[0] != ddf.ndim - 1:
        raise ValueError(
            "ddf must be a single sample of shape (D, *spatial) with D = number of spatial axes (2 or 3), "
            f"got {tuple(ddf.shape)}; pass ddf[b] for a batched field."
        )
    if min(ddf.shape[1:]) < 2:
        raise ValueError(f"every spatial axis of ddf needs at least 2 voxels to interpolate, got {tuple(ddf.shape)}.")
    return ddf.ndim - 1


def _as_points(points, ddf: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``points`` as an ``(N, D)`` tensor on ``ddf``'s device and dtype."""
    points = torch.as_tensor(points, dtype=ddf.dtype, device=ddf.device)
    dims = ddf.ndim - 1
    if points.ndim != 2 or points.shape[1] != dims:
        raise ValueError(f"{name} must have shape (N, {dims}) for a {dims}D field, got {tuple(points.shape)}.")
    return points


def _interior_central_difference(field: torch.Tensor, axis: int) -> torch.Tensor:
    """``(f[x + e_axis] - f[x - e_axis]) / 2`` of a ``(B, C, *spatial)`` field on the Jacobian interior grid."""
    spatial = field.shape[2:]
    interior = [slice(JACOBIAN_BORDER, size - JACOBIAN_BORDER) for size in spatial]
    ahead, behind = list(interior), list(interior)
    ahead[axis] = slice(JACOBIAN_BORDER + 1, spatial[axis] - JACOBIAN_BORDER + 1)
    behind[axis] = slice(JACOBIAN_BORDER - 1, spatial[axis] - JACOBIAN_BORDER - 1)
    return (field[(..., *ahead)] - field[(..., *behind)]) / 2


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of the transformation ``x -> x + u(x)``: ``J = det(I + grad u)``.

    ``d u_i / d x_j`` is the central difference ``(u_i[x + e_j] - u_i[x - e_j]) / 2`` (the Learn2Reg stencil),
    evaluated on the interior only: :data:`JACOBIAN_BORDER` = 2 voxels are cropped on each side of every spatial
    axis, exactly like ``jacobian[..., 2:-2, 2:-2, 2:-2]`` in the Learn2Reg evaluation, whose zero-padded
    correlation is wrong only on the outermost voxel. Because ``u`` and ``x`` are both in voxels, ``J`` is
    dimensionless and independent of the (possibly anisotropic) voxel spacing:
    ``det(S (I + G) S^-1) = det(I + G)`` for ``S = diag(spacing)``, so no spacing argument is needed.

    Args:
        ddf: displacement field ``(B, D, *spatial)`` in voxels, ``D`` = 2 or 3, every spatial size >= 5.

    Returns:
        ``(B, *(s - 4 for s in spatial))`` determinant map on the interior grid, same dtype/device as ``ddf``.
        ``J <= 0`` marks folding; ``J = 1`` is volume preserving.
    """
    dims = _check_batched_ddf(ddf)
    spatial = ddf.shape[2:]
    if min(spatial) < 2 * JACOBIAN_BORDER + 1:
        raise ValueError(
            f"every spatial axis of ddf needs at least {2 * JACOBIAN_BORDER + 1} voxels to leave an interior after "
            f"cropping {JACOBIAN_BORDER} border voxels, got spatial shape {tuple(spatial)}."
        )
    gradients = [_interior_central_difference(ddf, axis) for axis in range(dims)]  # [j][:, i] = d u_i / d x_j
    # jac[i][j] = delta_ij + d u_i / d x_j, each (B, *interior)
    jac = [[gradients[j][:, i] + float(i == j) for j in range(dims)] for i in range(dims)]
    # explicit cofactor expansion: an order of magnitude faster than batched torch.linalg.det on 3x3 blocks
    if dims == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


def _crop_mask(mask: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Validate a ``(B or 1, 1, *spatial)`` mask for ``ddf`` and crop it to the Jacobian interior (boolean)."""
    batch, dims, spatial = ddf.shape[0], ddf.ndim - 2, tuple(ddf.shape[2:])
    matches = mask.ndim == ddf.ndim and mask.shape[1] == 1 and tuple(mask.shape[2:]) == spatial
    if not matches or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"mask must have shape ({batch} or 1, 1, *{spatial}) to match ddf {tuple(ddf.shape)}, "
            f"got {tuple(mask.shape)}."
        )
    interior = (slice(None), 0) + (slice(JACOBIAN_BORDER, -JACOBIAN_BORDER),) * dims
    return mask[interior].to(device=ddf.device, dtype=torch.bool).expand(batch, *([-1] * dims))


def folding_percent(ddf: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Percentage of folded voxels, ``100 * #{J <= 0} / #{scored voxels}``, per sample.

    ``J`` is :func:`jacobian_determinant` (interior only). With a mask, only interior voxels where the mask is
    nonzero are scored.

    Args:
        ddf: displacement field ``(B, D, *spatial)`` in voxels.
        mask: optional ``(B, 1, *spatial)`` or ``(1, 1, *spatial)`` region of interest on the full (uncropped)
            fixed-image grid; it is cropped like ``J``.

    Returns:
        ``(B,)`` percentages in ``[0, 100]``; NaN for a sample whose (cropped) mask is empty.
    """
    folded = jacobian_determinant(ddf) <= 0
    reduce_dims = tuple(range(1, folded.ndim))
    if mask is None:
        return 100.0 * folded.to(ddf.dtype).mean(dim=reduce_dims)
    region = _crop_mask(mask, ddf)
    return 100.0 * (folded & region).sum(dim=reduce_dims).to(ddf.dtype) / region.sum(dim=reduce_dims).to(ddf.dtype)


def sd_log_jacobian(ddf: torch.Tensor, mask: torch.Tensor | None = None, offset: float = 0.0) -> torch.Tensor:
    """Standard deviation of the log Jacobian determinant (SDlogJ, Learn2Reg), per sample.

    ``SDlogJ = std(log(clip(J + offset, 1e-9, 1e9)))`` over the interior voxels of :func:`jacobian_determinant`
    (population std, as ``numpy.std``). Clipping keeps folded voxels finite (they contribute ``log(1e-9)``).
    A smooth transform scores near 0; any affine map (constant ``J``) scores exactly 0.

    The official Learn2Reg script (``evaluation/evaluation.py``) computes ``log(clip(J + 3, ...))``, an
    unexplained shift (MDL-UzL/L2R issue #7) that shrinks the value roughly fourfold near ``J = 1``; pass
    ``offset=3.0`` to reproduce its numbers. The default ``0.0`` is the metric as defined in the Learn2Reg paper.

    Args:
        ddf: displacement field ``(B, D, *spatial)`` in voxels.
        mask: optional ``(B or 1, 1, *spatial)`` region on the full grid (cropped like ``J``), as in the Learn2Reg
            "masked_evaluation" (lung mask of the fixed image).
        offset: constant added to ``J`` before clipping (see above).

    Returns:
        ``(B,)`` SDlogJ; NaN for a sample whose (cropped) mask is empty.
    """
    log_jacobian = torch.log((jacobian_determinant(ddf) + offset).clamp(*_LOG_JACOBIAN_CLIP))
    reduce_dims = tuple(range(1, log_jacobian.ndim))
    if mask is None:
        return log_jacobian.std(dim=reduce_dims, correction=0)
    region = _crop_mask(mask, ddf).to(ddf.dtype)
    count = region.sum(dim=reduce_dims)
    mean = (log_jacobian * region).sum(dim=reduce_dims) / count
    centred = (log_jacobian - mean.view(-1, *([1] * (log_jacobian.ndim - 1)))) * region
    return torch.sqrt((centred**2).sum(dim=reduce_dims) / count)


def dice_per_label(
    pred: torch.Tensor, target: torch.Tensor, labels: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Dice overlap ``2 |P_l & T_l| / (|P_l| + |T_l|)`` of integer label maps, per sample and label.

    Computed with :func:`monai.metrics.compute_dice` on the binary maps ``pred == l`` and ``target == l``.
    A label absent from both ``pred`` and ``target`` of a sample scores 1.0 (perfect agreement on "nothing");
    absent from exactly one of them it scores 0.0. (The Learn2Reg script instead reports NaN when a label is
    missing from the fixed or moving segmentation.)

    Args:
        pred: ``(B, 1, *spatial)`` integer labels, e.g. the moving segmentation warped with nearest neighbour.
        target: ``(B, 1, *spatial)`` integer labels of the fixed image.
        labels: label values to score; default: every nonzero value present anywhere in ``target``.

    Returns:
        ``(B, L)`` Dice in ``[0, 1]`` (float32), columns in the order of ``labels`` (sorted for the default).
        Average over ``dim=1`` for a mean Dice per sample.
    """
    if pred.shape != target.shape or pred.ndim < 3 or pred.shape[1] != 1:
        raise ValueError(
            f"pred and target must be label maps of the same shape (B, 1, *spatial), got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}."
        )
    if pred.is_floating_point() and not torch.equal(pred, pred.round()):
        raise ValueError("pred must hold integer label values; warp label maps with nearest-neighbour sampling.")
    if labels is None:
        labels = target.unique()
        labels = labels[labels != 0]
    labels = torch.as_tensor(labels, device=target.device)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1D sequence of label values, got {labels.tolist()}.")
    label_axis = labels.to(target.dtype).view(1, -1, *([1] * (target.ndim - 2)))
    return compute_dice(
        (pred.to(target.dtype) == label_axis).float(),
        (target == label_axis).float(),
        include_background=True,
        ignore_empty=False,
    )


def sample_field_at_points(ddf: torch.Tensor, points) -> torch.Tensor:
    """Linearly interpolate a single-sample field at voxel points (bilinear in 2D, trilinear in 3D).

    Uses :func:`torch.nn.functional.grid_sample` with ``align_corners=True``, where the normalised coordinate of
    voxel index ``p`` on an axis of size ``s`` is ``2 p / (s - 1) - 1``; the grid's last dimension lists the axes
    in reverse tensor order (W first), so the point coordinates are flipped. Points outside the grid are clamped
    to the border (``padding_mode="border"``: the field's value at the nearest grid point along each axis).
    The Learn2Reg script samples with ``scipy.ndimage.map_coordinates`` (cubic spline, zero outside);
    linear interpolation differs from it by a sub-voxel amount on smooth fields.

    Args:
        ddf: ``(D, *spatial)`` field (one sample; pass ``ddf[b]`` for a batch), ``D`` = 2 or 3.
        points: ``(N, D)`` 0-based voxel coordinates in array order (tensor or array-like).

    Returns:
        ``(N, D)`` field values at the points, on ``ddf``'s device and dtype.
    """
    dims = _check_single_ddf(ddf)
    points = _as_points(points, ddf, "points")
    sizes = torch.tensor(ddf.shape[1:], dtype=ddf.dtype, device=ddf.device)
    grid = (2.0 * points / (sizes - 1) - 1.0).flip(-1).view(1, *([1] * (dims - 1)), -1, dims)
    sampled = F.grid_sample(ddf.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return sampled.reshape(dims, -1).T


def warp_points(ddf: torch.Tensor, fixed_points) -> torch.Tensor:
    """Map fixed-image points into the moving image: ``p + u(p)`` with ``u`` from :func:`sample_field_at_points`.

    Args:
        ddf: ``(D, *spatial)`` single-sample displacement field in voxels.
        fixed_points: ``(N, D)`` voxel coordinates in the fixed image.

    Returns:
        ``(N, D)`` corresponding voxel coordinates in the moving image.
    """
    fixed_points = _as_points(fixed_points, ddf, "fixed_points")
    return fixed_points + sample_field_at_points(ddf, fixed_points)


def target_registration_error(ddf: torch.Tensor, fixed_points, moving_points, spacing) -> torch.Tensor:
    """Target registration error per point (Learn2Reg convention), in mm.

    ``TRE_n = || (p_fixed_n + u(p_fixed_n) - p_moving_n) * spacing ||_2``, with ``u`` linearly interpolated
    (:func:`warp_points`) and ``spacing`` the voxel size of the moving image (Learn2Reg scales by the moving
    spacing; fixed and moving share it in the Learn2Reg lung tasks). Average over points for the case TRE.

    Args:
        ddf: ``(D, *spatial)`` single-sample displacement field in voxels.
        fixed_points: ``(N, D)`` voxel coordinates in the fixed image.
        moving_points: ``(N, D)`` corresponding voxel coordinates in the moving image.
        spacing: ``D`` voxel sizes in mm (sequence or tensor), in array order.

    Returns:
        ``(N,)`` distances in mm.
    """
    warped = warp_points(ddf, fixed_points)
    moving_points = _as_points(moving_points, ddf, "moving_points")
    if moving_points.shape != warped.shape:
        raise ValueError(
            f"fixed_points and moving_points must pair up, got {tuple(warped.shape)} and {tuple(moving_points.shape)}."
        )
    spacing = torch.as_tensor(spacing, dtype=ddf.dtype, device=ddf.device)
    if spacing.shape != (warped.shape[1],):
        raise ValueError(f"spacing must hold {warped.shape[1]} voxel sizes, got shape {tuple(spacing.shape)}.")
    return torch.linalg.vector_norm((warped - moving_points) * spacing, dim=1)


# ---------------------------------------------------------------------- one registered pair

#: point kinds scored by TRE, in order of preference (manual landmarks over automatic keypoints)
POINT_KINDS = ("landmarks", "keypoints")
#: kernel of the local NCC similarity (as the training loss, :class:`~.losses.RegistrationLoss`)
LNCC_KERNEL = 9


@lru_cache(maxsize=4)
def _lncc(spatial_dims: int) -> LocalNormalizedCrossCorrelationLoss:
    return LocalNormalizedCrossCorrelationLoss(spatial_dims, kernel_size=LNCC_KERNEL)


def pair_metrics(
    ddf: torch.Tensor,
    *,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    warped_mask: torch.Tensor | None = None,
    labels: Sequence[int] | None = None,
    fixed_points=None,
    moving_points=None,
    spacing: Sequence[float] | None = None,
    fixed_image: torch.Tensor | None = None,
    moving_image: torch.Tensor | None = None,
    warped_image: torch.Tensor | None = None,
    hyper: Mapping[str, float] | None = None,
    masked: bool = True,
    before: bool = False,
) -> dict[str, float]:
    """Every metric of one registered pair, under the bundle's one vocabulary of names (evaluation CSV/JSON,
    sweep CSV, benchmark); a metric whose inputs are not given is left out.

    * ``dice_mean`` and ``dice_<l>``: Dice (:func:`dice_per_label`) of the moving mask warped with nearest
      neighbour (or ``warped_mask``) against the fixed mask, per label ``l`` in ``labels`` (default: the nonzero
      labels of the fixed mask) and their mean; ``dice_before``: the mean Dice of the unregistered masks;
    * ``tre_mm``: mean TRE in mm (:func:`target_registration_error`, ``spacing`` of the network grid) of the
      points; ``tre_before_mm``: the same for ``u = 0``;
    * ``folding_percent`` (% of ``J <= 0``) and ``sd_log_jacobian``: inside the fixed mask when ``masked`` and a
      fixed mask is given (Learn2Reg "masked_evaluation"), else over the whole field;
    * ``energy_shear = R(u; 0, 1)`` and ``energy_volume = R(u; 1, 0)`` (:func:`~.losses.elastic_energy`, voxel
      units): ``R`` is linear in ``(lam, mu)``, so ``lam * energy_volume + mu * energy_shear`` is the energy for
      any material; ``elastic_energy``: that at ``hyper``'s ``(lam, mu)`` (NaN when ``hyper`` has no lam, mu);
    * ``lncc``: local normalised cross-correlation (window 9^D, as the training loss) of the warped moving image
      (``warped_image``, or ``moving_image`` warped) and the fixed image; higher is better.

    Args:
        ddf: ``(1, D, *spatial)`` or ``(D, *spatial)`` displacement in voxels (package conventions).
        fixed_mask, moving_mask, warped_mask: label maps ``(1, 1, *spatial)`` or ``(1, *spatial)``.
        fixed_points, moving_points: ``(N, D)`` voxel coordinates of corresponding points.
        spacing: ``D`` voxel sizes in mm (needed with points).
        fixed_image, moving_image, warped_image: images ``(1, 1, *spatial)`` or ``(1, *spatial)``.
        hyper: the hyperparameters of the registration by name (``{"lam": .., "mu": ..}`` or ``{"alpha": ..}``).
        before: also report ``dice_before`` and ``tre_before_mm``.

    Returns:
        ``{name: float}`` in the order of :func:`metric_columns`.
    """
    ddf = torch.as_tensor(ddf)
    ddf = plain(ddf).float()
    if ddf.ndim == ddf.shape[-ddf.ndim] + 1:  # (D, *spatial): one sample without its batch axis
        ddf = ddf.unsqueeze(0)
    dims = _check_batched_ddf(ddf)
    if ddf.shape[0] != 1:
        raise ValueError(f"pair_metrics scores one pair: ddf must be (1, {dims}, *spatial), got {tuple(ddf.shape)}.")

    def volume(value, name):
        if value is None:
            return None
        value = torch.as_tensor(value)
        value = plain(value).to(ddf.device)
        value = value if value.ndim == dims + 2 else value.unsqueeze(0)
        if value.shape[2:] != ddf.shape[2:]:
            raise ValueError(f"{name} must be on the field's grid {tuple(ddf.shape[2:])}, got {tuple(value.shape)}.")
        return value

    fixed_mask, moving_mask, warped_mask = (volume(v, n) for v, n in (
        (fixed_mask, "fixed_mask"), (moving_mask, "moving_mask"), (warped_mask, "warped_mask")))
    fixed_image, moving_image, warped_image = (volume(v, n) for v, n in (
        (fixed_image, "fixed_image"), (moving_image, "moving_image"), (warped_image, "warped_image")))
    row: dict[str, float] = {}
    if fixed_mask is not None and (moving_mask is not None or warped_mask is not None):
        target = fixed_mask.round()
        if labels is None:
            labels = [int(v) for v in target.unique().tolist() if v != 0]
        if warped_mask is None:
            warped_mask = warp_label(moving_mask.round(), ddf)
        dice = dice_per_label(warped_mask.float().round(), target, labels)[0]
        row["dice_mean"] = float(dice.mean())
        row.update({f"dice_{int(label)}": float(value) for label, value in zip(labels, dice)})
        if before and moving_mask is not None:
            row["dice_before"] = float(dice_per_label(moving_mask.round(), target, labels)[0].mean())
    if fixed_points is not None and moving_points is not None:
        if spacing is None:
            raise ValueError("TRE needs the voxel spacing (mm) of the grid the points are on.")
        row["tre_mm"] = float(target_registration_error(ddf[0], fixed_points, moving_points, spacing).mean())
        if before:
            zero = torch.zeros_like(ddf[0])
            row["tre_before_mm"] = float(target_registration_error(zero, fixed_points, moving_points, spacing).mean())
    region = fixed_mask.round() if masked and fixed_mask is not None else None
    row["folding_percent"] = float(folding_percent(ddf, region)[0])
    row["sd_log_jacobian"] = float(sd_log_jacobian(ddf, region)[0])
    hyper = dict(hyper or {})
    lame = {"lam", "mu"} <= set(hyper)
    row["elastic_energy"] = float(elastic_energy(ddf, hyper["lam"], hyper["mu"])[0]) if lame else math.nan
    row["energy_shear"] = float(elastic_energy(ddf, 0.0, 1.0)[0])
    row["energy_volume"] = float(elastic_energy(ddf, 1.0, 0.0)[0])
    if fixed_image is not None and (warped_image is not None or moving_image is not None):
        if warped_image is None:
            warped_image = warp_image(moving_image.float(), ddf)
        row["lncc"] = -float(_lncc(dims)(warped_image.float(), fixed_image.float()))
    return row


def metric_columns(labels: Sequence[int] = (), with_points: bool = False, before: bool = False,
                   with_similarity: bool = True) -> list[str]:
    """The names :func:`pair_metrics` returns for these inputs, in its order (the columns of metric tables)."""
    columns = []
    if labels:
        columns += ["dice_mean"] + [f"dice_{int(label)}" for label in labels] + (["dice_before"] if before else [])
    if with_points:
        columns += ["tre_mm"] + (["tre_before_mm"] if before else [])
    columns += ["folding_percent", "sd_log_jacobian", "elastic_energy", "energy_shear", "energy_volume"]
    return columns + (["lncc"] if with_similarity else [])
