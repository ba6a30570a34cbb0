"""The elastic model against an ``[alpha]`` baseline (diffusion, or the elastic regularizer at fixed (lam, mu)),
from two finished sweeps (:mod:`.store`): the comparison table and figure, and the side-by-side figure of one
pair."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_json
from ..data.transforms import registration_transforms
from ..model_card import load_trained_network
from ..networks import warp_image, warp_label
from ..workflow.datalists import pair_datalist
from .plots import plot_pair_comparison, plot_regularizer_comparison
from .selection import physical_reading
from .store import load_sweep
from .sweep import prepare_pairs

__all__ = ["COMPARED", "compare_sweeps", "pair_figure"]

#: metrics of the elastic-vs-baseline comparison table when both sweeps have them
COMPARED = ("dice_mean", "tre_mm", "folding_percent", "sd_log_jacobian", "energy_shear", "energy_volume", "lncc")


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
    elastic, baseline = load_sweep(elastic_dir), load_sweep(diffusion_dir)
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
    atomic_write_json(output_dir / "comparison.json", result)
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
    elastic, baseline = load_sweep(elastic_dir), load_sweep(diffusion_dir)
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
