"""Grid sweep of a trained hypernetwork over its hyperparameters: every (grid point, pair) scored once, streamed
to a tidy CSV that an interrupted sweep resumes from.

A row scores the registration a user gets at the point: the network's field (on the grid the pair is registered
on, through :class:`~elastic_hypermorph_bundle.networks.grid.NetworkGrid` when that is not the network's) and,
with test-time stages (:class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`), the pipeline's
(pre-alignment, network, instance optimisation at the same ``(lam, mu)``, warm-started from the network's field),
scored in the plain metric columns, the network's alone beside them as ``network_<metric>``.

Efficiency: each pair is preprocessed once and kept in memory (:func:`prepare_pairs`); the hypernetwork runs
once per grid point (``network.generate_weights``) and its weights serve every pair (``network(x, weights=w)``);
rows are appended and flushed as they are computed, and :class:`SweepTable` skips the rows already on disk.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.data.utils import affine_to_spacing

from ..data.transforms import COVERAGE_KEY
from ..forward import network_input, plain, weighted_ddf
from ..metrics import metric_columns, pair_metrics
from ..networks.grid import NetworkGrid
from ..networks.warp import warp_image
from ..optimize import similarity_features

__all__ = [
    "PreparedPair",
    "prepare_pairs",
    "mask_labels",
    "field_metrics",
    "prepare_stages",
    "register_pair",
    "sweep_columns",
    "SweepTable",
    "run_grid",
]

logger = logging.getLogger("elastic_hypermorph_bundle")


@dataclass
class PreparedPair:
    """One pair on its registration grid, ready for the network: images/masks ``(1, 1, *spatial)``, points
    ``(N, D)`` voxel coordinates, ``spacing`` in mm of that grid, ``truth`` the dataset's simulation record (the
    true material of a simulated case) or None, ``network_grid`` the grid the network reads when the pair is
    registered on another (e.g. the images' own), else None."""

    pair_id: str
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor | None = None
    moving_mask: torch.Tensor | None = None
    fixed_points: torch.Tensor | None = None
    moving_points: torch.Tensor | None = None
    spacing: tuple[float, ...] = ()
    truth: dict | None = None
    network_grid: NetworkGrid | None = None
    #: ``(1, 1, *spatial)`` where the moving image has data, when it came on another grid (``moving_coverage``)
    coverage: torch.Tensor | None = None
    _features: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def features(self, similarity: str = "mind") -> tuple[torch.Tensor, torch.Tensor]:
        """What ``similarity`` compares (:func:`~elastic_hypermorph_bundle.optimize.similarity_features`), of the
        fixed and moving image, e.g. the MIND-SSC descriptors ``(1, 12, *spatial)``: computed once per pair and
        similarity, for the ``mind`` column and the instance optimisation at every grid point."""
        if similarity not in self._features:
            self._features[similarity] = similarity_features(self.fixed.float(), self.moving.float(), similarity)
        return self._features[similarity]

    @property
    def network_input(self) -> torch.Tensor:
        """The network input of the pair on its own grid (:func:`~elastic_hypermorph_bundle.forward.network_input`)."""
        return network_input(self.moving, self.fixed)

    def predict(self, network: torch.nn.Module, weights, moving: torch.Tensor | None = None) -> torch.Tensor:
        """The network's DDF ``(1, D, *spatial)`` of the pair, in voxels of the pair's grid: ``network(x,
        weights=weights)`` on ``x = network_input(moving, fixed)``, brought onto the network's grid and the field
        back when the pair is registered on another (as inference's ``RegisterStep``). Differentiable.

        Args:
            weights: ``network.generate_weights(hyper)`` of one row.
            moving: the moving image to register (default the pair's; the pre-aligned one in the pipeline).
        """
        x = network_input(self.moving if moving is None else moving, self.fixed)
        grid, shape = self.network_grid, tuple(self.fixed.shape[2:])
        if grid is None or grid.matches(shape, self.spacing):
            return weighted_ddf(network, x, weights)
        ddf = weighted_ddf(network, grid.to_network(x, self.spacing), weights)
        return grid.from_network(ddf, shape, self.spacing)


def prepare_pairs(
    datalist: Sequence[dict],
    transform: Callable,
    device: torch.device | str | None = None,
    points: str | None = None,
    network_grid: NetworkGrid | None = None,
) -> list[PreparedPair]:
    """Preprocess every pair once (``transform``, e.g. ``registration_transforms``) and move it to ``device``.

    Args:
        datalist: pair dicts (``pair_datalist``); a pair's ``case["simulation"]`` record becomes ``truth``.
        transform: maps a pair dict of paths to images ``(1, *spatial)`` MetaTensors (and masks, points).
        device: where the cached tensors live for the whole sweep.
        points: ``"keypoints"`` or ``"landmarks"`` to score TRE on (must be loaded by ``transform``), or None.
        network_grid: the network's input grid when ``transform`` leaves the pairs on another (see
            :meth:`PreparedPair.predict`).
    """
    if len(datalist) == 0:
        raise ValueError("the sweep needs at least one pair; the datalist is empty.")
    prepared = []
    for pair in datalist:
        data = transform(dict(pair))
        fixed = data["fixed_image"]
        affine = getattr(fixed, "affine", None)
        dims = fixed.ndim - 1
        spacing = (1.0,) * dims if affine is None else tuple(float(s) for s in affine_to_spacing(affine, r=dims))

        # keys the transform did not load are still file paths: only loaded (tensor) values are used
        def batched(key: str) -> torch.Tensor | None:
            value = data.get(key)
            return plain(value).float().unsqueeze(0).to(device) if isinstance(value, torch.Tensor) else None

        def loaded_points(role: str) -> torch.Tensor | None:
            key = f"{role}_{points}"
            if points is None:
                return None
            if not isinstance(data.get(key), torch.Tensor):
                raise ValueError(f"pair {pair.get('pair_id')}: {key!r} not loaded; the transform must load {points}.")
            return plain(data[key]).float().to(device)

        case = pair.get("case") or {}
        prepared.append(
            PreparedPair(
                pair_id=str(pair.get("pair_id", len(prepared))),
                fixed=batched("fixed_image"),
                moving=batched("moving_image"),
                fixed_mask=batched("fixed_mask"),
                moving_mask=batched("moving_mask"),
                fixed_points=loaded_points("fixed"),
                moving_points=loaded_points("moving"),
                spacing=spacing,
                truth=case.get("simulation") if isinstance(case, dict) else None,
                network_grid=network_grid,
                coverage=batched(COVERAGE_KEY),
            )
        )
    ids = [pair.pair_id for pair in prepared]
    if len(set(ids)) != len(ids):
        raise ValueError(f"pair ids must be unique to key the sweep rows, got {ids}.")
    return prepared


def mask_labels(pairs: Sequence[PreparedPair]) -> list[int]:
    """Sorted nonzero label values present in the fixed masks (the Dice columns of the sweep); [] without masks."""
    if any(pair.fixed_mask is None or pair.moving_mask is None for pair in pairs):
        return []
    values = torch.cat([pair.fixed_mask.round().unique().cpu() for pair in pairs]).unique()
    return [int(v) for v in values.tolist() if v != 0]


def field_metrics(
    ddf: torch.Tensor, pair: PreparedPair, hyper: dict[str, float], labels: Sequence[int] = ()
) -> dict[str, float]:
    """:func:`~elastic_hypermorph_bundle.metrics.pair_metrics` of one registration of a prepared pair (the sweep's
    metric columns, :func:`~elastic_hypermorph_bundle.metrics.metric_columns`): Dice over ``labels`` (none when
    empty), TRE of the pair's points, Jacobian metrics inside the fixed mask, elastic energies, LNCC; and ``mind``,
    the instance optimisation's own dissimilarity at full resolution (mean squared difference of the fixed
    image's MIND-SSC descriptors and the moving image's warped by ``ddf``, averaged over channels and voxels, in
    [0, 1], lower is better), for the unsupervised per-pair choice (:mod:`.selection`).

    Args:
        ddf: ``(1, D, *spatial)`` displacement field of ``pair``.
        hyper: the row's hyperparameters by name.
        labels: mask labels to score (:func:`mask_labels`); empty skips Dice.
    """
    row = pair_metrics(
        ddf,
        fixed_mask=pair.fixed_mask,
        moving_mask=pair.moving_mask if labels else None,
        labels=list(labels) or None,
        fixed_points=pair.fixed_points,
        moving_points=pair.moving_points,
        spacing=pair.spacing,
        fixed_image=pair.fixed,
        moving_image=pair.moving,
        hyper=hyper,
    )
    fixed, moving = pair.features("mind")
    with torch.no_grad():
        row["mind"] = float((warp_image(moving, plain(ddf).float()) - fixed).square().mean())
    return row


def _stage_mask(pair: PreparedPair, instance) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(mask, covered)``: the similarity's mask of the pair's stages and the moving image's covered fraction
    (:meth:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization.similarity_mask`: the fixed mask with
    ``use_mask``, times the moving image's coverage)."""
    if instance.use_mask and pair.fixed_mask is None:
        raise ValueError(f"--use_mask true needs fixed masks for every pair; pair {pair.pair_id} has none.")
    return instance.similarity_mask(pair.fixed_mask if instance.use_mask else None, pair.coverage)


def prepare_stages(pair: PreparedPair, instance):
    """The stages' part of one pair that no ``(lam, mu)`` changes
    (:meth:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization.prepare`: pre-alignment, the moving
    image the network reads, the discrete start, the similarity's features: the pair's own,
    :meth:`PreparedPair.features`), computed once per pair by a sweep and passed to :func:`register_pair` at every
    grid point."""
    features = pair.features(instance.similarity) if instance.optimizes else None
    mask, covered = _stage_mask(pair, instance)
    return instance.prepare(pair.fixed.float(), pair.moving.float(), pair.spacing, mask, features, covered)


def register_pair(network: torch.nn.Module, weights, row: torch.Tensor, pair: PreparedPair, instance,
                  prepared=None, network_ddf: torch.Tensor | None = None) -> torch.Tensor:
    """The pipeline's total DDF of one pair at one row ``(1, H)``, as inference registers it
    (:meth:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization.register`: pre-alignment, the network's field
    of :meth:`PreparedPair.predict`, instance optimisation at the row's ``(lam, mu)`` started from it).

    Args:
        prepared: :func:`prepare_stages` of the pair (computed here when None).
        network_ddf: the network's field of the pair's own moving image at ``weights`` when already computed
            (reused when the pair is not pre-aligned, so the network reads that same image).

    Raises:
        ValueError: ``instance.use_mask`` and the pair has no fixed mask.
    """
    mask, _ = _stage_mask(pair, instance)  # its covered fraction is in the prepared stages' record
    if prepared is None:
        prepared = prepare_stages(pair, instance)

    def predict(moving: torch.Tensor) -> torch.Tensor:
        if network_ddf is not None and prepared.affine is None:
            return network_ddf
        with torch.no_grad():
            return pair.predict(network, weights, moving)

    return instance.register(predict, pair.fixed.float(), pair.moving.float(), row, pair.spacing, mask, prepared)


#: prefix of the network-alone columns beside the pipeline's (``network_tre_mm`` beside ``tre_mm``)
NETWORK_PREFIX = "network_"


class SweepTable:
    """The sweep's CSV, one row per (grid point, pair), appended and flushed row by row.

    On open, an existing file is read: its header must equal ``columns`` (else the file belongs to another
    configuration and is refused); a last line cut short by an interruption is dropped. :attr:`done` holds the
    ``(grid_index, pair_id)`` keys already written, which a resumed sweep skips.
    """

    def __init__(self, path: str | Path, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.done: set[tuple[int, str]] = set()
        if self.path.is_file():
            self._read_existing()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)

    def _read_existing(self) -> None:
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # the last row was being written when the sweep stopped
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text)
        lines = list(csv.reader(text.splitlines()))
        if not lines or lines[0] != self.columns:
            found = lines[0] if lines else "an empty file"
            raise ValueError(
                f"{self.path} has columns {found}, but this sweep writes {self.columns}: it belongs to another "
                "configuration. Use another --output_dir (or delete that sweep) instead of mixing the two."
            )
        index, pair = self.columns.index("grid_index"), self.columns.index("pair_id")
        self.done = {(int(values[index]), values[pair]) for values in lines[1:] if len(values) == len(self.columns)}

    def append(self, row: dict) -> None:
        """Write one row (keys = columns) and flush it to disk."""
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row[column] for column in self.columns])
            handle.flush()
        self.done.add((int(row["grid_index"]), str(row["pair_id"])))


class _Progress:
    """Progress with ETA: ``tqdm`` when installed, else a log line every ``log_every`` seconds and at the end."""

    def __init__(self, total: int, done: int, log_every: float = 30.0) -> None:
        self.total, self.done, self.log_every = total, done, log_every
        self.start = self.last_log = time.perf_counter()
        self.computed = 0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
            logger.info("sweep: %d of %d evaluations already done, %d to go.", done, total, total - done)
        else:
            self.bar = tqdm(total=total, initial=done, desc="sweep", unit="eval")

    def step(self) -> None:
        self.done += 1
        self.computed += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        if now - self.last_log >= self.log_every or self.done == self.total:
            rate = self.computed / (now - self.start)
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            logger.info("sweep: %d/%d evaluations, %.2f/s, ETA %.0f s.", self.done, self.total, rate, eta)
            self.last_log = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_grid(
    network: torch.nn.Module,
    grid: torch.Tensor,
    names: Sequence[str],
    pairs: Sequence[PreparedPair],
    table: SweepTable,
    labels: Sequence[int] = (),
    progress: bool = True,
    instance=None,
) -> int:
    """Score every (grid point, pair) not yet in ``table``; returns the number of network evaluations made.

    The hypernetwork runs once per grid point with missing rows (``generate_weights``), and its weights are
    reused for all pairs. Rows (:func:`sweep_columns`): ``grid_index``, the hyperparameters by name, ``pair_id``,
    :func:`field_metrics` of the network's field, ``seconds`` (network, warping and metrics of that row). With
    ``instance`` (an :class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`), the network's metrics are
    the ``network_<metric>`` columns (``network_seconds`` its time), and the plain columns score the pipeline
    (:func:`register_pair`), ``seconds`` the whole row's time; the stages' part that no ``(lam, mu)`` changes
    (pre-alignment, discrete start: :func:`prepare_stages`) is computed once per pair with rows to do, before its
    first row (not in ``seconds``).
    """
    grid = torch.as_tensor(grid, dtype=torch.float32)
    total = grid.shape[0] * len(pairs)
    tracker = _Progress(total, len(table.done)) if progress else None
    device = pairs[0].fixed.device
    evaluations = 0
    stages = {}  # pair_id -> prepare_stages(pair): once per pair, not per grid point
    network.eval()
    try:
        with torch.no_grad():
            for index, row in enumerate(grid):
                todo = [pair for pair in pairs if (index, pair.pair_id) not in table.done]
                if not todo:
                    continue
                hyper = dict(zip(names, (float(v) for v in row)))
                weights = network.generate_weights(row.reshape(1, -1).to(device))
                for pair in todo:
                    if instance is not None and pair.pair_id not in stages:
                        stages[pair.pair_id] = prepare_stages(pair, instance)
                    start = time.perf_counter()
                    network_ddf = pair.predict(network, weights)
                    metrics = field_metrics(network_ddf, pair, hyper, labels)
                    evaluations += 1
                    if instance is not None:
                        network_seconds = time.perf_counter() - start
                        ddf = register_pair(network, weights, row.reshape(1, -1).to(device), pair, instance,
                                            stages[pair.pair_id], network_ddf)
                        metrics = {
                            **{NETWORK_PREFIX + key: value for key, value in metrics.items()},
                            **field_metrics(ddf, pair, hyper, labels),
                            "network_seconds": network_seconds,
                        }
                    table.append(
                        {
                            "grid_index": index,
                            **hyper,
                            "pair_id": pair.pair_id,
                            **metrics,
                            "seconds": time.perf_counter() - start,
                        }
                    )
                    if tracker is not None:
                        tracker.step()
    finally:
        if tracker is not None:
            tracker.close()
    return evaluations


def sweep_columns(names: Iterable[str], labels: Sequence[int], with_points: bool, pipeline: bool = False) -> list[str]:
    """Header of the sweep CSV; ``pipeline``: the network-alone columns (``network_<metric>``,
    ``network_seconds``) before the pipeline's."""
    metrics = [*metric_columns(labels, with_points), "mind"]
    if not pipeline:
        return ["grid_index", *names, "pair_id", *metrics, "seconds"]
    network = [NETWORK_PREFIX + column for column in metrics]
    return ["grid_index", *names, "pair_id", *network, *metrics, "network_seconds", "seconds"]
