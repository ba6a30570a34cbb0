"""Test-time discovery of the regularization parameters of a trained hypernetwork, as wired by
``configs/sweep.json``: grid sweep (resumable), dataset and per-pair optima, heatmaps, gradient refinement,
physical reading; then the elastic-vs-diffusion comparison and the side-by-side pair figure.

Output folder of one sweep (``output_dir``):

* ``sweep_config.json``: what the sweep computes (model checksum, data, preprocessing, grid, columns). A later run
  with the same output folder must have the same configuration: it then resumes (computing only missing rows);
  otherwise it is refused before anything is written;
* ``sweep.csv``: one row per (grid point, pair), see :func:`~.sweep.field_metrics`;
* ``summary.json``: see :func:`~.selection.summarize`, plus ``before_registration``, ``refinement``,
  ``evaluations`` and ``model``; re-derived from the CSV on every run (a new ``--criterion`` re-ranks a finished
  sweep without recomputing it);
* ``heatmap_<metric>.png`` (``[lam, mu]`` models) or ``curve_<metric>.png`` (``[alpha]`` models).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.transforms import registration_transforms
from ..hyperparams import HyperSpace
from ..model_card import ModelCard, load_trained_network, preprocessing
from ..networks import warp_image, warp_label
from ..optimize import InstanceOptimization
from ..workflow import parse_flag
from ..workflow.datalists import pair_datalist
from .plots import plot_grid_metric, plot_pair_comparison, plot_regularizer_comparison
from .instance import instance_gain
from .refine import refine_hyper
from .selection import json_ready, physical_reading, read_sweep, resolve_criterion, summarize
from ..metrics import POINT_KINDS
from .sweep import (
    PreparedPair,
    SweepTable,
    field_metrics,
    mask_labels,
    prepare_pairs,
    run_grid,
    sweep_columns,
)

__all__ = ["ParameterSweep", "compare_sweeps", "pair_figure"]

logger = logging.getLogger("elastic_hypermorph_bundle")

CONFIG_FILE, TABLE_FILE, SUMMARY_FILE = "sweep_config.json", "sweep.csv", "summary.json"
#: metrics drawn as heatmaps/curves when the sweep has them
PLOTTED = ("dice_mean", "tre_mm", "folding_percent", "sd_log_jacobian", "elastic_energy", "lncc")
#: metrics of the elastic-vs-diffusion comparison table when both sweeps have them
COMPARED = ("dice_mean", "tre_mm", "folding_percent", "sd_log_jacobian", "energy_shear", "energy_volume", "lncc")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value) -> None:
    """Write strict JSON atomically (a sweep interrupted while writing leaves the previous file intact)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(json_ready(value), indent=4, allow_nan=False))
    os.replace(temporary, path)


def _points_kind(datalist: Sequence[dict]) -> str | None:
    """The point kind every pair has (landmarks preferred), or None."""
    return next((kind for kind in POINT_KINDS if all(f"fixed_{kind}" in pair for pair in datalist)), None)


def _mean_metrics(network, hyper: torch.Tensor, names, pairs: Sequence[PreparedPair], labels) -> dict[str, float]:
    """Mean over pairs of :func:`field_metrics` at one row (one network evaluation per pair)."""
    named = dict(zip(names, hyper[0].tolist()))
    with torch.no_grad():
        weights = network.generate_weights(hyper)
        rows = [field_metrics(network(p.network_input, weights=weights).float(), p, named, labels) for p in pairs]
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def _before_registration(pairs: Sequence[PreparedPair], labels) -> dict[str, float]:
    """Mean Dice, TRE and similarity of the pairs as given (zero displacement), for reference."""
    rows = [
        field_metrics(torch.zeros(1, p.fixed.ndim - 2, *p.fixed.shape[2:], device=p.fixed.device), p, {}, labels)
        for p in pairs
    ]
    return {key: float(np.mean([row[key] for row in rows])) for key in ("dice_mean", "tre_mm", "lncc") if key in rows[0]}


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
        instance: the test-time stages (:class:`~elastic_hypermorph_bundle.optimize.InstanceOptimization`) run
            once per pair at the selected point (the refined one, else the best grid point), their gain over the
            network alone reported in the summary's ``instance_optimization``; ``None`` or all stages off: none.
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
    ) -> None:
        self.network = network
        self.instance = instance if instance is not None and instance.enabled else None
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
        transform = registration_transforms(
            **self.preprocessing,
            with_masks=with_masks,
            with_keypoints=points == "keypoints",
            with_landmarks=points == "landmarks",
        )
        pairs = prepare_pairs(datalist, transform, self.device, points)
        return pairs, mask_labels(pairs), points

    def _identity(self, pairs, labels, points, columns) -> dict:
        return {
            "regularizer": self.space.regularizer,
            "names": list(self.space.names),
            "trained_ranges": [list(r) for r in self.space.ranges],
            "grid": self.grid.tolist(),
            "model_sha256": None if self.ckpt_path is None else _file_sha256(self.ckpt_path),
            "dataset": {
                "dataset_dir": str(Path(self.dataset_dir).resolve()),
                "split": self.split,
                "seed": self.seed,
                "split_file": None if self.split_file is None else str(Path(self.split_file).resolve()),
            },
            "preprocessing": self.preprocessing,
            "pairs": [pair.pair_id for pair in pairs],
            "labels": labels,
            "points": points,
            "columns": columns,
        }

    def _check_or_record(self, identity: dict) -> None:
        """Refuse an output folder holding a sweep of another configuration; record this one if new."""
        config_path, table_path = self.output_dir / CONFIG_FILE, self.output_dir / TABLE_FILE
        identity = json.loads(json.dumps(identity))  # compare as it reads back from disk
        if config_path.is_file():
            recorded = json.loads(config_path.read_text()).get("identity", {})
            differing = sorted(key for key in set(recorded) | set(identity) if recorded.get(key) != identity.get(key))
            if differing:
                raise ValueError(
                    f"{self.output_dir} holds a sweep with another configuration (differs in: {', '.join(differing)}); "
                    "pass another --output_dir, or delete that folder to start over. Only the same configuration "
                    "resumes."
                )
            return
        if table_path.exists():
            raise ValueError(f"{table_path} exists without {CONFIG_FILE}: not a sweep this workflow can resume.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "ckpt_path": None if self.ckpt_path is None else str(self.ckpt_path.resolve()),
            "grid_spec": self.grid_spec,
            "package_version": __version__,
        }
        _write_json(config_path, {"identity": identity, "info": info})

    def run(self) -> dict:
        """Run (or resume) the sweep, then summarise, plot and refine; returns the summary written."""
        pairs, labels, points = self.prepare()
        names = self.space.names
        columns = sweep_columns(names, labels, points is not None)
        resolve_criterion(self.criterion, columns)  # fail before the grid, not after it
        self._check_or_record(self._identity(pairs, labels, points, columns))
        table = SweepTable(self.output_dir / TABLE_FILE, columns)
        evaluations = run_grid(self.network, self.grid, names, pairs, table, labels, self.progress)

        results = read_sweep(self.output_dir / TABLE_FILE, names, num_points=self.grid.shape[0])
        summary = summarize(results, self.criterion, self.max_folding_percent, {p.pair_id: p.truth for p in pairs})
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
        _write_json(self.output_dir / SUMMARY_FILE, summary)
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
        return files


def _load_sweep(folder: str | Path) -> tuple[dict, dict, object]:
    folder = Path(folder)
    for name in (CONFIG_FILE, SUMMARY_FILE, TABLE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: run the sweep (configs/sweep.json) of that model first.")
    config = json.loads((folder / CONFIG_FILE).read_text())
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    identity = config["identity"]
    results = read_sweep(folder / TABLE_FILE, identity["names"], num_points=len(identity["grid"]))
    return config, summary, results


def compare_sweeps(
    elastic_dir: str | Path, diffusion_dir: str | Path, output_dir: str | Path, metric: str | None = None
) -> dict:
    """Best elastic vs best diffusion on the same pairs: ``comparison.csv`` (one row per regularizer: optimum and
    mean/std over pairs of each metric there), ``comparison.json`` (the same with per-pair values) and
    ``comparison.png`` (:func:`~.plots.plot_regularizer_comparison`).

    Args:
        elastic_dir, diffusion_dir: output folders of the two sweeps (``[lam, mu]`` and ``[alpha]`` models).
        output_dir: where to write the comparison.
        metric: metric of the plot; default the elastic sweep's criterion metric.

    Raises:
        ValueError: the sweeps are not an elastic and an ``[alpha]`` model, or were run on different pairs.
    """
    elastic, baseline = _load_sweep(elastic_dir), _load_sweep(diffusion_dir)
    if tuple(elastic[2].names) != ("lam", "mu") or tuple(baseline[2].names) != ("alpha",):
        raise ValueError(
            f"compare_sweeps needs an elastic [lam, mu] sweep and an [alpha] sweep, got {elastic[2].names} "
            f"and {baseline[2].names}."
        )
    # the [alpha] model is the diffusion baseline or the elastic one at fixed (lam, mu): name it as it is
    label = baseline[0]["identity"]["regularizer"]
    sweeps = {"elastic": elastic, label: baseline}
    pair_sets = {name: set(results.pair_ids) for name, (_, _, results) in sweeps.items()}
    if pair_sets["elastic"] != pair_sets[label]:
        raise ValueError(
            "the two sweeps were run on different pairs (only in elastic: "
            f"{sorted(pair_sets['elastic'] - pair_sets[label])}, only in {label}: "
            f"{sorted(pair_sets[label] - pair_sets['elastic'])}); sweep both on the same --split."
        )
    pair_ids = sweeps["elastic"][2].pair_ids
    metrics = [m for m in COMPARED if all(m in results.metrics for _, _, results in sweeps.values())]
    metric = metric or sweeps["elastic"][1]["criterion"]["metric"]
    if metric not in metrics:
        raise ValueError(f"metric {metric!r} is not in both sweeps; choose one of {metrics}.")
    table, per_pair = [], {pair_id: {} for pair_id in pair_ids}
    for name, (_, summary, results) in sweeps.items():
        best = summary["best"]["grid_index"]
        columns = [results.pair_ids.index(pair_id) for pair_id in pair_ids]
        row = {"regularizer": name, **results.hyper(best), "criterion": summary["criterion"]["name"]}
        for key in metrics:
            values = results.metrics[key][best, columns]
            row[f"{key}_mean"], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
            for pair_id, value in zip(pair_ids, values):
                per_pair[pair_id].setdefault(key, {})[name] = float(value)
        row.update({f"physics_{k}": v for k, v in physical_reading(results.hyper(best)).items() if k != "undefined"})
        table.append(row)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in table for key in row)))
        writer.writeheader()
        writer.writerows(table)
    plot = plot_regularizer_comparison(
        elastic[1], baseline[1], {p: v[metric] for p, v in per_pair.items()}, metric, output_dir / "comparison.png",
        baseline=label,
    )
    result = {"metric": metric, "pairs": pair_ids, "table": table, "per_pair": per_pair, "figure": plot.name,
              "sweeps": {"elastic": str(elastic_dir), label: str(diffusion_dir)}}
    _write_json(output_dir / "comparison.json", result)
    return result


def pair_figure(
    elastic_dir: str | Path,
    diffusion_dir: str | Path,
    output_dir: str | Path,
    pair_id: str | None = None,
    device: torch.device | str | None = None,
    axis: int = 1,
) -> Path:
    """Figure 4 of the paper for one pair: fixed, moving, warped (mask contours), deformation grid and ``det J``,
    for the best elastic setting (row 1) and the best setting of the ``[alpha]`` model (row 2, labelled by its
    regularizer) of two finished sweeps.

    The models come from the sweeps' checkpoints (``model.json`` next to each gives the architecture); each row
    preprocesses the pair as its own sweep did. Writes ``output_dir/pair_<pair_id>.png``.

    Args:
        pair_id: pair to draw; default the first pair of the sweep.
        axis: spatial axis the slice is taken across.
    """
    elastic, baseline = _load_sweep(elastic_dir), _load_sweep(diffusion_dir)
    sweeps = {"elastic": elastic, baseline[0]["identity"]["regularizer"]: baseline}
    pair_id = pair_id or elastic[0]["identity"]["pairs"][0]
    for name, (config, _, _) in sweeps.items():
        if pair_id not in config["identity"]["pairs"]:
            raise ValueError(f"pair {pair_id!r} is not in the {name} sweep (pairs: {config['identity']['pairs']}).")
    device = torch.device(device) if device is not None else torch.device("cpu")
    rows = []
    for name, (config, summary, results) in sweeps.items():
        identity = config["identity"]
        data = identity["dataset"]
        datalist = [p for p in pair_datalist(data["dataset_dir"], data["split"], data["seed"], data["split_file"])
                    if p["pair_id"] == pair_id]
        # each model sees the pair as its own sweep (and its training) preprocessed it
        transform = registration_transforms(**identity["preprocessing"], with_masks=bool(identity["labels"]),
                                            with_keypoints=False)
        pair = prepare_pairs(datalist, transform, device)[0]
        network = load_trained_network(config["info"]["ckpt_path"], device=device)
        hyper = torch.tensor([[summary["best"][n] for n in results.names]], device=device)
        with torch.no_grad():
            ddf = network(pair.network_input, hyper).float()
        text = ", ".join(f"{n}={summary['best'][n]:.3g}" for n in results.names)
        rows.append({
            "label": f"{name} ({text})",
            "ddf": ddf,
            "warped": warp_image(pair.moving, ddf),
            "warped_mask": None if pair.moving_mask is None else warp_label(pair.moving_mask.round(), ddf),
            "fixed": pair.fixed, "moving": pair.moving, "fixed_mask": pair.fixed_mask, "moving_mask": pair.moving_mask,
        })
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    return plot_pair_comparison(first["fixed"], first["moving"], rows, output_dir / f"pair_{pair_id}.png",
                                first["fixed_mask"], first["moving_mask"], axis=axis)
