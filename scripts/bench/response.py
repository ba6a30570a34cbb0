"""Section 6b of the benchmark: does the trained model follow (lam, mu) as the optimisation does, and does its field
make the optimisation faster (issue 19, items 3 and 4)?

On held-out simulated pairs (realistic breath-hold preset, by default on the real CT that no release trained on),
with the bundle's model read as inference reads it (its card's grid through
:class:`~elastic_hypermorph_bundle.networks.grid.NetworkGrid`, anti-aliased) and the instance optimisation with the
inference defaults (:class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`, ``prealign auto``'s
proposal and the MIND features computed once per pair and shared by every start and every (lam, mu), every field
through :meth:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization.register`, which keeps or drops a
proposed map per (lam, mu) as inference does, as the pipeline sweep does):

* **response**: over a ``points`` x ``points`` grid of (lam, mu) spanning the card's trained range, the network's
  field alone and the optimisation started from it (``steps`` per level) at the same (lam, mu). ``field_change_mm``:
  mean over the fixed lungs of ``|u(high corner) - u(low corner)|`` (mm), network against optimisation (goal: the
  network's at least half the optimisation's); ``spearman_tre`` / ``spearman_sdlogj``: Spearman rank correlation
  over the grid between the network's and the optimisation's mean TRE / SDlogJ over the pairs (goal >= 0.8).
* **start**: at the inference defaults' (lam, mu), the optimisation from the network's field (with and without
  the start selection of the inference defaults) and from the identity, for each number of steps per level in
  ``start_steps``: TRE, and the fewest steps at which each start reaches the identity start's TRE at the default
  steps (goal: the network's start in at most half of them).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from elastic_hypermorph_bundle.forward import network_input, weighted_ddf
from elastic_hypermorph_bundle.model_card import ModelCard, load_trained_network, network_grid
from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

from .accuracy import evaluate_ddf, normalise

__all__ = ["response_settings", "run"]


def response_settings(spatial_size, real_ct: str | None, seeds=(1901, 1902), points=5, steps=25,
                      start_steps=(2, 5, 10, 25)) -> dict:
    """Section 6b settings: realistic breath-hold pairs (seeds disjoint from every other seed the bundle's scripts
    use) on ``real_ct`` (the phantom when None), the grid, the optimisation's steps per level, the steps of the start
    comparison (the largest is the default's)."""
    simulation = {"preset": "realistic"} if real_ct is None else {"preset": "realistic", "real_ct": real_ct}
    return {"spatial_size": list(spatial_size), "simulation": simulation, "seeds": list(seeds), "points": points,
            "steps": steps, "start_steps": sorted(start_steps), "default_hyper": None}


def _metrics(ddf: torch.Tensor, pair) -> dict:
    result = evaluate_ddf(ddf[0], pair)
    return {key: float(result[key]) for key in ("tre_mm", "sd_log_jacobian", "folding_percent")}


def run(options: dict, model_path: str, pairs: list, log) -> dict:
    """Both measurements on ``pairs`` (:class:`~elastic_hypermorph_bundle.simulation.SimulatedPair`) with the model
    at ``model_path`` (``model.pt`` beside its ``model.json``); the JSON-ready record of section 6b."""
    card = ModelCard.load(str(model_path).replace("model.pt", "model.json"))
    network = load_trained_network(model_path).eval()
    preprocessing = card.preprocessing
    grid = network_grid(preprocessing["spatial_size"], preprocessing.get("pixdim"), ckpt_path=model_path)
    low, high = card.hyper_space.low.tolist(), card.hyper_space.high.tolist()
    lams = np.linspace(low[0], high[0], options["points"]).tolist()
    mus = np.linspace(low[1], high[1], options["points"]).tolist()
    start = time.perf_counter()

    def predictor(fixed, spacing, hyper):
        with torch.inference_mode():
            weights = network.generate_weights(hyper)

        def predict(moving):
            with torch.inference_mode():
                x = grid.to_network(network_input(moving, fixed), spacing)
                ddf = weighted_ddf(network, x, weights)
            return grid.from_network(ddf, fixed.shape[2:], spacing).clone()
        return predict

    rows, change, start_rows, prealigned = [], {"network": [], "optimised": []}, [], []
    for seed, pair in zip(options["seeds"], pairs):
        moving, fixed = (torch.from_numpy(normalise(image))[None, None]
                         for image in (pair.moving_image, pair.fixed_image))
        spacing = list(pair.spacing)
        fields = {}
        optimiser = InstanceOptimization(steps=options["steps"], select_start=False)
        network_alone = InstanceOptimization(steps=0)  # --instance_steps 0, as inference runs it
        # the pre-alignment's proposal (affine, or None) and the MIND features, once per pair; register decides
        # per (lam, mu) whether a proposed map is kept (by the start objective, the one rule of prealign auto)
        prepared = optimiser.prepare(fixed, moving, spacing)
        prealigned.append(prepared.affine is not None)
        for lam, mu in itertools.product(lams, mus):
            hyper = torch.tensor([[lam, mu]], dtype=torch.float32)
            predict = predictor(fixed, spacing, hyper)
            for mode, stages in (("network", network_alone), ("optimised", optimiser)):
                field = stages.register(predict, fixed, moving, hyper, spacing, prepared=prepared).detach()
                kept = stages.record.get("prealign_applied")
                rows.append({"seed": seed, "lam": lam, "mu": mu, "mode": mode, **_metrics(field, pair),
                             "prealign_kept": None if kept is None else float(kept[0])})
                if (lam, mu) in ((lams[0], mus[0]), (lams[-1], mus[-1])):
                    fields[mode, lam, mu] = field
        lung = torch.from_numpy(pair.fixed_mask > 0)
        mm = torch.tensor(spacing, dtype=torch.float32).view(3, 1, 1, 1)
        for mode in change:
            delta = (fields[mode, lams[-1], mus[-1]] - fields[mode, lams[0], mus[0]])[0] * mm
            change[mode].append(float(torch.linalg.vector_norm(delta, dim=0)[lung].mean()))
        log(f"section 6b: response on a pair done ({time.perf_counter() - start:.0f} s)")

        lam, mu = options["default_hyper"]
        hyper = torch.tensor([[lam, mu]], dtype=torch.float32)
        predict = predictor(fixed, spacing, hyper)
        for steps in options["start_steps"]:
            for name, use_network, select in (("network", True, False), ("network, start selection", True, True),
                                              ("identity", False, False)):
                stage = InstanceOptimization(steps=steps, select_start=select)
                begin = time.perf_counter()
                field = stage.register(predict if use_network else None, fixed, moving, hyper, spacing,
                                       prepared=prepared).detach()
                start_rows.append({"seed": seed, "start": name, "steps": steps,
                                   "seconds": time.perf_counter() - begin, **_metrics(field, pair)})
        log(f"section 6b: starts on a pair done ({time.perf_counter() - start:.0f} s)")

    def grid_means(mode: str, key: str) -> list[float]:
        return [float(np.mean([r[key] for r in rows if r["mode"] == mode and r["lam"] == lam and r["mu"] == mu]))
                for lam, mu in itertools.product(lams, mus)]

    def start_mean(name: str, steps: int, key: str = "tre_mm") -> float:
        return float(np.mean([r[key] for r in start_rows if r["start"] == name and r["steps"] == steps]))

    default_steps = max(options["start_steps"])
    target = start_mean("identity", default_steps)
    starts = {}
    for name in ("network", "network, start selection", "identity"):
        reached = [s for s in options["start_steps"] if start_mean(name, s) <= target]
        starts[name] = {"tre_mm": {str(s): start_mean(name, s) for s in options["start_steps"]},
                        "seconds": {str(s): start_mean(name, s, "seconds") for s in options["start_steps"]},
                        "steps_to_identity_tre": min(reached) if reached else None}
    return {
        "setup": {**options, "model": str(model_path),
                  "model_sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
                  "network_grid": {"spatial_size": list(grid.spatial_size), "pixdim": grid.target_pixdim},
                  "spacing": list(pairs[0].spacing), "prealigned": prealigned, "torch_threads": torch.get_num_threads(),
                  "seconds": time.perf_counter() - start},
        "field_change_mm": {mode: float(np.mean(v)) for mode, v in change.items()},
        "spearman_tre": float(spearmanr(grid_means("network", "tre_mm"), grid_means("optimised", "tre_mm"))[0]),
        "spearman_sdlogj": float(spearmanr(grid_means("network", "sd_log_jacobian"),
                                           grid_means("optimised", "sd_log_jacobian"))[0]),
        "range": {mode: {key: [min(grid_means(mode, key)), max(grid_means(mode, key))]
                         for key in ("tre_mm", "sd_log_jacobian", "folding_percent")} for mode in change},
        "grid": {"lam": lams, "mu": mus,
                 **{f"{mode}_{key}": grid_means(mode, key)
                    for mode in change for key in ("tre_mm", "sd_log_jacobian")}},
        "starts": starts,
        "start_rows": start_rows,
        "rows": rows,
    }
