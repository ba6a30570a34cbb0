"""The pipeline's defaults screened on the real-anatomy pairs of the benchmark's section 5b (issues 18 and 21): the
bundle's whole test-time path (:meth:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization.register`:
pre-alignment ``auto``, the network's start against the identity's or the discrete search's, the instance
optimisation) with each candidate's overrides of the inference defaults, on every pair of 5b, scored as 5b scores
(keypoint and dense TRE, % det J <= 0, SDlogJ; :func:`bench.accuracy.evaluate_ddf`).

Per pair, what does not depend on the candidate is computed once and shared by the candidates that agree on it
(:meth:`InstanceOptimization.prepare`: the MIND-SSC descriptors, the auto pre-alignment's proposal, the discrete
search when on; deterministic, so each candidate's field is the one a fresh ``register`` would give); its seconds
(``prepare_s``) are reported beside each candidate's own (``register_s``: the start's choice and the optimisation).
The candidates run interleaved in one process, their order reversed on every other pair, so the load of the shared
machine hits them alike: compare the seconds within one run only.

The decision rule (stated before the screen ran; :func:`decide`): a candidate replaces the defaults when its mean
keypoint TRE over the pairs is lower than the defaults', no pair's TRE is more than 5 % above the defaults' on it,
its mean folding (% det J <= 0) is not higher, and its mean seconds per pair (prepare + register) are at most 5 %
above the defaults' (the load's noise); among several, the lowest mean TRE.

Run from ``scripts/`` with the bundle root on the path:
``PYTHONPATH=.. python -m bench.defaults_screen OUT.jsonl [candidate ...]`` (default: every candidate of
:data:`CANDIDATES`); one JSON line per (pair, candidate) is appended to ``OUT.jsonl``, and a rerun skips the lines
already there (resume); ``GROUPS=followup`` limits it to those pairs.
``python -m bench.defaults_screen OUT.jsonl --summary [--record]`` prints the table and the decision (and stores
them in ``docs/benchmarks.json``, ``speed_candidates["defaults"]``, rendered in section 7b).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

#: overrides of the inference defaults (``InstanceOptimization`` arguments, and ``lam``/``mu``) to screen
CANDIDATES = {
    "defaults": {},
    "50/50/15": {"coarse_steps": 50, "steps": 15},
    "50/50/20": {"coarse_steps": 50, "steps": 20},
    "50/50/25": {"coarse_steps": 50, "steps": 25},
    "discrete": {"discrete": True},
    "discrete 50/50/15": {"discrete": True, "coarse_steps": 50, "steps": 15},
    "discrete 50/50/20": {"discrete": True, "coarse_steps": 50, "steps": 20},
    "100/100/15": {"coarse_steps": 100, "steps": 15},
    "25/25/50": {"steps": 50},
    "lr 0.4": {"lr": 0.4},
    "lam, mu x3": {"lam": 0.25, "mu": 0.09},
    # the follow-ups' diagnosis: the similarity restricted to where the moving scan has data (not the resampling's
    # fill, exactly -1000 HU, outside a follow-up's field of view), for the pre-alignment and the optimisation
    "fov mask": {"fov_mask": True},
    "fov mask 50/50/20": {"fov_mask": True, "coarse_steps": 50, "steps": 20},
}
#: the value :func:`elastic_hypermorph_bundle.simulation.followup.on_fixed_grid` fills outside a follow-up's scan
FILL_HU = -1000
#: the inference defaults the candidates override (configs/inference.json)
DEFAULTS = {"lam": 0.083, "mu": 0.03}
#: what a candidate's :meth:`InstanceOptimization.prepare` depends on (candidates that agree share it)
PREPARE_KEYS = ("discrete", "prealign", "similarity", "prealign_steps", "use_mask")


def pair_files() -> dict[str, str]:
    """``{case id: cached .npz}`` of section 5b's pairs, as ``docs/benchmarks.json`` records them."""
    cases = json.loads((ROOT / "docs" / "benchmarks.json").read_text())["accuracy_real"]["cases"]
    return {case: record["pair_file"] for case, record in cases.items()}


def screen(out: Path, names: list[str]) -> None:
    from bench.accuracy import evaluate_ddf, load_pair, normalise
    from bench.register_probe import load_model, network_ddf
    from elastic_hypermorph_bundle.metrics import target_registration_error
    from elastic_hypermorph_bundle.networks.spatial import affine_ddf
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

    done = set()
    if out.is_file():
        done = {(r["case"], r["candidate"]) for r in map(json.loads, out.read_text().splitlines()) if r}
    network, space, card = load_model(ROOT / "models" / "model.pt", "cpu")
    grid = card["spatial_size"]
    weights = {}
    groups = os.environ.get("GROUPS")  # e.g. GROUPS=followup: only those pairs
    files = {case: path for case, path in pair_files().items() if not groups or case.split("/")[0] in groups.split(",")}
    for index, (case, path) in enumerate(files.items()):
        todo = [n for n in (names if index % 2 == 0 else names[::-1]) if (case, n) not in done]
        if not todo:
            continue
        pair = load_pair(path)
        fixed = torch.from_numpy(normalise(pair.fixed_image))[None, None]
        moving = torch.from_numpy(normalise(pair.moving_image))[None, None]
        points = [torch.as_tensor(p, dtype=torch.float32) for p in (pair.fixed_keypoints, pair.moving_keypoints)]
        prepared = {}
        for name in todo:
            options = {**DEFAULTS, **CANDIDATES[name]}
            lam, mu = options.pop("lam"), options.pop("mu")
            mask = None
            if options.pop("fov_mask", False):
                options["use_mask"] = True
                mask = torch.from_numpy(pair.moving_image != FILL_HU)[None, None].float()
            if (lam, mu) not in weights:
                weights[(lam, mu)] = network.generate_weights(space.point(lam, mu))
            stages = InstanceOptimization(**options)
            key = tuple(getattr(stages, k) for k in PREPARE_KEYS)
            if key not in prepared:
                begin = time.perf_counter()
                prepared[key] = (stages.prepare(fixed, moving, pair.spacing, mask), time.perf_counter() - begin)
            ready, prepare_s = prepared[key]
            predict = lambda m, w=weights[(lam, mu)]: network_ddf(network, w, fixed, m, grid)  # noqa: E731
            load = os.getloadavg()[0]
            begin = time.perf_counter()
            ddf = stages.register(predict, fixed, moving, torch.tensor([[lam, mu]]), pair.spacing, mask, ready)
            register_s = time.perf_counter() - begin
            metrics = evaluate_ddf(ddf[0].detach().numpy(), pair)
            row = {"case": case, "candidate": name, "options": CANDIDATES[name], "prepare_s": prepare_s,
                   "register_s": register_s, "load_before": load, "load_after": os.getloadavg()[0],
                   "record": {k: torch.as_tensor(v).flatten().tolist() for k, v in stages.record.items()},
                   **{k: metrics[k] for k in ("tre_mm", "tre_dense_mm", "dice_mean", "folding_percent",
                                              "sd_log_jacobian")}}
            if ready.affine is not None:  # what the rigid map alone leaves (the follow-ups' diagnosis)
                row["rigid_map_tre_mm"] = target_registration_error(
                    affine_ddf(ready.affine, fixed.shape[2:])[0], *points, pair.spacing).mean().item()
            print(json.dumps(row), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


def decide(rows: list[dict], baseline: str = "defaults", tolerance: float = 0.05) -> dict:
    """The rule of the module docstring on the screen's rows: per candidate measured on every pair the defaults
    were, its means and whether it passes; ``winner``: the passing candidate with the lowest mean TRE (None)."""
    by = {}
    for row in rows:
        by.setdefault(row["candidate"], {})[row["case"]] = row
    cases = sorted(by[baseline])
    base = by[baseline]
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    seconds = lambda r: r["prepare_s"] + r["register_s"]  # noqa: E731
    base_rows = [base[c] for c in cases]
    summary = {}
    for name, measured in by.items():
        if set(cases) - set(measured):
            continue
        own = [measured[c] for c in cases]
        worst = max(r["tre_mm"] / b["tre_mm"] for r, b in zip(own, base_rows))
        entry = {"tre_mm": mean(own, "tre_mm"), "folding_percent": mean(own, "folding_percent"),
                 "sd_log_jacobian": mean(own, "sd_log_jacobian"),
                 "seconds": float(np.mean([seconds(r) for r in own])), "worst_pair_ratio": worst}
        entry["passes"] = name != baseline and (
            entry["tre_mm"] < mean(base_rows, "tre_mm") and worst <= 1 + tolerance
            and entry["folding_percent"] <= mean(base_rows, "folding_percent")
            and entry["seconds"] <= (1 + tolerance) * float(np.mean([seconds(r) for r in base_rows])))
        summary[name] = entry
    passing = [n for n, e in summary.items() if e["passes"]]
    return {"cases": cases, "candidates": summary,
            "winner": min(passing, key=lambda n: summary[n]["tre_mm"]) if passing else None}


def table(rows: list[dict]) -> list[str]:
    """Markdown: per candidate and pair, keypoint TRE (mm), % det J <= 0, SDlogJ and seconds; then the means."""
    decision = decide(rows)
    cases = decision["cases"]
    cell = {(r["candidate"], r["case"]): r for r in rows}
    short = lambda case: case.split("/")[0].replace("breath_hold", "bh").replace("followup", "fu") + " " + \
        case.split("/")[1].split(".")[0]  # noqa: E731
    lines = ["| candidate | " + " | ".join(short(c) for c in cases) + " | mean TRE | mean % J<=0 | mean SDlogJ "
             "| mean s | worst pair / defaults | passes |", "|---|" + "---|" * (len(cases) + 6)]
    for name, entry in decision["candidates"].items():
        cells = []
        for case in cases:
            r = cell[(name, case)]
            cells.append(f"{r['tre_mm']:.2f} ({r['folding_percent']:.2f} %, {r['sd_log_jacobian']:.2f}, "
                         f"{r['prepare_s'] + r['register_s']:.0f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['tre_mm']:.3f} | "
                     f"{entry['folding_percent']:.3f} | {entry['sd_log_jacobian']:.2f} | {entry['seconds']:.1f} | "
                     f"{entry['worst_pair_ratio']:.2f} | {'yes' if entry['passes'] else 'no'} |")
    for name in dict.fromkeys(r["candidate"] for r in rows):  # stopped before every pair: shown, not judged
        if name not in decision["candidates"]:
            cells = [f"{cell[(name, c)]['tre_mm']:.2f} ({cell[(name, c)]['folding_percent']:.2f} %, "
                     f"{cell[(name, c)]['sd_log_jacobian']:.2f}, "
                     f"{cell[(name, c)]['prepare_s'] + cell[(name, c)]['register_s']:.0f} s)"
                     if (name, c) in cell else "-" for c in cases]
            lines.append(f"| {name} | " + " | ".join(cells) + " | - | - | - | - | - | not on every pair |")
    return lines


if __name__ == "__main__":
    import logging

    logging.getLogger("elastic_hypermorph_bundle").setLevel(logging.WARNING)
    out = Path(sys.argv[1])
    if "--summary" in sys.argv:
        rows = [json.loads(line) for line in out.read_text().splitlines() if line]
        print("\n".join(table(rows)))
        decision = decide(rows)
        print(json.dumps({"winner": decision["winner"]}))
        if "--record" in sys.argv:
            from bench.speed_candidates import record

            record("defaults", {"rows": rows, "decision": decision})
    else:
        screen(out, [a for a in sys.argv[2:] if not a.startswith("--")] or list(CANDIDATES))
