"""Test-time instance optimisation of a pair's displacement field at chosen elastic parameters, after a global
pre-alignment (the accuracy stage of the strongest lung-CT methods, e.g. ConvexAdam, Siebert et al., MICCAI 2021;
VoxelMorph++, Heinrich & Hansen, WBIR 2022).

Pure functions, in the order a registration uses them, all in the package's conventions (fixed and moving on
one grid, DDF channel ``j`` = displacement along spatial axis ``j`` in voxels, backward warp); the affine maps and
resampling they use are :mod:`.networks.spatial`, the similarities the table :mod:`.losses.similarity`, and the
pipeline that runs them around the network is :class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`:

* :func:`prealign`: an affine (or rigid, or translation) map ``q = A (p - c) + c + t`` in physical coordinates
  ``p = x * spacing`` (mm) about the image centre ``c``, started from the images' centres of mass (or a given map)
  and fitted by Adam on downsampled images. :func:`~.networks.spatial.affine_ddf` turns it into a DDF.
  :func:`auto_prealign` decides by what a global map achieves: rigid fits from a few starts on a coarse grid, kept
  (and refined to an affine map) only when they beat the identity's similarity by a clear margin.
* :func:`start_objective`: the objective of :func:`instance_optimize` at its first level for a start field, so that
  the better of two starts (the network's prediction, the identity) can be chosen before optimising.
* :func:`instance_optimize`: the non-rigid field ``u_N`` that minimises, per sample,
  ``similarity(fixed, moving ∘ (x + u)) + R(u_N; lam, mu)``, with ``u = u_A + A_vox u_N`` the pre-alignment
  composed with ``u_N`` (``A_vox`` the affine's linear part in voxels) and ``R`` the package's
  :func:`~elastic_hypermorph_bundle.losses.elastic.elastic_energy` with the weighting of training
  (:class:`~elastic_hypermorph_bundle.losses.RegistrationLoss`, ``weighting="paper"``: similarity + R), so
  ``(lam, mu)`` mean the same as for the network. ``u_N`` = the initial field (e.g. the network's prediction on the
  pre-aligned pair) plus a correction on a control grid ``grid`` times coarser than the image, optimised coarse to
  fine over ``levels`` (each level twice as fine as the one before), upsampled (trilinear) to the image grid; the
  Adam steps of each level are :func:`level_steps` of ``steps`` (one number for every level, or one per level).
  With ``diffeomorphic=True`` the correction is a stationary velocity, integrated by scaling and squaring and
  composed with the initial field.

Similarities: any row of :data:`~.losses.similarity.SIMILARITIES` (``"mind"``, MIND-SSC descriptors of the
image-grid images averaged onto each level; ``"lncc"``, MONAI's local NCC with training's window scaled with the
level), optionally restricted to a fixed-image mask (e.g. the lungs); a voxel-wise one may be compared on a
strided sub-grid of a level's voxels, another on each step (``similarity_stride``), so that a step's warp costs a
fraction of the whole level's (stochastic sub-sampling of the similarity, as in elastix's random samplers).
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from monai.networks.blocks import DVF2DDF

from .losses.elastic import elastic_energy
from .losses.similarity import LNCC_WINDOW, Similarity, get_similarity
from .networks.spatial import (Affine, affine_ddf, all_finite, box_mean, compose_affine, field_scale, level_shape,
                               resize_field, resize_image)
from .networks.warp import sample_points, warp_image

__all__ = ["PREALIGNMENTS", "AUTO_PREALIGN_MARGIN", "AUTO_PREALIGN_SHIFTS_MM", "PREALIGN_STEPS",
           "centre_of_mass_offset", "lung_centroid_offset", "prealign", "auto_prealign", "PairFeatures",
           "similarity_features", "features_at", "identity_field", "start_objective", "level_steps",
           "instance_optimize"]

logger = logging.getLogger("elastic_hypermorph_bundle")

#: the longest a level of the optimisation runs without a log line (seconds)
PROGRESS_SECONDS = 5.0

#: global transforms of the pre-alignment, by increasing degrees of freedom ("none" = identity)
PREALIGNMENTS = ("none", "translation", "rigid", "affine")
#: :func:`auto_prealign` proposes a global map when its rigid fit lowers the coarse similarity (MIND: a mean squared
#: difference) by at least this fraction of the identity's. Measured on the benchmark's full-size real-anatomy pairs
#: (section 5b, 192 x 192 x 208): breath-hold pairs gain 19-36 %, follow-up scans 32-33 mm apart 53-56 %; at 0.25
#: the held-out breath-hold pair (36 %) got a rigid map that ended 1.63 mm against 1.02 mm without one, so the
#: margin sits between the two groups (96 x 96 x 104 simulated pairs: breathing 8-14 %, follow-ups 50-60 %)
AUTO_PREALIGN_MARGIN = 0.45
#: translations along the body axis (mm) that :func:`auto_prealign` tries as starts, for a patient lying higher or
#: lower on the couch at a follow-up
AUTO_PREALIGN_SHIFTS_MM = (-50.0, -25.0, 25.0, 50.0)
#: Adam steps of a pre-alignment's fit (of :func:`auto_prealign`'s affine refinement; half as many per rigid fit).
#: 70 rather than 100: on the 6 real-anatomy pairs of the benchmark's section 5b, the same mean keypoint TRE (0.6340
#: against 0.6341 mm; the breath-hold pairs, whose map is not kept, unchanged) with 30 fewer rigid-fit steps per pair
#: (about 0.4 s on 2 CPU cores) and, where the map is kept, 30 fewer affine ones (benchmarks.md 7b,
#: ``prealign_steps``); 50 lost 0.02 %
PREALIGN_STEPS = 70
#: the lungs' intensity band on images windowed from [-1000, 500] HU to [0, 1] (about -940 to -400 HU)
LUNG_BAND = (0.04, 0.4)


def _check_images(fixed: torch.Tensor, moving: torch.Tensor, name: str = "instance_optimize") -> None:
    if fixed.ndim != 5 or fixed.shape[1] != 1:
        raise ValueError(f"{name} needs 3D single-channel images (B, 1, X, Y, Z), got fixed of shape {tuple(fixed.shape)}.")
    if moving.shape != fixed.shape:
        raise ValueError(
            f"{name} needs fixed and moving on one grid (resample them first), got shapes {tuple(fixed.shape)} "
            f"and {tuple(moving.shape)}."
        )
    if min(fixed.shape[2:]) < 4:
        raise ValueError(f"{name} needs at least 4 voxels per axis, got {tuple(fixed.shape[2:])}.")
    for role, image in (("fixed", fixed), ("moving", moving)):
        if not all_finite(image):
            raise ValueError(f"{name}: the {role} image contains non-finite values (nan or inf).")


def _check_spacing(spacing: Sequence[float] | None, name: str) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"{name} must hold 3 positive, finite voxel sizes, got {spacing}.")
    return values


def _check_mask(mask: torch.Tensor | None, fixed: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.ndim != 5 or mask.shape[1] != 1 or mask.shape[0] != fixed.shape[0] or mask.shape[2:] != fixed.shape[2:]:
        raise ValueError(
            f"mask must have shape (B, 1, *spatial) = {(fixed.shape[0], 1, *fixed.shape[2:])}, got {tuple(mask.shape)}."
        )
    mask = (mask > 0).to(fixed.dtype)
    if (mask.flatten(1).sum(1) == 0).any():
        raise ValueError("mask is empty for at least one pair: the similarity would have no voxel to compare.")
    return mask


def _offset_cycle(stride: int) -> list[tuple[int, int, int]]:
    """The ``stride^3`` offsets of a strided sub-grid, in the order the steps visit them: consecutive steps take
    offsets far apart (index ``i * m mod stride^3``, ``m`` coprime to it near half of it), so that a few steps
    already spread over the whole level; every offset once per ``stride^3`` steps."""
    count = stride ** 3
    multiplier = next(m for m in range(count // 2 + 1, count + 2) if math.gcd(m, count) == 1)
    offsets = [(i // stride ** 2, i // stride % stride, i % stride) for i in range(count)]
    return [offsets[i * multiplier % count] for i in range(count)]


class _LevelSimilarity:
    """Per-sample similarity ``(B,)`` of the moving image warped by a DDF to the fixed image on one level's grid,
    averaged over the (soft) fixed mask: a row of the similarity table (:mod:`.losses.similarity`) comparing what
    its ``prepare`` gave on the image grid, resized to the level (``fixed``, ``moving``), with training's LNCC window
    scaled with the level.

    With ``stride`` > 1 (a voxel-wise row only) a call compares on one sub-grid of every ``stride``-th voxel per
    axis (``1 / stride^3`` of the voxels), the sub-grid's offset taken by the call's ``step`` from
    :func:`_offset_cycle`: an unbiased estimate of the whole level's mean at that fraction of the warp's cost."""

    def __init__(self, row: Similarity, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
                 factor: float, stride: int = 1):
        self.row, self.fixed, self.moving, self.mask, self.stride = row, fixed, moving, mask, stride
        self.window = max(3, int(round(LNCC_WINDOW / factor)) | 1)
        self.offsets = _offset_cycle(stride)
        if stride > 1:
            axes = [torch.arange(n, dtype=fixed.dtype, device=fixed.device) for n in fixed.shape[2:]]
            self.identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]

    def __call__(self, ddf: torch.Tensor, step: int = 0) -> torch.Tensor:
        if self.stride == 1:
            value = self.row.compare(warp_image(self.moving, ddf), self.fixed, self.window)
            mask = self.mask
        else:
            cut = (Ellipsis, *(slice(o, None, self.stride) for o in self.offsets[step % len(self.offsets)]))
            warped = sample_points(self.moving, self.identity[cut] + ddf[cut])
            value = self.row.compare(warped, self.fixed[cut], self.window)
            mask = None if self.mask is None else self.mask[cut]
        if mask is None:
            return value.flatten(1).mean(1)
        # a sub-grid may miss a small mask: it then adds nothing to this step
        return (value * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-12)


def _per_sample(value: float | torch.Tensor, name: str, batch: int, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device).flatten()
    if value.numel() == 1:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a number or hold one value per pair ({batch}), got {value.numel()} values.")
    if not torch.isfinite(value).all() or (value < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {value.tolist()}.")
    return value


def _voxel_points(shape: Sequence[int], spacing: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Physical coordinates (mm) of every voxel, ``(3, N)``."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=like.dtype, device=like.device) for n in shape], indexing="ij")
    return torch.stack(grids).flatten(1) * torch.as_tensor(spacing, dtype=like.dtype, device=like.device)[:, None]


def centre_of_mass_offset(fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """``(B, 3)`` offset in mm from the fixed to the moving image's intensity centre of mass (intensities below 0
    count as 0), the starting translation of :func:`prealign` and the test of ``prealign="auto"``.

    Raises:
        ValueError: when an image is zero everywhere (no centre of mass).
    """
    spacing = _check_spacing(spacing, "spacing") or (1.0, 1.0, 1.0)
    points = _voxel_points(fixed.shape[2:], spacing, fixed)

    def centre(image: torch.Tensor) -> torch.Tensor:
        weight = image.clamp_min(0).flatten(1)
        total = weight.sum(1, keepdim=True)
        if (total == 0).any():
            raise ValueError("prealign: an image is zero everywhere; nothing to align.")
        return weight @ points.T / total

    return centre(moving) - centre(fixed)


def lung_centroid_offset(fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float] | None = None,
                         band: tuple[float, float] = LUNG_BAND) -> torch.Tensor:
    """``(B, 3)`` offset in mm from the fixed to the moving image's lung centroid, the lungs being the voxels of the
    intensity ``band`` (a threshold mask: parenchyma is darker than tissue and brighter than the air around the
    body). Unlike the intensity centre of mass, it follows the anatomy when two scans cover the same box. ``(0, 0, 0)``
    for an image without such voxels."""
    spacing = _check_spacing(spacing, "spacing") or (1.0, 1.0, 1.0)
    points = _voxel_points(fixed.shape[2:], spacing, fixed)

    def centre(image: torch.Tensor) -> torch.Tensor:
        weight = ((image > band[0]) & (image < band[1])).to(image.dtype).flatten(1)
        return weight @ points.T / weight.sum(1, keepdim=True).clamp_min(1.0)

    return centre(moving) - centre(fixed)


class _Level(NamedTuple):
    """A similarity on a level ``factor`` times coarser than the image grid ``shape``."""

    measure: _LevelSimilarity
    shape: tuple[int, ...]
    level: tuple[int, ...]

    def __call__(self, affine: Affine) -> torch.Tensor:
        return self.measure(affine_ddf(affine, self.level, self.shape))


def _level(row: Similarity, prepared: tuple[torch.Tensor, torch.Tensor], mask, factor: float) -> _Level:
    shape = tuple(prepared[0].shape[2:])
    level = level_shape(shape, factor)
    fixed_l, moving_l = features_at(prepared, level)
    return _Level(_LevelSimilarity(row, fixed_l, moving_l, None if mask is None else resize_image(mask, level), factor),
                  shape, level)


def _fit(measure: _Level, transform: str, start: Affine, steps: int, lr: float, name: str) -> Affine:
    """Adam on a global map started from ``start``: ``translation`` (mm, in units of 10 mm), ``rigid``
    (``expm`` of a skew matrix from its axis-angle vector, times the start's matrix) or ``affine`` (``expm`` of a
    general matrix, so it stays invertible, times the start's matrix)."""
    batch, like = start.matrix.shape[0], start.matrix
    translation = torch.nn.Parameter(start.translation.detach().clone() / 10.0)
    rotation = torch.nn.Parameter(torch.zeros(batch, 3, device=like.device, dtype=like.dtype))
    linear = torch.nn.Parameter(torch.zeros(batch, 3, 3, device=like.device, dtype=like.dtype))
    params = {"translation": [translation], "rigid": [translation, rotation], "affine": [translation, linear]}[transform]

    def current() -> Affine:
        if transform == "affine":
            matrix = torch.linalg.matrix_exp(linear) @ start.matrix
        elif transform == "rigid":
            skew = torch.zeros(batch, 3, 3, device=like.device, dtype=like.dtype)
            skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -rotation[:, 2], rotation[:, 1], -rotation[:, 0]
            matrix = torch.linalg.matrix_exp(skew - skew.transpose(1, 2)) @ start.matrix
        else:
            matrix = start.matrix
        return Affine(matrix, translation * 10.0, start.spacing)

    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = measure(current()).sum()
            loss.backward()
            optimizer.step()
            if step == 0 or step == steps - 1:
                logger.info("prealign (%s, %s) step %d/%d: similarity %.4f", transform, name, step + 1, steps,
                            loss.item() / batch)
    with torch.no_grad():
        result = current()
    return Affine(result.matrix.detach(), result.translation.detach(), start.spacing)


def prealign(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    spacing: Sequence[float] | None = None,
    transform: str = "affine",
    similarity: str = "mind",
    mask: torch.Tensor | None = None,
    steps: int = PREALIGN_STEPS,
    factor: float = 4.0,
    lr: float = 0.01,
    start: Affine | None = None,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Affine:
    """Global pre-alignment of ``moving`` to ``fixed``: the :class:`Affine` (per pair) that, started from
    ``start`` (default: the translation between the images' intensity centres of mass), minimises the similarity of
    the pair downsampled ``factor`` times, by Adam. The rotation is parametrised by its axis-angle vector, the linear part of an affine
    by ``expm`` of a general matrix (so it stays invertible), the translation in units of 10 mm.

    Args:
        fixed, moving: ``(B, 1, X, Y, Z)`` images on one grid, intensities >= 0 for tissue (e.g. a CT window
            mapped to [0, 1]); the centre of mass weights voxels by their intensity.
        spacing: voxel size (mm) per axis, so rotations and scalings are physical; ``None`` is 1 mm.
        transform: ``"translation"``, ``"rigid"`` (rotation + translation), ``"affine"`` or ``"none"``.
        similarity: ``"mind"`` or ``"lncc"`` (see the module docstring).
        mask: optional ``(B, 1, X, Y, Z)`` fixed-image mask restricting the similarity.
        steps: Adam steps (0 keeps the centre-of-mass translation).
        factor: downsampling of the images during the fit.
        lr: Adam step size.
        start: the map the fit starts from (its matrix is kept and composed with the fitted one).
        features: :func:`similarity_features` of ``fixed`` and ``moving`` when already computed (the
            optimisation's, so a pair's descriptors are computed once).

    Raises:
        ValueError: for images or masks of the wrong shape or with non-finite values, a non-positive spacing,
            an unknown ``transform`` or ``similarity``, or a negative ``steps``.
    """
    _check_images(fixed, moving, "prealign")
    spacing = _check_spacing(spacing, "spacing") or (1.0, 1.0, 1.0)
    if transform not in PREALIGNMENTS:
        raise ValueError(f"transform must be one of {PREALIGNMENTS}, got {transform!r}.")
    row = get_similarity(similarity)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    mask = _check_mask(mask, fixed)
    batch, shape = fixed.shape[0], tuple(fixed.shape[2:])
    identity = Affine.identity(batch, spacing, fixed.device)
    if transform == "none":
        return identity

    if start is None:  # the moving point of the fixed centre of mass is the moving centre of mass
        start = Affine(identity.matrix, centre_of_mass_offset(fixed, moving, spacing).detach(), spacing)
    if not steps:
        return start
    measure = _level(row, (row.prepare(fixed), row.prepare(moving)) if features is None else features, mask, factor)
    return _fit(measure, transform, start, steps, lr, similarity)


def auto_prealign(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    spacing: Sequence[float] | None = None,
    similarity: str = "mind",
    mask: torch.Tensor | None = None,
    steps: int = PREALIGN_STEPS,
    margin: float = AUTO_PREALIGN_MARGIN,
    shifts_mm: Sequence[float] = AUTO_PREALIGN_SHIFTS_MM,
    body_axis: int = 2,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    transform: str = "affine",
) -> tuple[Affine | None, dict[str, torch.Tensor]]:
    """Pre-alignment decided by what it achieves (``prealign="auto"``).

    On the pair downsampled 8 times (fewer on grids under 192 voxels: at least 24 voxels per axis), the similarity of a few translations is evaluated: none, the intensity centres
    of mass (:func:`centre_of_mass_offset`), the lungs' centroids (:func:`lung_centroid_offset`) and ``shifts_mm``
    along ``body_axis`` (a patient higher or lower on the couch). A rigid map is fitted (``steps / 2`` Adam steps)
    from the two best; the better fit is kept when its similarity is at most ``1 - margin`` times the identity's
    (a breathing-only pair gains far less: the map stays the identity), and then refined to an affine map on a grid
    twice as fine (``steps``). Decided per pair.

    Args:
        fixed, moving, spacing, similarity, mask: as :func:`prealign`.
        steps: Adam steps of the affine refinement (half as many per rigid fit).
        margin: the fraction of the identity's similarity a rigid map must gain to be kept.
        shifts_mm: translations along ``body_axis`` tried as starts.
        body_axis: the array axis along the body (2: inferior-superior in the Learn2Reg layout).
        features: as :func:`prealign`.
        transform: ``"affine"`` (the kept rigid map refined to an affine one) or ``"rigid"`` (kept as it is: no
            scaling, which on a follow-up of another breathing depth can absorb part of the breathing).

    Returns:
        ``(affine, record)``: the map (``None`` when no pair keeps one; the identity for pairs that do not, in a
        batch where another does) and per-pair ``(B,)`` values: ``prealign_similarity_identity`` and
        ``prealign_similarity_rigid`` (the coarse similarity of the identity and of the best rigid map) and
        ``prealign_applied`` (1 where the map was kept).

    Raises:
        ValueError: as :func:`prealign`, or a margin outside [0, 1).
    """
    _check_images(fixed, moving, "prealign")
    spacing = _check_spacing(spacing, "spacing") or (1.0, 1.0, 1.0)
    row = get_similarity(similarity)
    mask = _check_mask(mask, fixed)
    if not 0.0 <= float(margin) < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}.")
    if transform not in ("rigid", "affine"):
        raise ValueError(f"transform of the auto pre-alignment must be 'rigid' or 'affine', got {transform!r}.")
    batch = fixed.shape[0]
    identity = Affine.identity(batch, spacing, fixed.device)
    prepared = (row.prepare(fixed), row.prepare(moving)) if features is None else features
    factor = max(1.0, min(8.0, min(fixed.shape[2:]) / 24))
    coarse = _level(row, prepared, mask, factor)
    starts = {"identity": identity.translation, "centre of mass": centre_of_mass_offset(fixed, moving, spacing),
              "lungs": lung_centroid_offset(fixed, moving, spacing)}
    for shift in shifts_mm:
        starts[f"body axis {float(shift):+g} mm"] = identity.translation + torch.eye(
            3, dtype=fixed.dtype, device=fixed.device)[body_axis] * float(shift)
    with torch.no_grad():
        scores = {name: coarse(identity._replace(translation=t)) for name, t in starts.items()}
    names = sorted(scores, key=lambda name: scores[name].sum().item())[:2]
    fits = [_fit(coarse, "rigid", identity._replace(translation=starts[name]), max(steps // 2, 1), 0.01, similarity)
            for name in names]
    with torch.no_grad():
        values = torch.stack([coarse(fit) for fit in fits])  # (2, B)
    best = values.argmin(0)
    pick = lambda get: torch.stack([get(fits[int(b)])[i] for i, b in enumerate(best)])  # noqa: E731
    rigid = Affine(pick(lambda a: a.matrix), pick(lambda a: a.translation), spacing)
    value_identity, value_rigid = scores["identity"], values.min(0).values
    applied = value_rigid <= (1.0 - float(margin)) * value_identity
    record = {"prealign_similarity_identity": value_identity.detach(), "prealign_similarity_rigid": value_rigid.detach(),
              "prealign_applied": applied.to(fixed.dtype)}
    for i in range(batch):
        logger.info("pre-alignment auto: similarity %.4f at the identity, %.4f after a rigid fit (from %s): %s", 
                    value_identity[i].item(), value_rigid[i].item(), names[int(best[i])],
                    ("kept, refined to an affine map" if transform == "affine" else "kept") if applied[i] else
                    f"not kept (gain below {100 * float(margin):.0f} %)")
    if not applied.any():
        return None, record
    affine = rigid if transform == "rigid" else _fit(_level(row, prepared, mask, max(factor / 2, 1.0)), "affine", rigid, steps, 0.01, similarity)
    keep = applied[:, None]
    return Affine(torch.where(keep[..., None], affine.matrix, identity.matrix),
                  torch.where(keep, affine.translation, identity.translation), spacing), record


class PairFeatures(tuple):
    """``(fixed, moving)``: what the similarity compares of a pair's two images on the image grid (``(B, C, X, Y,
    Z)`` each), which keeps its area-averaged resizes to the grids it is compared on (:meth:`at`), so that the
    pre-alignment, the start's choice and each level of the optimisation share them (a resize of a full-size
    image's 12 MIND-SSC descriptors reads all of them: 0.1-0.3 s on 2 CPU cores).

    A grid whose double divides the image grid is averaged from that double (itself kept), not from the image
    grid: the same block means to float rounding, reading 8 times fewer values (the levels 4 and 8 times coarser
    than a full-size pair: 0.03 against 0.3 s). Which grid a resize comes from depends only on its shape, so the
    values do not depend on which grids were asked for before."""

    def __new__(cls, fixed: torch.Tensor, moving: torch.Tensor):
        features = super().__new__(cls, (fixed, moving))
        features._resized = {}
        return features

    def at(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fixed, moving)`` on a grid of ``shape`` (:func:`~.networks.spatial.resize_image`)."""
        shape = tuple(int(n) for n in shape)
        image_grid = tuple(self[0].shape[2:])
        if shape == image_grid:
            return tuple(self)
        if shape not in self._resized:
            double = tuple(2 * n for n in shape)
            chained = all(m % d == 0 for m, d in zip(image_grid, double))  # the image grid itself included
            source = self.at(double) if chained else tuple(self)
            self._resized[shape] = tuple(resize_image(t, shape) for t in source)
        return self._resized[shape]


def features_at(features: tuple[torch.Tensor, torch.Tensor], shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``features`` (:func:`similarity_features`, or any ``(fixed, moving)`` pair, resized as a
    :class:`PairFeatures` would be) on a grid of ``shape``."""
    return (features if isinstance(features, PairFeatures) else PairFeatures(*features)).at(shape)


def similarity_features(fixed: torch.Tensor, moving: torch.Tensor, similarity: str = "mind") -> PairFeatures:
    """What ``similarity`` compares, of both images (``(B, C, X, Y, Z)`` each: e.g. the 12 MIND-SSC descriptors on
    the image grid), computed once per pair and shared by :func:`auto_prealign`, :func:`start_objective` and
    :func:`instance_optimize`, with its resizes to their grids (:class:`PairFeatures`)."""
    row = get_similarity(similarity)
    return PairFeatures(row.prepare(fixed), row.prepare(moving))


def identity_field(like: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    """The identity's DDF ``(B, 3, *shape)`` (zeros, voxels), ``B``, dtype and device of ``like`` ``(B, C, ...)``;
    ``shape`` defaults to ``like``'s spatial shape: the start of a stage given no field (``init_ddf=None``)."""
    shape = tuple(like.shape[2:]) if shape is None else tuple(shape)
    return torch.zeros(like.shape[0], 3, *shape, dtype=like.dtype, device=like.device)


def start_objective(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    lam: float | torch.Tensor,
    mu: float | torch.Tensor,
    init_ddf: torch.Tensor | None,
    *,
    similarity: str = "mind",
    levels: int = 3,
    grid: float = 2.0,
    spacing: Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
    affine: Affine | None = None,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(B,)`` the objective :func:`instance_optimize` minimises (similarity + elastic energy at ``(lam, mu)``), at
    its first (coarsest) level, for the start field ``init_ddf`` (``None``: the identity), with the same arguments
    (``features`` too: :func:`similarity_features`, on the image grid or already resized to that level, which
    several starts can then share): what the optimisation would start from, so two starts can be compared on its
    own terms."""
    _check_images(fixed, moving)
    row = get_similarity(similarity)
    spacing = _check_spacing(spacing, "spacing")
    batch, shape = fixed.shape[0], tuple(fixed.shape[2:])
    lam, mu = _per_sample(lam, "lam", batch, fixed), _per_sample(mu, "mu", batch, fixed)
    mask = _check_mask(mask, fixed)
    factor = grid * 2 ** (levels - 1)
    level = level_shape(shape, factor)
    features = similarity_features(fixed, moving, similarity) if features is None else features
    measure = _LevelSimilarity(row, *features_at(features, level),
                               None if mask is None else resize_image(mask, level), factor)
    field = identity_field(fixed, level) if init_ddf is None else resize_field(init_ddf.detach().to(fixed.dtype), level)
    scale = field_scale(shape, level, torch.as_tensor(spacing or (1.0, 1.0, 1.0), dtype=fixed.dtype)).flatten()
    base_spacing = torch.as_tensor(spacing or (1.0, 1.0, 1.0), dtype=fixed.dtype)
    affine_l = None if affine is None else affine._replace(spacing=tuple((torch.tensor(affine.spacing) / scale).tolist()))
    with torch.no_grad():
        total = compose_affine(affine_l, field, None if affine is None else affine_ddf(affine, level, shape))
        return measure(total) + elastic_energy(field, lam, mu, (base_spacing / scale).tolist())


def level_steps(steps: int | Sequence[int], levels: int, name: str = "steps", minimum: int = 0) -> tuple[int, ...]:
    """The Adam steps of each level of :func:`instance_optimize`, coarsest first: ``steps`` on every level when it
    is one number, else ``steps`` itself, one count per level (e.g. ``[50, 50, 20]`` for 3 levels: more steps on
    the cheap coarse levels, fewer on the finest). All zero: no optimisation.

    Args:
        steps: a whole number >= 0, or a sequence of ``levels`` of them.
        levels: number of levels of the optimisation.
        name: the setting's name in the error messages (e.g. ``"instance_steps"``, the config id).
        minimum: the least count a level may have (1 for a per-level setting that is not a step count, e.g.
            ``similarity_stride``).

    Raises:
        ValueError: a count that is not a whole number, a negative count, or a sequence of another length than
            ``levels``.
    """
    per_level = isinstance(steps, Sequence) and not isinstance(steps, str)
    counts = list(steps) if per_level else [steps]
    if not all(isinstance(c, numbers.Real) and not isinstance(c, bool) and float(c).is_integer() for c in counts):
        raise ValueError(f"{name} must be a whole number or a list of whole numbers (one per level, coarsest "
                         f"first), got {steps!r}.")
    counts = [int(count) for count in counts]
    if any(count < minimum for count in counts):
        raise ValueError(f"{name} must be >= {minimum} on every level, got {steps!r}.")
    if not per_level:
        counts = counts * levels
    elif len(counts) != levels:
        raise ValueError(f"{name} {steps!r} gives {len(counts)} levels' steps, but the optimisation has {levels} "
                         f"levels: give one number for every level or {levels} numbers, coarsest "
                         "first.")
    return tuple(counts)


def instance_optimize(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    lam: float | torch.Tensor,
    mu: float | torch.Tensor,
    init_ddf: torch.Tensor | None = None,
    *,
    similarity: str = "mind",
    steps: int = 25,
    levels: int = 3,
    grid: float = 2.0,
    lr: float = 0.2,
    spacing: Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
    diffeomorphic: bool = False,
    affine: Affine | None = None,
    smooth: int = 3,
    log_every: int = 0,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    similarity_stride: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Optimise each pair's displacement field at its ``(lam, mu)``; see the module docstring for the objective.

    Args:
        fixed, moving: ``(B, 1, X, Y, Z)`` images on one grid (the network's grid).
        lam, mu: Lamé parameters, numbers or one value per pair ``(B,)`` (as in training, per sample).
        init_ddf: the starting non-rigid field ``(B, 3, X, Y, Z)`` in voxels (e.g. the network's prediction on the
            pre-aligned pair); ``None`` starts from the identity (pure optimisation, no trained model needed).
        similarity: ``"mind"`` or ``"lncc"``.
        steps: Adam steps of every level, or one count per level, coarsest first (:func:`level_steps`); 0 on every
            level returns the initial field, composed with ``affine``. A step of a level costs about 1/8 of the next
            finer level's (its grid has 1/8 of the voxels), so more coarse and fewer finest steps are cheaper.
        levels: number of coarse-to-fine levels; level ``l`` (0 = coarsest) works on images and a control grid
            ``grid * 2^(levels - 1 - l)`` times coarser than the image grid.
        grid: coarsening of the finest level's control grid (2 = half resolution).
        lr: Adam step size, in voxels of each level's grid.
        spacing: voxel size used by the elastic energy, as in training's loss (``None``: the image grid's voxels,
            the bundle's training default); a level's voxels are scaled accordingly, so the energy, a mean strain
            density, means the same on every level.
        mask: optional ``(B, 1, X, Y, Z)`` fixed-image mask (e.g. lungs) restricting the similarity.
        diffeomorphic: optimise a stationary velocity (integrated by scaling and squaring) composed with
            ``init_ddf``, so the correction stays invertible.
        affine: a pre-alignment (:func:`prealign`) composed in front of the non-rigid field; the elastic energy
            applies to the non-rigid part only, as in training on pre-aligned pairs.
        smooth: number of 3^3 box filters the control values pass through (a B-spline-like basis; 0: none).
        log_every: log step and loss terms every this many steps per level (0: first and last step only).
        features: :func:`similarity_features` of ``fixed`` and ``moving`` when already computed (e.g. for
            :func:`start_objective`), so that a pair's descriptors are computed once.
        similarity_stride: per level (one number for every level, or one per level, coarsest first, as ``steps``):
            each step compares the images on one sub-grid of every ``stride``-th voxel per axis of the level, its
            offset changing from step to step (every voxel once per ``stride^3`` steps), so a step's warp and
            similarity cost ``1 / stride^3`` of the whole level's, their gradient an unbiased estimate of its; the
            elastic energy and the control values stay whole. 1: every voxel on every step. A voxel-wise
            similarity only (``"mind"``).

    Returns:
        the total DDF ``(B, 3, X, Y, Z)`` in voxels (pre-alignment composed with the optimised non-rigid field).

    Raises:
        ValueError: for images, masks or ``init_ddf`` of the wrong shape or with non-finite values, an unknown
            similarity, ``steps`` or ``similarity_stride`` (>= 1) that :func:`level_steps` refuses, a stride > 1
            with a windowed similarity, ``levels`` < 1, ``grid`` < 1, ``lr`` <= 0, a
            non-positive spacing, or negative or non-finite ``lam``/``mu``.
    """
    _check_images(fixed, moving)
    row = get_similarity(similarity)
    spacing = _check_spacing(spacing, "spacing")
    if levels < 1 or not grid >= 1 or not lr > 0:
        raise ValueError(f"need levels >= 1, grid >= 1 and lr > 0, got {levels}, {grid}, {lr}.")
    steps = level_steps(steps, levels)
    strides = level_steps(similarity_stride, levels, "similarity_stride", minimum=1)
    if row.windowed and max(strides) > 1:
        raise ValueError(f"similarity_stride {similarity_stride!r} needs a voxel-wise similarity such as 'mind': "
                         f"{similarity!r} compares windows, which a sub-grid of the voxels cannot hold.")
    batch, shape = fixed.shape[0], tuple(fixed.shape[2:])
    lam = _per_sample(lam, "lam", batch, fixed)
    mu = _per_sample(mu, "mu", batch, fixed)
    mask = _check_mask(mask, fixed)
    if init_ddf is None:
        init_ddf = identity_field(fixed)
    elif init_ddf.shape != (batch, 3, *shape):
        raise ValueError(f"init_ddf must have shape {(batch, 3, *shape)}, got {tuple(init_ddf.shape)}.")
    elif not all_finite(init_ddf):
        raise ValueError("init_ddf contains non-finite values (nan or inf).")
    init_ddf = init_ddf.detach().to(fixed.dtype)
    if not any(steps):
        return compose_affine(affine, init_ddf)

    compared = similarity_features(fixed, moving, similarity) if features is None else features
    base_spacing = torch.as_tensor(spacing or (1.0, 1.0, 1.0), dtype=fixed.dtype)
    correction: torch.Tensor | None = None
    integrate = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border") if diffeomorphic else None

    def smoothed(correction: torch.Tensor) -> torch.Tensor:
        # the control values pass through `smooth` 3^3 box filters: a B-spline-like basis, so the field between
        # control points is smooth even where the images hold no information
        for _ in range(smooth):
            correction = box_mean(correction)
        return correction

    def non_rigid(correction: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        correction = smoothed(correction)
        if integrate is None:
            return init + correction
        flow = integrate(correction)
        return flow + warp_image(init, flow)  # x -> init(x + flow(x)) + flow(x): init composed after the flow

    for level_index in range(levels):
        factor = grid * 2 ** (levels - 1 - level_index)
        level = level_shape(shape, factor)
        fixed_l, moving_l = features_at(compared, level)
        measure = _LevelSimilarity(row, fixed_l, moving_l, None if mask is None else resize_image(mask, level), factor,
                                   strides[level_index])
        init_l = resize_field(init_ddf, level)
        scale = field_scale(shape, level, base_spacing).flatten()
        # the pre-alignment on the level's grid: its field, and its linear part in the level's voxels
        affine_l = None if affine is None else affine._replace(spacing=tuple((torch.tensor(affine.spacing) / scale).tolist()))
        affine_field_l = None if affine is None else affine_ddf(affine, level, shape)
        # the level's voxel, in voxels of the image grid per axis (times the training spacing)
        level_spacing = (base_spacing / scale).tolist()
        start = identity_field(fixed, level)
        # the next level starts from this level's (smoothed) field
        previous = None if correction is None else resize_field(smoothed(correction.detach()), level)
        correction = torch.nn.Parameter(start if previous is None else previous)
        # the loss is summed over the level's voxels, and Adam's eps set on that scale, so that the rounding noise of
        # warping with a zero field (gradients of about 1e-6 per voxel) is not magnified into full steps by Adam's normalisation
        voxels = math.prod(level)
        count = steps[level_index]
        # fused: one pass over the control values per step instead of a dozen (4 ms of a full-size finest step's 120)
        optimizer = torch.optim.Adam([correction], lr=lr, eps=1e-4, fused=correction.device.type in ("cpu", "cuda"))
        logged = time.perf_counter()
        with torch.enable_grad():
            for step in range(count):
                # cosine decay: Adam's steps are about lr in size whatever the gradient, so without it the field
                # would keep jittering by about lr around the optimum
                optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / count))
                optimizer.zero_grad(set_to_none=True)
                field = non_rigid(correction, init_l)
                similarity_value = measure(compose_affine(affine_l, field, affine_field_l), step)
                energy = elastic_energy(field, lam, mu, level_spacing)
                loss = (similarity_value + energy).sum()
                (loss * voxels).backward()
                optimizer.step()
                # a line at least every PROGRESS_SECONDS, so that a long level (the finest, at full size) shows progress
                if step in (0, count - 1) or (log_every and (step + 1) % log_every == 0) or (
                    time.perf_counter() - logged >= PROGRESS_SECONDS
                ):
                    logged = time.perf_counter()
                    logger.info(
                        "instance optimisation level %d/%d (%s) step %d/%d: loss %.5f, %s %.5f, elastic %.5f",
                        level_index + 1, levels, "x".join(map(str, level)), step + 1, count,
                        loss.item() / batch, similarity, similarity_value.mean().item(), energy.mean().item(),
                    )
    with torch.no_grad():
        correction = smoothed(correction.detach())
        if integrate is None:
            field = init_ddf + resize_field(correction, shape)
        else:
            flow = resize_field(integrate(correction), shape)
            field = flow + warp_image(init_ddf, flow)
        return compose_affine(affine, field)
