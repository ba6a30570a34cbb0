"""The test-time stages of a registration around the network, as the configs wire them (``instance`` in
``configs/inference.json``): global pre-alignment before the network, instance optimisation of its field after it,
at the network's own (lam, mu)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..data.transforms import COVERAGE_KEY
from ..flags import parse_flag
from ..forward import plain
from ..losses.regularizers import FIXED_LAME, get_regularizer
from ..physics import LameParameters
from ..losses.similarity import get_similarity
from ..networks.spatial import Affine, affine_ddf, compose_affine
from ..networks.warp import warp_image
from ..losses.discrete import discrete_search
from ..optimize import (PREALIGN_STEPS, PREALIGNMENTS, auto_prealign, identity_field, instance_optimize, level_steps,
                        prealign, similarity_features, start_objective)

__all__ = ["InstanceOptimization", "PairStages"]

logger = logging.getLogger("elastic_hypermorph_bundle")


class PairStages(NamedTuple):
    """What the stages compute for a pair before (and independently of) its ``(lam, mu)``
    (:meth:`InstanceOptimization.prepare`), so a sweep over ``(lam, mu)`` computes it once per pair.

    Attributes:
        affine: the pre-alignment (None when off or not needed).
        network_moving: the moving image ``(B, 1, *spatial)`` the network reads (pre-aligned when ``affine``).
        start: the discrete search's field (``instance_discrete``), else None (the identity).
        record: the pre-alignment's decisions (``prealign auto``), merged into :attr:`InstanceOptimization.record`.
        features: what the optimisation's similarity compares, of both images
            (:func:`~elastic_hypermorph_bundle.optimize.similarity_features`), else None (no optimisation).
        tentative: ``prealign auto`` proposed ``affine``, which :meth:`InstanceOptimization.register` keeps only
            where the optimisation's start objective with it is lower than without it (that objective depends on
            ``(lam, mu)``, so it is decided there, per ``(lam, mu)``), with or without the optimisation after it
            (``steps`` 0: the network's field is the start); never for a regularizer without ``(lam, mu)`` (no
            such objective: the proposed map stands).
        unaligned_start: with ``tentative``, the discrete search's field of the moving image as it is (else None).
    """

    affine: Affine | None
    network_moving: torch.Tensor
    start: torch.Tensor | None
    record: dict
    features: tuple[torch.Tensor, torch.Tensor] | None = None
    tentative: bool = False
    unaligned_start: torch.Tensor | None = None


class InstanceOptimization:
    """The test-time stages of a registration around the network, with their settings: pre-alignment before the
    network, instance optimisation after it (used by :class:`~elastic_hypermorph_bundle.workflow.steps.RegisterStep`
    in inference, evaluation and the sweep's selected point). The stages themselves are the pure functions of
    :mod:`elastic_hypermorph_bundle.optimize`.

    ``(lam, mu)`` of the optimisation are the network's hyperparameter row, mapped by the model's regularizer (its
    row in :data:`~elastic_hypermorph_bundle.losses.regularizers.REGULARIZERS`): ``[lam, mu]`` for the elastic
    regularizer, ``alpha * (fixed_lam, fixed_mu)`` for ``"elastic_fixed"`` (the same energy, since it is linear in
    ``(lam, mu)``). A regularizer without elastic parameters (the diffusion baseline) has the optimisation off
    (with a warning); the pre-alignment stays.

    Args:
        steps: Adam steps of every level (a number), or of each level, coarsest first (a list of ``levels``
            numbers, e.g. ``[50, 50, 20]``; :func:`~elastic_hypermorph_bundle.optimize.level_steps`); 0 (on every
            level): no instance optimisation. Kept as :attr:`steps`, one count per level.
        similarity, levels, grid, lr, smooth: see :func:`~elastic_hypermorph_bundle.optimize.instance_optimize`.
        prealign: ``"auto"`` (a rigid map proposed when it clearly improves the similarity over the identity,
            :func:`~elastic_hypermorph_bundle.optimize.auto_prealign`, and kept only when the optimisation's start
            objective with it, from its best start, is lower than without it (one rule: with ``steps`` 0 the start
            is the network's field, which is then the result): a follow-up scan in another position is aligned,
            a breathing-only pair is left as it is; rigid, as an affine map's scaling absorbed part
            of a follow-up's breathing, free of elastic energy, in the benchmark's section 5b), ``"none"``, ``"translation"``, ``"rigid"`` or
            ``"affine"`` (see :func:`~elastic_hypermorph_bundle.optimize.prealign`).
        prealign_steps: Adam steps of the pre-alignment (:data:`~elastic_hypermorph_bundle.optimize.PREALIGN_STEPS`).
        use_mask: restrict both stages' similarity to the fixed mask (the batch must have ``fixed_mask``).
        coverage_mask: restrict both stages' similarity (and the start choice's objective) to where the moving
            image has data (``moving_coverage`` of :class:`~elastic_hypermorph_bundle.data.transforms.ResampleToFixedd`,
            times the fixed mask with ``use_mask``) when the batch has it, i.e. when the moving image came on
            another grid; a pair on one grid is registered as without it. The zero fill outside a follow-up's field
            of view is no anatomy: compared against the baseline, it drew the field there (section 7b: 74-82 % of
            the folded voxels of the real follow-ups; with the mask 1.76 -> 1.24 mm and 1.17 -> 0.65 mm).
        diffeomorphic: optimise a velocity (see :func:`~elastic_hypermorph_bundle.optimize.instance_optimize`).
        hyper_space: the model's trained :class:`~elastic_hypermorph_bundle.hyperparams.HyperSpace` (its
            regularizer decides how a row maps to ``(lam, mu)``); ``None`` means the elastic regularizer.
        fixed_lam, fixed_mu: the constants of a regularizer that has them (``"elastic_fixed"``): those the model
            was trained with, which its card records (``configs/inference.json`` reads them there,
            :func:`~elastic_hypermorph_bundle.model_card.trained_setting`); ``None``: the training loss's default,
            :data:`~elastic_hypermorph_bundle.losses.regularizers.FIXED_LAME`.
        select_start: before optimising, compare the optimisation's own objective on its finest grid
            (:func:`~elastic_hypermorph_bundle.optimize.start_objective`) for the network's prediction and for the
            identity (or the discrete search's field) and continue from the better: the network gives a start,
            not a verdict.
        similarity_stride: per level (a number, or one per level), compare on a sub-grid of every ``stride``-th
            voxel per axis, another on each step (see :func:`~elastic_hypermorph_bundle.optimize.instance_optimize`);
            1: every voxel. Kept as :attr:`similarity_stride`, one per level; a windowed similarity (LNCC) compares
            every voxel whatever it says (with a warning), so choosing LNCC needs no second flag.
        discrete: start the optimisation without a network from a coarse discrete displacement search
            (:func:`~elastic_hypermorph_bundle.losses.discrete.discrete_search`, quarter resolution) instead of the
            identity.

    After :meth:`register`, :attr:`record` holds per-pair ``(B,)`` values of the stages' decisions (pre-alignment
    similarities, start objectives, the start taken; ``moving_coverage``: the fraction of the fixed grid the
    moving image covers, where its coverage restricted the similarity) for the run's record.

    Raises:
        ValueError: for an unknown similarity or pre-alignment, ``steps`` that are not whole numbers >= 0 (one, or
            one per level), a ``similarity_stride`` that is not (>= 1 on every level; with a windowed similarity
            it is 1 on every level, with a warning), negative ``prealign_steps``, levels < 1, grid < 1, lr <= 0.
    """

    def __init__(
        self,
        steps: int | Sequence[int] = 25,
        similarity: str = "mind",
        levels: int = 3,
        grid: float = 2.0,
        lr: float = 0.2,
        smooth: int = 3,
        prealign: str = "auto",
        prealign_steps: int = PREALIGN_STEPS,
        use_mask: bool | str = False,
        coverage_mask: bool | str = True,
        diffeomorphic: bool | str = False,
        hyper_space=None,
        fixed_lam: float | None = None,
        fixed_mu: float | None = None,
        select_start: bool | str = True,
        discrete: bool | str = False,
        similarity_stride: int | Sequence[int] = 1,
    ) -> None:
        levels, prealign_steps = int(levels), int(prealign_steps)
        regularizer = "elastic" if hyper_space is None else hyper_space.regularizer
        compared = get_similarity(similarity)  # validates the name; its row says whether it is windowed
        if prealign not in ("auto", *PREALIGNMENTS):
            raise ValueError(f"prealign must be one of {('auto', *PREALIGNMENTS)}, got {prealign!r}.")
        if prealign_steps < 0:
            raise ValueError(f"prealign_steps must be >= 0, got {prealign_steps}.")
        if levels < 1 or not float(grid) >= 1 or not float(lr) > 0 or int(smooth) < 0:
            raise ValueError(f"need instance_levels >= 1, instance_grid >= 1, instance_lr > 0 and smooth >= 0, got "
                             f"{levels}, {grid}, {lr}, {smooth}.")
        steps = level_steps(steps, levels, "instance_steps")
        strides = level_steps(similarity_stride, levels, "instance_similarity_stride", minimum=1)
        if compared.windowed and max(strides) > 1:
            # the default strides the finest level for MIND; a user who picks a windowed similarity is not made to
            # also change the stride: every voxel is compared, and the log says so
            logger.warning("instance_similarity %r compares windows, which a sub-grid of the voxels cannot hold: "
                           "instance_similarity_stride %s does not apply, every voxel is compared on every step.",
                           similarity, list(strides))
            strides = (1,) * levels
        row = get_regularizer(regularizer)
        if any(steps) and row.lame is None:
            logger.warning(
                "instance optimisation optimises the elastic energy at the network's (lam, mu), which the %s "
                "regularizer does not have: it registers with its network alone (--instance_steps 0 says so).",
                regularizer,
            )
            steps = (0,) * levels
        constants = None
        if row.needs_constants:  # the model's own (its card's), else the training loss's defaults
            fixed_lam = FIXED_LAME.lam if fixed_lam is None else float(fixed_lam)
            fixed_mu = FIXED_LAME.mu if fixed_mu is None else float(fixed_mu)
            constants = LameParameters(fixed_lam, fixed_mu)
        self.steps, self.similarity, self.levels, self.grid = steps, similarity, levels, float(grid)
        self.lr, self.smooth, self.similarity_stride = float(lr), int(smooth), strides
        self.prealign, self.prealign_steps = prealign, prealign_steps
        # booleans from the command line are parsed once, here
        self.use_mask = parse_flag("use_mask", use_mask)
        self.coverage_mask = parse_flag("instance_coverage_mask", coverage_mask)
        self.diffeomorphic = parse_flag("diffeomorphic", diffeomorphic)
        self.select_start = parse_flag("instance_select_start", select_start)
        self.discrete = parse_flag("instance_discrete", discrete)
        self.record: dict[str, torch.Tensor] = {}
        self.regularizer, self.fixed_lam, self.fixed_mu = regularizer, fixed_lam, fixed_mu
        self._lame, self._constants = row.lame, constants

    @property
    def optimizes(self) -> bool:
        """Whether the instance optimisation runs (some level has steps)."""
        return any(self.steps)

    @property
    def enabled(self) -> bool:
        return self.optimizes or self.prealign != "none"

    @property
    def has_elastic_parameters(self) -> bool:
        """Whether the model's regularizer gives its rows elastic parameters ``(lam, mu)`` to optimise at."""
        return self._lame is not None

    def elastic_parameters(self, hyper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lam, mu)``, each ``(B,)``, of the network's ``(B, H)`` hyperparameter rows.

        Raises:
            ValueError: for a regularizer without elastic parameters (its optimisation is off).
        """
        if self._lame is None:
            raise ValueError(f"the {self.regularizer!r} regularizer has no elastic parameters (lam, mu) to optimise at.")
        return self._lame(hyper, self._constants)

    def mask(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(mask, covered)`` of a batch: :meth:`similarity_mask` of its fixed mask and moving coverage.

        Raises:
            ValueError: ``use_mask`` and the batch has no ``fixed_mask``.
        """
        if self.use_mask and "fixed_mask" not in batch:
            raise ValueError("--use_mask true needs a fixed mask for every pair (--fixed_mask, or masksTr in the dataset).")
        return self.similarity_mask(batch["fixed_mask"] if self.use_mask else None, batch.get(COVERAGE_KEY))

    def similarity_mask(self, fixed_mask: torch.Tensor | None,
                        coverage: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(mask, covered)``: the voxels both stages compare, ``(B, 1, *spatial)`` 0/1 or ``None`` (all), i.e.
        ``fixed_mask`` (when ``use_mask``; the caller passes ``None`` otherwise) times ``coverage > 0`` (when
        ``coverage_mask`` and the moving image has one: it came on another grid); and ``covered``, ``(B,)`` the
        fraction of the fixed grid the moving image covers, ``mean(coverage > 0)`` over the voxels, where the
        coverage entered the mask (else ``None``). Pass both to :meth:`register` (or :meth:`prepare`), which records
        and logs ``covered``."""
        if fixed_mask is not None:
            fixed_mask = plain(fixed_mask).float()
        if coverage is None or not self.coverage_mask:
            return fixed_mask, None
        coverage = (plain(coverage).float() > 0).float()
        mask = coverage if fixed_mask is None else fixed_mask * coverage
        return mask, coverage.flatten(1).mean(1)

    def align(self, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float], mask=None,
              features=None) -> Affine | None:
        """The pre-alignment of the pair, ``None`` when off (or, with ``"auto"``, not proposed); ``features``: the
        pair's similarity features when already computed."""
        if self.prealign == "auto":
            affine, record = auto_prealign(fixed, moving, spacing, self.similarity, mask, self.prealign_steps,
                                           features=features, transform="rigid")
            self.record.update(record)
            return affine
        if self.prealign == "none":
            return None
        return prealign(fixed, moving, spacing, self.prealign, self.similarity, mask, self.prealign_steps,
                        features=features)

    def refine(self, fixed, moving, hyper, init_ddf, affine: Affine | None = None, mask=None,
               features=None) -> torch.Tensor:
        """The total DDF: ``init_ddf`` optimised at the rows' ``(lam, mu)`` and composed with ``affine``
        (``features``: the pair's :func:`~elastic_hypermorph_bundle.optimize.similarity_features`, if computed)."""
        lam, mu = self.elastic_parameters(hyper)
        return instance_optimize(
            fixed, moving, lam, mu, init_ddf, similarity=self.similarity, steps=self.steps, levels=self.levels,
            grid=self.grid, lr=self.lr, mask=mask, diffeomorphic=self.diffeomorphic, affine=affine,
            smooth=self.smooth, features=features, similarity_stride=self.similarity_stride,
        )

    def prepare(self, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float], mask=None,
                features=None, covered: torch.Tensor | None = None) -> PairStages:
        """The stages' part that does not depend on ``(lam, mu)``: the pre-alignment, the moving image the network
        reads, the discrete search's start (``None``: the identity), the similarity's features of both images
        (``features`` when the caller has them, e.g. a sweep's cached pair, else computed here); other arguments
        as :meth:`register`."""
        self.record = {}
        if covered is not None:
            self.record["moving_coverage"] = covered
            for fraction in covered.tolist():
                logger.info("the moving image covers %.1f %% of the fixed grid: the similarity compares there only "
                            "(--instance_coverage_mask false: everywhere)", 100 * fraction)
        # what the optimisation and the auto pre-alignment's proposal and check compare, once, before the
        # pre-alignment (which compares the same features)
        compares = self.optimizes or self.prealign == "auto"
        if compares and features is None:
            features = similarity_features(fixed, moving, self.similarity)
        affine = self.align(fixed, moving, spacing, mask, features)
        network_moving = moving if affine is None else warp_image(moving, affine_ddf(affine, moving.shape[2:]))
        search = self.discrete and self.optimizes
        start = discrete_search(fixed, network_moving) if search else None
        # a proposed map is checked by the start objective at (lam, mu), with or without the optimisation after it
        tentative = self.prealign == "auto" and affine is not None and self.has_elastic_parameters
        unaligned_start = discrete_search(fixed, moving) if search and tentative else None
        return PairStages(affine, network_moving, start, dict(self.record), features if compares else None,
                          tentative, unaligned_start)

    def register(self, predict, fixed, moving, hyper, spacing: Sequence[float], mask=None,
                 prepared: PairStages | None = None, covered: torch.Tensor | None = None) -> torch.Tensor:
        """One registration with every stage: pre-alignment, ``predict(network_moving) -> ddf`` (the network on
        the pre-aligned moving image; ``None``: the identity), instance optimisation; returns the total DDF.

        Args:
            predict: callable mapping the (pre-aligned) moving image ``(B, 1, *spatial)`` to the network's DDF.
            fixed, moving: ``(B, 1, *spatial)`` plain tensors on one grid.
            hyper: ``(B, H)`` the network's hyperparameter rows (they give ``(lam, mu)``, see
                :meth:`elastic_parameters`).
            spacing: voxel size (mm) of the grid, for the pre-alignment's rotations and scalings.
            mask: the similarity's mask ``(B, 1, *spatial)`` (:meth:`mask` or :meth:`similarity_mask`), ``None``: all
                voxels.
            prepared: :meth:`prepare` of this pair with these settings (computed here when None), e.g. kept by a
                sweep that registers one pair at many ``(lam, mu)``.
            covered: ``(B,)`` the moving image's covered fraction that came with ``mask`` (:meth:`similarity_mask`),
                recorded as ``moving_coverage`` and logged by :meth:`prepare` (with ``prepared``, its record has it).
        """
        stages = self.prepare(fixed, moving, spacing, mask, covered=covered) if prepared is None else prepared
        self.record = dict(stages.record)
        # the similarity's descriptors of both images, once per pair for the choices below and the optimisation
        # (``prepared`` by an instance without optimisation has none)
        features = stages.features
        if (self.optimizes or stages.tentative) and features is None:
            features = similarity_features(fixed, moving, self.similarity)
        if not self.optimizes and not stages.tentative:
            ddf = None if predict is None else plain(predict(stages.network_moving)).float()
            return compose_affine(stages.affine, identity_field(fixed) if ddf is None else ddf)
        lam_mu = self.elastic_parameters(hyper)
        # the start objectives compare on the optimisation's finest grid: the features' resize there (kept by the
        # features, PairFeatures) serves all of them (2 starts, 4 with a proposed map) and the finest level
        ddf, value, record = self._start(predict, fixed, moving, lam_mu, stages.network_moving, stages.start,
                                         stages.affine, mask, features, stages.tentative)
        affine = stages.affine
        if stages.tentative:  # the proposed map against the moving image as it is, each from its best start
            ddf_none, value_none, record_none = self._start(predict, fixed, moving, lam_mu, moving,
                                                            stages.unaligned_start, None, mask, features, True)
            ddf, affine, record = self._keep_map(ddf, value, record, ddf_none, value_none, record_none, affine)
        self.record.update(record)
        if not self.optimizes:  # the network alone (or the identity), behind the map where it was kept
            return compose_affine(affine, ddf)
        return self.refine(fixed, moving, hyper, ddf, affine, mask, features)

    def _objective(self, fixed, moving, lam_mu, ddf, affine, mask, features) -> torch.Tensor:
        """``(B,)`` the optimisation's objective on its finest grid for the start ``ddf`` (None: the identity)."""
        return start_objective(fixed, moving, *lam_mu, ddf, similarity=self.similarity, levels=1, grid=self.grid,
                               mask=mask, affine=affine, features=features)

    def _start(self, predict, fixed, moving, lam_mu, network_moving, other, affine, mask, features, value=False):
        """The start of the optimisation behind ``affine`` (None: no map): the network's field of
        ``network_moving`` or, with ``select_start``, the better of it and ``other`` (the identity when None,
        :meth:`_better_start`), else ``other``; returns ``(ddf, objective (B,) or None, record)``, the objective
        computed when ``value`` (or for the start's choice)."""
        if predict is None:
            ddf = identity_field(fixed) if other is None else other
        else:
            ddf = plain(predict(network_moving)).float()
            if self.select_start and self.optimizes:  # without the optimisation, the network's field is the result
                return self._better_start(fixed, moving, lam_mu, ddf, other, affine, mask, features)
        return ddf, self._objective(fixed, moving, lam_mu, ddf, affine, mask, features) if value else None, {}

    @staticmethod
    def _keep_map(ddf, value, record, ddf_none, value_none, record_none, affine):
        """Per pair, the proposed map (with its start) where its start objective ``value`` is lower than
        ``value_none`` without it, else no map; both values and the choice go to the log and the record."""
        keep = value < value_none
        for i in range(keep.shape[0]):
            logger.info("pre-alignment auto: start objective %.5f with the rigid map, %.5f without: %s",
                        value[i].item(), value_none[i].item(), "map kept" if keep[i] else "map dropped")
        pick = lambda a, b: torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
        merged = {key: pick(record[key], record_none[key]) for key in record if key in record_none}
        merged.update(start_objective_with_map=value, start_objective_without_map=value_none,
                      prealign_applied=keep.to(ddf.dtype))
        if not keep.any():
            return ddf_none, None, merged
        identity = Affine.identity(keep.shape[0], affine.spacing, ddf.device)
        kept = Affine(pick(affine.matrix, identity.matrix), pick(affine.translation, identity.translation),
                      affine.spacing)
        return pick(ddf, ddf_none), kept, merged

    def _better_start(self, fixed, moving, lam_mu, network_ddf, other, affine, mask, features=None):
        """Per pair, the start (the network's field or ``other``: the identity when None) with the lower objective
        on the optimisation's finest grid; returns ``(ddf, objective (B,), record)``, both values and the choice
        logged and recorded.

        The finest grid, not the first (coarsest) level: 8x coarser, a network's field (whose elastic energy the
        identity does not pay) lost to the identity on both real follow-ups of the benchmark (section 5b), where
        it gave the lower error after the optimisation (2.05 against 2.91 mm, 3.00 against 6.42 mm)."""
        network_value = self._objective(fixed, moving, lam_mu, network_ddf, affine, mask, features)
        other_value = self._objective(fixed, moving, lam_mu, other, affine, mask, features)
        take_network = network_value <= other_value
        other_name = "the identity" if other is None else "the discrete search"
        for i in range(fixed.shape[0]):
            logger.info("start of the optimisation%s: objective %.5f from the network, %.5f from %s: %s",
                        "" if affine is None else " (rigid map)", network_value[i].item(), other_value[i].item(),
                        other_name, "the network's" if take_network[i] else other_name)
        record = {"start_objective_network": network_value, "start_objective_identity": other_value,
                  "start_network": take_network.to(fixed.dtype)}
        if other is None:
            other = identity_field(network_ddf)
        ddf = torch.where(take_network[:, None, None, None, None], network_ddf, other)
        return ddf, torch.minimum(network_value, other_value), record
