"""The sweep that ``configs/sweep.json`` runs: :class:`ParameterSweep` sweeps a trained hypernetwork over a grid of
its hyperparameters (resumable), chooses the dataset and per-pair optima, refines the best point by gradient
descent, measures the test-time stages there, and draws the heatmaps.

Its output folder (files, identity check, resume) is :mod:`.store`'s: ``sweep_config.json``, ``sweep.csv``, and
``summary.json`` (:func:`~.selection.summarize`, plus ``before_registration``, ``refinement``,
``instance_optimization``, ``evaluations``, ``model`` and ``figures``; re-derived from the CSV on every run, so a
new ``--criterion`` re-ranks a finished sweep without recomputing it), and here ``heatmap_<metric>.png``
(``[lam, mu]`` models) or ``curve_<metric>.png`` (``[alpha]`` models). The comparison with a baseline is
:mod:`.comparison`'s.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch

from .. import __version__
from ..atomic import atomic_write_json
from ..data.transforms import REGISTRATION_GRIDS, registration_transforms
from ..hyperparams import HyperSpace
from ..metrics import POINT_KINDS
from ..model_card import ModelCard, preprocessing
from ..model_card import network_grid as model_network_grid
from ..flags import parse_flag
from ..optimize import level_steps
from ..workflow.instance import InstanceOptimization
from ..workflow.datalists import pair_datalist
from .instance import instance_gain
from .parallel import merge_parts, part_path, share
from .plots import plot_grid_metric, plot_material_recovery, plot_per_pair_optima, plot_pipeline_heatmaps
from .refine import refine_hyper
from .selection import UNSUPERVISED_SCORES, physical_reading, read_sweep, resolve_criterion, summarize
from .store import SUMMARY_FILE, TABLE_FILE, check_or_record, file_sha256
from .sweep import PreparedPair, SweepTable, field_metrics, mask_labels, prepare_pairs, run_grid, sweep_columns

__all__ = ["ParameterSweep", "PLOTTED"]

logger = logging.getLogger("elastic_hypermorph_bundle")

#: metrics drawn as heatmaps/curves when the sweep has them
PLOTTED = ("dice_mean", "tre_mm", "folding_percent", "sd_log_jacobian", "elastic_energy", "lncc")


def _points_kind(datalist: Sequence[dict]) -> str | None:
    """The point kind every pair has (landmarks preferred), or None."""
    return next((kind for kind in POINT_KINDS if all(f"fixed_{kind}" in pair for pair in datalist)), None)


def _mean_metrics(network, hyper: torch.Tensor, names, pairs: Sequence[PreparedPair], labels) -> dict[str, float]:
    """Mean over pairs of :func:`field_metrics` at one row (one network evaluation per pair)."""
    named = dict(zip(names, hyper[0].tolist()))
    with torch.no_grad():
        weights = network.generate_weights(hyper)
        rows = [field_metrics(p.predict(network, weights), p, named, labels) for p in pairs]
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def _before_registration(pairs: Sequence[PreparedPair], labels) -> dict[str, float]:
    """Mean Dice, TRE and similarity of the pairs as given (zero displacement), for reference."""
    rows = [
        field_metrics(torch.zeros(1, p.fixed.ndim - 2, *p.fixed.shape[2:], device=p.fixed.device), p, {}, labels)
        for p in pairs
    ]
    return {key: float(np.mean([row[key] for row in rows])) for key in ("dice_mean", "tre_mm", "lncc") if key in rows[0]}


def _settings(instance: InstanceOptimization | None) -> dict | None:
    """The test-time stages' settings (None when off), as recorded in the sweep's identity and summary."""
    if instance is None:
        return None
    return {"steps": list(instance.steps), "similarity": instance.similarity, "levels": instance.levels,
            "grid": instance.grid, "lr": instance.lr, "smooth": instance.smooth, "prealign": instance.prealign,
            "prealign_steps": instance.prealign_steps, "use_mask": instance.use_mask,
            "coverage_mask": instance.coverage_mask,
            "diffeomorphic": instance.diffeomorphic, "select_start": instance.select_start,
            "discrete": instance.discrete}


class ParameterSweep:
    """Sweep a trained model over a grid of its hyperparameters on one split, choose the best point (dataset and
    per pair), refine it by gradient descent, and write the results (see the module docstring).

    Args:
        network: the trained network (e.g. :func:`load_trained_network`), on ``device``.
        hyper_space: the model's hyperparameter space (trained ranges, e.g. from ``model.json``).
        dataset_dir, split, seed, split_file: the pairs (``workflow.datalists.pair_datalist``).
        output_dir: output folder (see the module docstring).
        ckpt_path: the weights' file (its checksum identifies the model in ``sweep_config.json``).
        spatial_size, pixdim, hu_window: preprocessing (``registration_transforms``), as in training: checked
            against the model card beside ``ckpt_path``, a difference refused unless
            ``allow_preprocessing_mismatch``.
        grid_size: points per hyperparameter (an int, or one per hyperparameter).
        grid_low, grid_high: sub-range to zoom into (default the trained range), e.g. ``[0, 0]`` and
            ``[0.5, 0.1]`` for the paper's zoom.
        criterion: ``"auto"``, ``"dice"``, ``"tre"`` or ``"similarity"`` (see :mod:`.selection`).
        max_folding_percent: folding bound of the ``"similarity"`` criterion.
        refine_steps, refine_lr: gradient refinement from the best grid point (0 steps: none); refinement needs the
            ``"dice"`` or ``"tre"`` criterion.
        instance: the test-time stages of inference (:class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`).
            When on, every grid row scores the pipeline (pre-alignment, network, instance optimisation at the row's
            ``(lam, mu)``, warm-started from the network's field) with ``instance_steps`` steps, the
            network alone beside it (``network_<metric>`` columns); and at the selected point the stages run once
            more with inference's own settings, reported in the summary's ``instance_optimization``. ``None`` or
            all stages off: the sweep scores the network alone.
        instance_steps: Adam steps of the sweep's rows, one number for every level or one per level, as
            inference's (:func:`~elastic_hypermorph_bundle.optimize.level_steps`; a short optimisation whose ranking
            follows the full one's, docs/discovery.md); ``None``: inference's ``instance.steps``; on each level never
            more than inference's (with no steps there the rows have no optimisation, as inference).
        registration_grid: where the pairs are registered and scored, as inference: ``"image"`` (the images' own
            grid; the network reads its trained grid through
            :class:`~elastic_hypermorph_bundle.networks.grid.NetworkGrid`) or ``"network"`` (the training
            preprocessing).
        max_sd_log_jacobian: SD log J bound of the ``"similarity"`` criterion and of the unsupervised per-pair
            choice (None: no bound).
        unsupervised_score: the score the unsupervised per-pair choice optimises under those bounds
            (:data:`~.selection.UNSUPERVISED_SCORES`: ``"lncc"``, ``"mind"`` or ``"objective"``; measured in
            docs/discovery.md).
        device: where pairs are cached and the network runs (default: the network's device).
        progress: show progress with ETA.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        hyper_space: HyperSpace,
        dataset_dir: str | Path,
        output_dir: str | Path,
        split: str = "test",
        ckpt_path: str | Path | None = None,
        seed: int = 0,
        split_file: str | Path | None = None,
        spatial_size: Sequence[int] | None = None,
        pixdim: Sequence[float] | None = None,
        hu_window: Sequence[float] = (-1000.0, 500.0),
        allow_preprocessing_mismatch: bool = False,
        grid_size: int | Sequence[int] = 11,
        grid_low: Sequence[float] | None = None,
        grid_high: Sequence[float] | None = None,
        criterion: str = "auto",
        max_folding_percent: float = 0.5,
        refine_steps: int = 30,
        refine_lr: float = 0.1,
        device: torch.device | str | None = None,
        progress: bool = True,
        instance: InstanceOptimization | None = None,
        instance_steps: int | Sequence[int] | None = None,
        registration_grid: str = "image",
        max_sd_log_jacobian: float | None = None,
        unsupervised_score: str = "lncc",
    ) -> None:
        self.network = network
        self.instance = instance if instance is not None and instance.enabled else None
        self.pipeline = None  # the stages of the sweep's rows: inference's, with the sweep's (fewer) steps
        if self.instance is not None:
            self.pipeline = copy.copy(self.instance)
            if instance_steps is not None:  # the sweep's steps of each level, never more than inference's
                steps = level_steps(instance_steps, self.instance.levels, "sweep_instance_steps")
                self.pipeline.steps = tuple(min(own, full) for own, full in zip(steps, self.instance.steps))
        if registration_grid not in REGISTRATION_GRIDS:
            raise ValueError(f"registration_grid must be one of {REGISTRATION_GRIDS}, got {registration_grid!r}.")
        self.registration_grid = registration_grid
        self.max_sd_log_jacobian = None if max_sd_log_jacobian is None else float(max_sd_log_jacobian)
        if unsupervised_score not in UNSUPERVISED_SCORES:
            raise ValueError(f"unsupervised_score must be one of {tuple(UNSUPERVISED_SCORES)}, got {unsupervised_score!r}.")
        self.unsupervised_score = unsupervised_score
        self.space = hyper_space
        self.dataset_dir, self.split, self.seed, self.split_file = dataset_dir, split, seed, split_file
        self.output_dir = Path(output_dir)
        self.ckpt_path = None if ckpt_path is None else Path(ckpt_path)
        self.preprocessing = preprocessing(spatial_size, pixdim, hu_window)
        allow = parse_flag("allow_preprocessing_mismatch", allow_preprocessing_mismatch)
        card = None if self.ckpt_path is None else ModelCard.next_to(self.ckpt_path)
        if card is not None:
            card.check_preprocessing(**self.preprocessing, allow_mismatch=allow)
        self.grid = hyper_space.grid(grid_size, grid_low, grid_high)  # refuses a zoom outside the trained range
        self.grid_spec = {"size": grid_size, "low": grid_low, "high": grid_high}
        self.criterion = criterion
        self.max_folding_percent = float(max_folding_percent)
        self.refine_steps, self.refine_lr = int(refine_steps), float(refine_lr)
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.progress = parse_flag("progress", progress)

    def prepare(self) -> tuple[list[PreparedPair], list[int], str | None]:
        """Load and preprocess every pair of the split once: ``(pairs, mask labels, point kind)``."""
        datalist = pair_datalist(self.dataset_dir, self.split, seed=self.seed, split_file=self.split_file)
        with_masks = all("fixed_mask" in pair and "moving_mask" in pair for pair in datalist)
        points = _points_kind(datalist)
        on_image_grid = self.registration_grid == "image"
        grid_options = {"hu_window": self.preprocessing["hu_window"]} if on_image_grid else self.preprocessing
        transform = registration_transforms(
            **grid_options,
            with_masks=with_masks,
            with_keypoints=points == "keypoints",
            with_landmarks=points == "landmarks",
        )
        network_grid = None
        if on_image_grid:  # as inference's: the card's pixdim, else the training images' voxel size it records
            network_grid = model_network_grid(self.preprocessing["spatial_size"], self.preprocessing["pixdim"],
                                              self.ckpt_path)
        pairs = prepare_pairs(datalist, transform, self.device, points, network_grid)
        return pairs, mask_labels(pairs), points

    def _identity(self, pairs, labels, points, columns) -> dict:
        return {
            "regularizer": self.space.regularizer,
            "names": list(self.space.names),
            "trained_ranges": [list(r) for r in self.space.ranges],
            "grid": self.grid.tolist(),
            "model_sha256": None if self.ckpt_path is None else file_sha256(self.ckpt_path),
            "dataset": {
                "dataset_dir": str(Path(self.dataset_dir).resolve()),
                "split": self.split,
                "seed": self.seed,
                "split_file": None if self.split_file is None else str(Path(self.split_file).resolve()),
            },
            "preprocessing": self.preprocessing,
            "registration": {"grid": self.registration_grid, "pipeline": _settings(self.pipeline)},
            "pairs": [pair.pair_id for pair in pairs],
            "labels": labels,
            "points": points,
            "columns": columns,
        }

    def _check_or_record(self, identity: dict) -> None:
        info = {
            "ckpt_path": None if self.ckpt_path is None else str(self.ckpt_path.resolve()),
            "grid_spec": self.grid_spec,
            "package_version": __version__,
        }
        check_or_record(self.output_dir, identity, info)

    def run(self) -> dict:
        """Run (or resume) the sweep, then summarise, plot and refine; returns the summary written. Under
        ``torchrun`` (``configs/multi_gpu_sweep.json``) the pairs are split across the processes and their rows
        merged into the one table (:mod:`.parallel`); process 0 then summarises (the others return ``{}``)."""
        pairs, labels, points = self.prepare()
        names = self.space.names
        columns = sweep_columns(names, labels, points is not None, pipeline=self.pipeline is not None)
        resolve_criterion(self.criterion, columns)  # fail before the grid, not after it
        rank, processes, path = idist.get_rank(), idist.get_world_size(), self.output_dir / TABLE_FILE
        order = [pair.pair_id for pair in pairs]
        if rank == 0:
            self._check_or_record(self._identity(pairs, labels, points, columns))
            merge_parts(path, columns, order)  # the rows of an interrupted run across processes
        if processes == 1:
            table, mine = SweepTable(path, columns), pairs
        else:  # this process's pairs, its rows streamed to its own part of the table (.parallel)
            idist.barrier()
            mine = share(pairs)
            table = SweepTable(part_path(path, rank), columns)
            ids = {pair.pair_id for pair in mine}
            if path.is_file():
                table.done |= {key for key in SweepTable(path, columns).done if key[1] in ids}
        evaluations = run_grid(self.network, self.grid, names, mine, table, labels, self.progress and rank == 0,
                               self.pipeline) if mine else 0
        if processes > 1:
            evaluations = int(idist.all_reduce(evaluations))  # also waits for every process's rows
            if rank == 0:
                merge_parts(path, columns, order)
            idist.barrier()
            if rank != 0:  # process 0 summarises, refines and plots, as one process would
                return {}

        results = read_sweep(self.output_dir / TABLE_FILE, names, num_points=self.grid.shape[0])
        summary = summarize(results, self.criterion, self.max_folding_percent, {p.pair_id: p.truth for p in pairs},
                            self.max_sd_log_jacobian, self.unsupervised_score)
        summary["registration"] = {
            "grid": self.registration_grid,
            "pipeline": _settings(self.pipeline),
            "seconds_per_row": float(np.mean(results.seconds)) if results.seconds is not None else None,
        }
        summary["model"] = {
            "regularizer": self.space.regularizer,
            "trained_ranges": self.space.to_dict()["ranges"],
            "ckpt_path": None if self.ckpt_path is None else str(self.ckpt_path),
        }
        summary["points"] = points
        summary["before_registration"] = _before_registration(pairs, labels)
        summary["evaluations"] = {"grid": int(self.grid.shape[0] * len(pairs)), "grid_computed_this_run": evaluations}
        summary["refinement"] = self._refine(pairs, labels, summary)
        summary["instance_optimization"] = self._instance(pairs, labels, summary)
        summary["figures"] = self._plot(summary)
        atomic_write_json(self.output_dir / SUMMARY_FILE, summary)
        best = summary["best"]
        logger.info(
            "sweep %s: best %s by %s, mean %s = %.4g (%d of %d evaluations computed this run)",
            self.output_dir, {n: round(best[n], 4) for n in names}, summary["criterion"]["name"],
            summary["criterion"]["metric"], best["mean"][summary["criterion"]["metric"]], evaluations,
            summary["evaluations"]["grid"],
        )
        return summary

    def _refine(self, pairs, labels, summary: dict) -> dict:
        criterion = summary["criterion"]["name"]
        if self.refine_steps == 0:
            return {"skipped": "refine_steps is 0."}
        if self.pipeline is not None:
            return {"skipped": "the sweep scores the pipeline, whose instance optimisation the gradient refinement "
                               "(through the network alone) does not differentiate; its optimum is the grid's."}
        if criterion not in ("dice", "tre"):
            return {"skipped": f"gradient refinement needs a supervised criterion (dice or tre), not {criterion!r}."}
        names = self.space.names
        start = torch.tensor([[summary["best"][n] for n in names]], device=self.device)
        result = refine_hyper(
            self.network, self.space, pairs, start, criterion, labels, self.refine_steps, self.refine_lr
        )
        refined_row = torch.tensor([[result["refined"][n] for n in names]], device=self.device)
        refined_metrics = _mean_metrics(self.network, refined_row, names, pairs, labels)
        result["evaluations"] = {  # network passes: the whole grid vs the refinement (+ its final metrics)
            "grid": summary["evaluations"]["grid"],
            "refinement": result.pop("network_evaluations") + len(pairs),
        }
        result["grid_optimum"] = {
            **result["start"],
            "objective": result["start_objective"],
            "mean": summary["best"]["mean"],
            "physics": summary["best"]["physics"],
        }
        result["refined_optimum"] = {
            **result["refined"],
            "objective": result["objective"],
            "mean": refined_metrics,
            "physics": physical_reading(result["refined"]),
        }
        return result

    def _instance(self, pairs, labels, summary: dict) -> dict:
        if self.instance is None:
            return {"skipped": "instance_steps is 0 and prealign is none."}
        point = summary["refinement"].get("refined") or {n: summary["best"][n] for n in self.space.names}
        row = torch.tensor([[point[n] for n in self.space.names]], device=self.device)
        result = instance_gain(self.network, row, self.space.names, pairs, labels, self.instance)
        logger.info("instance optimisation at %s: %s", point, {k: round(v, 4) for k, v in result["gain"].items()
                                                                if k in ("tre_mm", "dice_mean", "folding_percent")})
        return result

    def _plot(self, summary: dict) -> list[str]:
        names = self.space.names
        kind = "heatmap" if len(names) == 2 else "curve"
        files = []
        for metric in PLOTTED:
            values = [point.get(metric) for point in summary["grid"]]
            if all(value is None or (isinstance(value, float) and math.isnan(value)) for value in values):
                continue
            path = self.output_dir / f"{kind}_{metric}.png"
            plot_grid_metric(summary["grid"], names, metric, summary["best"], path, summary["criterion"]["name"])
            files.append(path.name)
            if kind == "heatmap" and "network_only" in summary and f"network_{metric}" in summary["grid"][0]:
                path = self.output_dir / f"pipeline_{metric}.png"
                network_best = summary["network_only"]["best"] if metric == summary["criterion"]["metric"] else None
                plot_pipeline_heatmaps(summary["grid"], names, metric, summary["best"], path, network_best,
                                       summary["registration"]["pipeline"]["steps"])
                files.append(path.name)
        unsupervised = summary.get("unsupervised", {})
        if kind == "heatmap" and "oracle" in next(iter(unsupervised.get("per_pair", [])), {}):
            path = self.output_dir / "per_pair_optima.png"
            low, high = self.grid.min(0).values.tolist(), self.grid.max(0).values.tolist()
            plot_per_pair_optima([p["oracle"] for p in unsupervised["per_pair"]], unsupervised["per_pair"], names,
                                 low, high, path)
            files.append(path.name)
        if kind == "heatmap" and any(p.get("truth") for p in summary["per_pair"]):
            path = self.output_dir / "material_recovery.png"
            entries = {f"{summary['criterion']['name']} optimum": summary["material_correlation"]["poisson_ratio"]}
            if "material_correlation" in unsupervised:
                entries[f"unsupervised ({unsupervised['score']})"] = unsupervised["material_correlation"]["poisson_ratio"]
            plot_material_recovery(entries, path)
            files.append(path.name)
        return files
