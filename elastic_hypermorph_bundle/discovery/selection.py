"""Reading a sweep table and choosing hyperparameters from it: criteria, grid means, dataset and per-pair optima,
the physical reading of a Lamé pair, and whether discovered materials track the true ones.

Criteria (``criterion``):

* ``"dice"``: maximal mean Dice (``dice_mean``) of the warped moving masks;
* ``"tre"``: minimal mean target registration error (``tre_mm``);
* ``"similarity"`` (unsupervised, for data without masks or points): maximal local NCC (``lncc``) of the warped
  moving and the fixed image among the grid points whose mean % folded voxels is at most ``max_folding_percent``
  and whose mean SD of log J is at most ``max_sd_log_jacobian`` (per pair: that pair's own). Similarity alone
  always prefers the weakest regularization; the smoothness bounds are what make the choice meaningful. If no
  point meets them, the least folding point (ties: the smoothest) is chosen and the summary says so.
* ``"auto"``: ``"dice"`` with masks, else ``"tre"`` with points, else ``"similarity"``.

The per-pair choice without labels (:func:`unsupervised_choice`) ranks each pair's grid points by a label-free
score (:data:`UNSUPERVISED_SCORES`) under the same smoothness bounds: ``"lncc"`` (max local NCC), ``"mind"`` (min
MIND-SSC dissimilarity, the instance optimisation's own similarity) or ``"objective"`` (min of the optimisation's
objective at one reference ``(lam_r, mu_r)`` for every point: ``mind + lam_r * energy_volume + mu_r *
energy_shear``, so points are compared on one scale; reference: the centre of the swept grid).

Ties go to the first grid point in grid order (``numpy.argmax``), so the choice is reproducible from the CSV.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from ..physics import young_poisson_from_lame

__all__ = [
    "CRITERIA",
    "SweepResults",
    "read_sweep",
    "resolve_criterion",
    "choose",
    "physical_reading",
    "material_correlation",
    "summarize",
    "unsupervised_choice",
    "UNSUPERVISED_SCORES",
]

CRITERIA = ("auto", "dice", "tre", "similarity")
#: criterion -> (metric column, +1 to maximise / -1 to minimise)
CRITERION_METRICS = {"dice": ("dice_mean", 1.0), "tre": ("tre_mm", -1.0), "similarity": ("lncc", 1.0)}
#: label-free per-pair scores of :func:`unsupervised_choice`: name -> (direction, +1 maximise / -1 minimise)
UNSUPERVISED_SCORES = {"lncc": 1.0, "mind": -1.0, "objective": -1.0}
_NOT_METRICS = ("grid_index", "pair_id", "seconds", "network_seconds")
#: prefix of the network-alone columns of a pipeline sweep (:func:`~.sweep.sweep_columns`)
NETWORK_PREFIX = "network_"


@dataclass
class SweepResults:
    """A complete sweep table as arrays: ``grid`` ``(G, H)`` hyperparameter rows (by ``grid_index``), ``pair_ids``
    ``P`` pairs in first-seen order, ``metrics[name]`` ``(G, P)``, ``seconds`` ``(G, P)`` each row's time (None
    when the table has none)."""

    names: tuple[str, ...]
    grid: np.ndarray
    pair_ids: list[str]
    metrics: dict[str, np.ndarray]
    seconds: np.ndarray | None = None

    def hyper(self, index: int) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self.names, self.grid[index])}


def read_sweep(path: str | Path, names: Sequence[str], num_points: int | None = None) -> SweepResults:
    """Read a sweep CSV (:class:`~.sweep.SweepTable`) into arrays.

    Raises:
        ValueError: a (grid point, pair) row is missing or repeated, or the hyperparameter columns are absent.
    """
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} holds no sweep rows.")
    missing = [name for name in names if name not in rows[0]]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing} for hyperparameters {list(names)}.")
    pair_ids = list(dict.fromkeys(row["pair_id"] for row in rows))
    num_points = num_points or 1 + max(int(row["grid_index"]) for row in rows)
    metric_names = [key for key in rows[0] if key not in _NOT_METRICS and key not in names]
    grid = np.full((num_points, len(names)), np.nan)
    metrics = {key: np.full((num_points, len(pair_ids)), np.nan) for key in metric_names}
    seconds = np.full((num_points, len(pair_ids)), np.nan) if "seconds" in rows[0] else None
    seen = np.zeros((num_points, len(pair_ids)), dtype=int)
    column = {pair_id: j for j, pair_id in enumerate(pair_ids)}
    for row in rows:
        index, j = int(row["grid_index"]), column[row["pair_id"]]
        seen[index, j] += 1
        grid[index] = [float(row[name]) for name in names]
        for key in metric_names:
            metrics[key][index, j] = float(row[key])
        if seconds is not None:
            seconds[index, j] = float(row["seconds"])
    if (seen != 1).any():
        index, j = np.argwhere(seen != 1)[0]
        count = seen[index, j]
        raise ValueError(
            f"{path} is not a complete sweep: grid point {index} x pair {pair_ids[j]} has {count} rows (want 1); "
            "run the sweep again to resume it."
        )
    return SweepResults(tuple(names), grid, pair_ids, metrics, seconds)


def resolve_criterion(criterion: str, metrics: Sequence[str]) -> str:
    """The concrete criterion for ``criterion`` given the available metric columns."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    if criterion == "auto":
        return next(c for c in ("dice", "tre", "similarity") if CRITERION_METRICS[c][0] in metrics)
    metric = CRITERION_METRICS[criterion][0]
    if metric not in metrics:
        need = {"dice": "masks", "tre": "keypoints or landmarks"}[criterion]
        raise ValueError(
            f"criterion {criterion!r} needs {metric!r}, which this sweep has not got (no {need} in the split); "
            "use --criterion similarity (unsupervised, bounded folding) or 'auto'."
        )
    return criterion


def choose(
    scores: np.ndarray,
    sign: float,
    folding: np.ndarray | None = None,
    max_folding: float = math.inf,
    sd_log_jacobian: np.ndarray | None = None,
    max_sd_log_jacobian: float | None = None,
) -> int:
    """Index of the best of ``scores`` ``(G,)`` (``sign`` +1 maximise, -1 minimise; first on ties) among the points
    with ``folding <= max_folding`` and ``sd_log_jacobian <= max_sd_log_jacobian`` (a bound whose values are None
    is not applied); if none qualifies, the least folding point (ties: the smoothest by SD log J)."""
    scores = sign * np.asarray(scores, dtype=float)
    if folding is not None:
        feasible = np.asarray(folding) <= max_folding
        if sd_log_jacobian is not None and max_sd_log_jacobian is not None:
            feasible &= np.asarray(sd_log_jacobian) <= max_sd_log_jacobian
        if not feasible.any():
            smoothness = np.zeros(len(folding)) if sd_log_jacobian is None else np.asarray(sd_log_jacobian, float)
            return int(np.lexsort((smoothness, np.asarray(folding, float)))[0])
        scores = np.where(feasible, scores, -np.inf)
    return int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))


def physical_reading(hyper: Mapping[str, float]) -> dict:
    """Poisson ratio ``nu``, ``lam / mu`` and Young's modulus ``E`` (unit of ``lam``, ``mu``) of a Lamé pair;
    ``{}`` for an ``[alpha]`` row. Values with no admissible material (``mu = 0``) are None with a reason."""
    if set(hyper) != {"lam", "mu"}:
        return {}
    lam, mu = float(hyper["lam"]), float(hyper["mu"])
    reading = {"poisson_ratio": None, "lam_over_mu": lam / mu if mu > 0 else None, "youngs_modulus": None}
    try:
        reading["youngs_modulus"], reading["poisson_ratio"] = young_poisson_from_lame(lam, mu)
    except ValueError as error:
        reading["undefined"] = str(error)
    return reading


def _true_value(record: Mapping | None, quantity: str) -> float | None:
    """``quantity`` (``poisson_ratio`` or ``lam_over_mu``) of a simulation record (``lam``, ``mu``, optionally
    ``poisson_ratio``/``nu``)."""
    if not isinstance(record, Mapping):
        return None
    if quantity == "poisson_ratio":
        for key in ("poisson_ratio", "nu"):
            if record.get(key) is not None:
                return float(record[key])
    if record.get("lam") is None or record.get("mu") is None:
        return None
    return physical_reading({"lam": record["lam"], "mu": record["mu"]}).get(quantity)


def material_correlation(per_pair: Sequence[dict]) -> dict:
    """Pearson and Spearman correlation, across pairs, of the discovered per-pair material (``physics`` of each
    per-pair optimum) with the true material of the case (``truth``: the dataset's simulation record), for the
    Poisson ratio and for ``lam / mu``. Each entry lists the values it used; ``pearson_r`` and ``spearman_r`` are
    None with a ``reason`` when fewer than 3 pairs have both values or one side is constant."""
    result = {}
    for quantity in ("poisson_ratio", "lam_over_mu"):
        used, discovered, true = [], [], []
        for pair in per_pair:
            found, actual = pair.get("physics", {}).get(quantity), _true_value(pair.get("truth"), quantity)
            if found is not None and actual is not None and math.isfinite(found) and math.isfinite(actual):
                used.append(pair["pair_id"])
                discovered.append(float(found))
                true.append(float(actual))
        entry = {"pearson_r": None, "p_value": None, "spearman_r": None, "n_cases": len(used), "pairs": used,
                 "discovered": discovered, "true": true}
        if not any(pair.get("truth") for pair in per_pair):
            entry["reason"] = "no pair has a simulation record (true material) in the dataset."
        elif len(used) < 3:
            entry["reason"] = f"{len(used)} pair(s) have both a discovered and a true {quantity}; need at least 3."
        elif np.ptp(discovered) == 0 or np.ptp(true) == 0:
            side = "discovered" if np.ptp(discovered) == 0 else "true"
            entry["reason"] = f"the {side} {quantity} is the same for every pair; the correlation is undefined."
        else:
            r, p = pearsonr(discovered, true)
            entry["pearson_r"], entry["p_value"] = float(r), float(p)
            entry["spearman_r"] = float(spearmanr(discovered, true)[0])
        result[quantity] = entry
    return result


def _network_only(results: SweepResults) -> SweepResults | None:
    """The network-alone columns of a pipeline sweep under their plain names, or None for a network-only sweep."""
    metrics = {key[len(NETWORK_PREFIX):]: values for key, values in results.metrics.items()
               if key.startswith(NETWORK_PREFIX)}
    return SweepResults(results.names, results.grid, results.pair_ids, metrics) if metrics else None


def unsupervised_scores(results: SweepResults, reference: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """The label-free scores ``(G, P)`` of :data:`UNSUPERVISED_SCORES` that the table's columns allow: ``lncc``,
    ``mind``, and ``objective = mind + lam_r energy_volume + mu_r energy_shear`` at ``reference`` ``(lam_r,
    mu_r)`` (default: the centre of the grid's range; elastic sweeps only)."""
    scores = {name: results.metrics[name] for name in ("lncc", "mind") if name in results.metrics}
    energies = ("mind", "energy_volume", "energy_shear")
    if results.names == ("lam", "mu") and all(name in results.metrics for name in energies):
        lam_r, mu_r = (results.grid.min(0) + results.grid.max(0)) / 2 if reference is None else reference
        scores["objective"] = (results.metrics["mind"] + lam_r * results.metrics["energy_volume"]
                               + mu_r * results.metrics["energy_shear"])
    return scores


def unsupervised_choice(
    results: SweepResults, max_folding_percent: float = 0.5, max_sd_log_jacobian: float | None = None,
    score: str = "lncc", reference: Sequence[float] | None = None,
) -> dict:
    """Each pair's own ``(lam, mu)`` chosen without labels: the best ``score`` (:func:`unsupervised_scores`) under
    its own folding and SD log J bounds (:func:`choose`). With ``tre_mm`` in the table (simulated pairs with
    ground truth), also its regret against the oracle, each pair's TRE-best point: ``regret_percent = 100 (mean
    TRE at the choices / mean TRE at the oracles - 1)``, and the same for every other available score
    (``alternatives``: ``mean_tre_mm``, ``regret_percent``, ``grid_index`` per pair).

    Returns:
        ``score``, ``bounds``, ``per_pair`` (``pair_id``, ``grid_index``, parameters, ``feasible`` (the choice
        meets both bounds), metrics there, ``physics``; with TRE also ``oracle`` grid index, parameters and TRE),
        and with TRE ``mean_tre_mm``, ``oracle_mean_tre_mm``, ``regret_percent``, ``alternatives``.

    Raises:
        ValueError: ``score`` unknown, or not computable from this table's columns.
    """
    if score not in UNSUPERVISED_SCORES:
        raise ValueError(f"unsupervised score must be one of {tuple(UNSUPERVISED_SCORES)}, got {score!r}.")
    scores = unsupervised_scores(results, reference)
    if score not in scores:
        raise ValueError(f"unsupervised score {score!r} needs columns this sweep has not got (it has {sorted(scores)}).")
    folding, sdlogj = results.metrics["folding_percent"], results.metrics.get("sd_log_jacobian")
    if sdlogj is None:
        sdlogj = np.zeros_like(folding)
    tre = results.metrics.get("tre_mm")

    def pick(name: str, j: int) -> int:
        return choose(scores[name][:, j], UNSUPERVISED_SCORES[name], folding[:, j], max_folding_percent,
                      sdlogj[:, j], max_sd_log_jacobian)

    chosen = []
    for j, pair_id in enumerate(results.pair_ids):
        g = pick(score, j)
        entry = {
            "pair_id": pair_id,
            "grid_index": g,
            **results.hyper(g),
            "feasible": bool(folding[g, j] <= max_folding_percent
                             and (max_sd_log_jacobian is None or sdlogj[g, j] <= max_sd_log_jacobian)),
            "metrics": {key: float(values[g, j]) for key, values in results.metrics.items()},
            "physics": physical_reading(results.hyper(g)),
        }
        if tre is not None:
            oracle = int(np.nanargmin(tre[:, j]))
            entry["oracle"] = {"grid_index": oracle, **results.hyper(oracle), "tre_mm": float(tre[oracle, j])}
        chosen.append(entry)
    result: dict = {
        "score": score,
        "bounds": {"max_folding_percent": max_folding_percent, "max_sd_log_jacobian": max_sd_log_jacobian},
        "per_pair": chosen,
    }
    if score == "objective":
        result["reference"] = [float(v) for v in ((results.grid.min(0) + results.grid.max(0)) / 2
                                                  if reference is None else reference)]
    if tre is not None:
        at_oracle = float(np.mean([entry["oracle"]["tre_mm"] for entry in chosen]))

        def regret(mean_tre: float) -> float | None:
            return 100.0 * (mean_tre / at_oracle - 1.0) if at_oracle > 0 else None

        at_choice = float(np.mean([entry["metrics"]["tre_mm"] for entry in chosen]))
        result.update(mean_tre_mm=at_choice, oracle_mean_tre_mm=at_oracle, regret_percent=regret(at_choice))
        result["alternatives"] = {}
        for name in scores:
            picks = [pick(name, j) for j in range(len(results.pair_ids))]
            mean_tre = float(np.mean([tre[g, j] for j, g in enumerate(picks)]))
            result["alternatives"][name] = {"mean_tre_mm": mean_tre, "regret_percent": regret(mean_tre),
                                            "grid_index": picks}
    return result


def summarize(
    results: SweepResults,
    criterion: str = "auto",
    max_folding_percent: float = 0.5,
    truths: Mapping[str, dict | None] | None = None,
    max_sd_log_jacobian: float | None = None,
    unsupervised_score: str = "lncc",
) -> dict:
    """Dataset optimum, per-pair optima, per-pair tuning gain, grid means and physical reading of a sweep.

    Returns a dict with ``criterion`` (name, metric, direction, smoothness bounds), ``best`` (grid index,
    hyperparameters, mean of every metric there, physical reading), ``per_pair`` (each pair's own optimum and its
    metric there and at the dataset optimum, true material if any), ``per_pair_gain`` (mean criterion metric at
    the per-pair optima vs at the dataset optimum), ``material_correlation`` (elastic models), ``unsupervised``
    (:func:`unsupervised_choice` by ``unsupervised_score``, when the table has its columns, with its own ``material_correlation`` for elastic models), for a pipeline sweep
    ``network_only`` (the network-alone columns' optimum by the same criterion, and the Spearman correlation of
    the two grids' mean criterion metric), and ``grid`` (mean metrics of every grid point, the ``network_``
    columns included).
    """
    name = resolve_criterion(criterion, list(results.metrics))
    metric, sign = CRITERION_METRICS[name]
    bounded = name == "similarity"
    means = {key: np.mean(values, axis=1) for key, values in results.metrics.items()}
    folding = results.metrics["folding_percent"]
    sdlogj = results.metrics.get("sd_log_jacobian", np.zeros_like(folding))
    means.setdefault("sd_log_jacobian", np.mean(sdlogj, axis=1))
    sd_bound = max_sd_log_jacobian if bounded else None
    best = choose(means[metric], sign, means["folding_percent"] if bounded else None, max_folding_percent,
                  means["sd_log_jacobian"], sd_bound)
    summary: dict = {
        "criterion": {
            "name": name,
            "metric": metric,
            "goal": "max" if sign > 0 else "min",
            "max_folding_percent": max_folding_percent if bounded else None,
            "max_sd_log_jacobian": sd_bound,
        },
        "num_grid_points": int(results.grid.shape[0]),
        "num_pairs": len(results.pair_ids),
        "best": {
            "grid_index": best,
            **results.hyper(best),
            "mean": {key: float(values[best]) for key, values in means.items()},
            "physics": physical_reading(results.hyper(best)),
        },
    }
    if bounded and (means["folding_percent"][best] > max_folding_percent
                    or (sd_bound is not None and means["sd_log_jacobian"][best] > sd_bound)):
        summary["best"]["note"] = "no grid point meets the smoothness bounds on average; least folding chosen."
    per_pair = []
    for j, pair_id in enumerate(results.pair_ids):
        own = choose(results.metrics[metric][:, j], sign, folding[:, j] if bounded else None, max_folding_percent,
                     sdlogj[:, j], sd_bound)
        at_own, at_best = float(results.metrics[metric][own, j]), float(results.metrics[metric][best, j])
        per_pair.append(
            {
                "pair_id": pair_id,
                "grid_index": own,
                **results.hyper(own),
                metric: at_own,
                f"{metric}_at_dataset_best": at_best,
                "gain": sign * (at_own - at_best),
                "physics": physical_reading(results.hyper(own)),
                "truth": (truths or {}).get(pair_id),
            }
        )
    summary["per_pair"] = per_pair
    own_mean = float(np.mean([pair[metric] for pair in per_pair]))
    summary["per_pair_gain"] = {
        "metric": metric,
        "dataset_optimum_mean": float(means[metric][best]),
        "per_pair_optimum_mean": own_mean,
        "mean_gain": float(np.mean([pair["gain"] for pair in per_pair])),
    }
    elastic = results.names == ("lam", "mu")
    if elastic:
        summary["material_correlation"] = material_correlation(per_pair)
    if unsupervised_score in unsupervised_scores(results):
        unsupervised = unsupervised_choice(results, max_folding_percent, max_sd_log_jacobian, unsupervised_score)
        if elastic:
            with_truth = [{**entry, "truth": (truths or {}).get(entry["pair_id"])} for entry in unsupervised["per_pair"]]
            unsupervised["material_correlation"] = material_correlation(with_truth)
        summary["unsupervised"] = unsupervised
    network = _network_only(results)
    if network is not None and metric in network.metrics:
        network_means = np.mean(network.metrics[metric], axis=1)
        network_best = choose(network_means, sign, np.mean(network.metrics["folding_percent"], axis=1) if bounded
                              else None, max_folding_percent, np.mean(network.metrics["sd_log_jacobian"], axis=1),
                              sd_bound)
        rho = spearmanr(network_means, means[metric])[0] if np.ptp(network_means) and np.ptp(means[metric]) else None
        summary["network_only"] = {
            "best": {"grid_index": network_best, **results.hyper(network_best),
                     metric: float(network_means[network_best]),
                     f"pipeline_{metric}": float(means[metric][network_best])},
            "spearman_with_pipeline": None if rho is None else float(rho),
        }
    summary["grid"] = [
        {"grid_index": g, **results.hyper(g), **{key: float(values[g]) for key, values in means.items()}}
        for g in range(results.grid.shape[0])
    ]
    return summary
