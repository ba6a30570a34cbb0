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

The decision rule (:func:`decide`; issue 21's second rule, stated before this screen of step schedules ran, in
commit of 2026-12-06 ~03:45 UTC): the accuracy part of issue 18's rule decides which candidates may replace the
defaults: its mean keypoint TRE over the pairs is lower than the defaults', no pair's TRE is more than 5 % above
the defaults' on it, and its mean folding (% det J <= 0) is not higher. Among those, the one with the least
modelled cost of the optimisation's levels (:func:`level_cost`: the sum over levels of the steps times the voxels
of that level's grid, in steps of the finest level: finest + middle / 8 + coarsest / 64 for 3 levels) is chosen,
ties by the lower mean TRE (issue 21: cut the cost at equal accuracy). The measured seconds (``register_s``,
interleaved, so their ratios are fair under load) are reported beside it, not judged: on 2 shared cores they
follow the load more than the schedule. (Issue 18's screen, ``speed_candidates["defaults"]``, judged its
candidates by that accuracy part plus mean seconds at most 5 % above the defaults', the lowest mean TRE winning;
its record keeps that rule.)

Run from ``scripts/`` with the bundle root on the path:
``PYTHONPATH=.. python -m bench.defaults_screen OUT.jsonl [--screen strides] [candidate ...]`` (default: the
candidates of the screen, :data:`SCREENS`, ``schedules`` unless named); one JSON line per (pair, candidate) is
appended to ``OUT.jsonl``, and a rerun skips the lines already there (resume); ``GROUPS=followup`` limits it to
those pairs. ``python -m bench.defaults_screen OUT.jsonl --summary [--screen strides] [--record]`` prints the table
and the decision by that screen's rule (and stores them with the rule in ``docs/benchmarks.json``,
``speed_candidates[<screen>]``, rendered in section 7b). The similarity's stride (issue 21) is judged by measured
seconds (a stride's saving is not a count of steps), so its screen needs an otherwise idle machine. Each
pair is simulated into the benchmark's cache where it lacks it (as section 5b simulates it) when its turn comes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import inference_config, inference_schedule

ROOT = Path(__file__).resolve().parents[2]

#: overrides of the inference defaults (``InstanceOptimization`` arguments, and ``lam``/``mu``) to screen; ``steps``
#: as ``instance_steps`` takes them (one number for every level, or one per level, coarsest first)
CANDIDATES = {
    "defaults": {},
    "25/25/25": {"steps": 25},
    "50/50/15": {"steps": [50, 50, 15]},
    "50/50/20": {"steps": [50, 50, 20]},
    "50/50/25": {"steps": [50, 50, 25]},
    "100/100/10": {"steps": [100, 100, 10]},
    "100/100/15": {"steps": [100, 100, 15]},
    "50/100/10": {"steps": [50, 100, 10]},
    "60/60/12": {"steps": [60, 60, 12]},
    "25/25/50": {"steps": [25, 25, 50]},
    "discrete": {"discrete": True},
    "discrete 50/50/15": {"discrete": True, "steps": [50, 50, 15]},
    "discrete 50/50/20": {"discrete": True, "steps": [50, 50, 20]},
    "lr 0.4": {"lr": 0.4},
    "lam, mu x3": {"lam": 0.25, "mu": 0.09},
    "50/50/30 stride 1/1/2": {"steps": [50, 50, 30], "similarity_stride": [1, 1, 2]},
    "50/50/40 stride 1/1/2": {"steps": [50, 50, 40], "similarity_stride": [1, 1, 2]},
    "50/50/40 stride 2": {"steps": [50, 50, 40], "similarity_stride": 2},
    "50/50/30 stride 1/2/2": {"steps": [50, 50, 30], "similarity_stride": [1, 2, 2]},
    "50/100/30 stride 1/2/2": {"steps": [50, 100, 30], "similarity_stride": [1, 2, 2]},
    "50/30/30 stride 1/1/2": {"steps": [50, 30, 30], "similarity_stride": [1, 1, 2]},
    "50/40/30 stride 1/1/2": {"steps": [50, 40, 30], "similarity_stride": [1, 1, 2]},
    "prealign_steps 50": {"prealign_steps": 50},
    "prealign_steps 70": {"prealign_steps": 70},
}


class Screen(NamedTuple):
    """One screen: its candidates, its rule (as its record states it), and how :func:`decide` applies it: ``cost``,
    what the winner has least of (``"level"``: :func:`level_cost` of its steps; ``"register_s"``: its mean measured
    seconds of the start's choice and the optimisation, interleaved with the defaults'), and ``strict``: whether a
    candidate's mean TRE must be lower than the defaults' (else not higher)."""

    candidates: tuple[str, ...]
    rule: str
    cost: str
    strict: bool


#: the screens, by the key of ``speed_candidates`` in ``docs/benchmarks.json`` that ``--record`` writes: issue 21's
#: screen of step schedules (the candidates run when none are named), and of the similarity's stride
SCREENS = {
    "schedules": Screen(
        ("defaults", "50/50/20", "50/50/15", "100/100/10", "100/100/15", "50/100/10", "60/60/12"),
        "a candidate may replace the defaults when its mean keypoint TRE is lower than the defaults', no pair is "
        "more than 5 % worse than with the defaults and its mean % det J <= 0 is not higher; among those, the least "
        "modelled cost of the optimisation's levels (the sum over levels of steps x the voxels of the level's grid, "
        "in finest-level steps: finest + middle / 8 + coarsest / 64) wins, ties by the lower mean TRE (issue 21: cut "
        "the cost at equal accuracy); the measured seconds are reported beside it, not judged",
        "level", True),
    "strides": Screen(
        ("defaults", "50/50/30 stride 1/1/2", "50/50/40 stride 1/1/2", "50/50/40 stride 2"),
        "a candidate may replace the defaults when its mean keypoint TRE is not higher than the defaults', no pair is "
        "more than 5 % worse than with the defaults and its mean % det J <= 0 is not higher; among those, the least "
        "mean measured seconds of the start's choice and the optimisation (register_s; the candidates interleaved "
        "in one process on an otherwise idle machine, as a stride's saving is not a count of steps) wins (issue 21: "
        "cut the cost at no loss of TRE)",
        "register_s", False),
}
#: the stride on the middle level too, against the defaults it left (50/50/30, stride 1/1/2), by the same rule
SCREENS["strides_middle"] = SCREENS["strides"]._replace(
    candidates=("defaults", "50/50/30 stride 1/2/2", "50/100/30 stride 1/2/2"))
#: fewer middle-level steps (since the elastic energy's and the box filter's cheaper passes, the middle level, 50
#: unstrided steps, costs about as much as the strided finest), against the 0.5.3 defaults, by the same rule
SCREENS["middle_steps"] = SCREENS["strides"]._replace(
    candidates=("defaults", "50/30/30 stride 1/1/2", "50/40/30 stride 1/1/2"))
#: fewer steps of the auto pre-alignment (its two rigid fits at half of them, the affine refinement of a kept map at
#: all of them; since the optimisation's cheaper steps, 1.4-1.7 s of a breath-hold pair's 18 s in the engine),
#: judged by the measured seconds of the whole registration (``prepare_s + register_s``: the pre-alignment is in
#: the preparation), by the same accuracy rule
SCREENS["prealign_steps"] = Screen(
    ("defaults", "prealign_steps 50", "prealign_steps 70"),
    "a candidate may replace the defaults when its mean keypoint TRE is not higher than the defaults', no pair is "
    "more than 5 % worse than with the defaults and its mean % det J <= 0 is not higher; among those, the least "
    "mean measured seconds of the whole registration (seconds: the preparation, which holds the pre-alignment, "
    "and the optimisation; the candidates interleaved in one process on an otherwise idle machine) wins (issue 21: "
    "cut the cost at no loss of TRE)",
    "seconds", False)
#: what a candidate's :meth:`InstanceOptimization.prepare` depends on (candidates that agree share it)
PREPARE_KEYS = ("discrete", "prealign", "similarity", "prealign_steps", "use_mask", "coverage_mask")


def inference_defaults() -> dict:
    """What the candidates override: ``lam``, ``mu``, ``steps`` (``instance_steps``) and ``similarity_stride``
    (``instance_similarity_stride``, 1 where the config has none) of ``configs/inference.json`` (the other settings
    are :class:`InstanceOptimization`'s defaults, the config's)."""
    config, schedule = inference_config(), inference_schedule()
    return {"lam": config["lam"], "mu": config["mu"], "steps": schedule["steps"],
            "similarity_stride": schedule["similarity_stride"]}


def level_cost(steps, levels: int = 3) -> float:
    """The modelled cost of the optimisation's levels in steps of the finest level: ``sum_l steps_l * voxels_l /
    voxels_finest``, each level's grid 8 times the voxels of the one before (``steps``: as ``instance_steps``,
    :func:`~elastic_hypermorph_bundle.optimize.level_steps`), e.g. 25/25/25 -> 28.5, 50/50/20 -> 27.0."""
    from elastic_hypermorph_bundle.optimize import level_steps

    counts = level_steps(steps, levels)
    return float(sum(count * 8.0 ** -(levels - 1 - index) for index, count in enumerate(counts)))


def pair_files() -> dict[str, str]:
    """``{case id: cached .npz}`` of section 5b's pairs, as ``docs/benchmarks.json`` records them (simulated or not:
    :func:`simulated`)."""
    cases = json.loads((ROOT / "docs" / "benchmarks.json").read_text())["accuracy_real"]["cases"]
    return {case: record["pair_file"] for case, record in cases.items()}


def simulated(case: str) -> str:
    """The cached .npz of section 5b's pair ``case``, simulated into the benchmark's cache (as 5b simulates it, with
    its recorded settings) when the cache lacks it.

    Raises:
        ValueError: the simulation's path is not the recorded one (the settings' hash differs).
    """
    from bench.accuracy import cached_pairs

    real = json.loads((ROOT / "docs" / "benchmarks.json").read_text())["accuracy_real"]
    setup, record = real["setup"], real["cases"][case]
    if not Path(record["pair_file"]).is_file():
        simulation = {"preset": "followup" if record["group"] == "followup" else "realistic",
                      "real_ct": str(Path(setup["real_ct_dir"]) / record["ct"])}
        path = cached_pairs(setup["spatial_size"], [record["seed"]], simulation, Path(record["pair_file"]).parents[1],
                            print)[0]
        if str(path) != record["pair_file"]:
            raise ValueError(f"{case}: simulated into {path}, not the recorded {record['pair_file']}.")
    return record["pair_file"]


def screen(out: Path, names: list[str]) -> None:
    from bench.accuracy import evaluate_ddf, load_pair, moving_coverage, normalise
    from bench.register_probe import load_model, network_ddf
    from elastic_hypermorph_bundle.metrics import target_registration_error
    from elastic_hypermorph_bundle.networks.spatial import affine_ddf
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

    done = set()
    if out.is_file():
        done = {(r["case"], r["candidate"]) for r in map(json.loads, out.read_text().splitlines()) if r}
    network, space, card = load_model(ROOT / "models" / "model.pt", "cpu")
    defaults = inference_defaults()  # once: the config may change while the screen runs
    grid = card["spatial_size"]
    weights = {}
    groups = os.environ.get("GROUPS")  # e.g. GROUPS=followup: only those pairs
    files = {case: path for case, path in pair_files().items() if not groups or case.split("/")[0] in groups.split(",")}
    for index, (case, path) in enumerate(files.items()):
        todo = [n for n in (names if index % 2 == 0 else names[::-1]) if (case, n) not in done]
        if not todo:
            continue
        pair = load_pair(simulated(case))
        fixed = torch.from_numpy(normalise(pair.fixed_image))[None, None]
        moving = torch.from_numpy(normalise(pair.moving_image))[None, None]
        points = [torch.as_tensor(p, dtype=torch.float32) for p in (pair.fixed_keypoints, pair.moving_keypoints)]
        # a follow-up's coverage of the fixed grid as the bundle's transforms give it (None: one grid)
        coverage = moving_coverage(pair)
        coverage = None if coverage is None else torch.from_numpy(coverage)[None, None].float()
        fixed_mask = torch.from_numpy(pair.fixed_mask > 0)[None, None].float()
        prepared = {}
        for name in todo:
            options = {**defaults, **CANDIDATES[name]}
            lam, mu = options.pop("lam"), options.pop("mu")
            if (lam, mu) not in weights:
                weights[(lam, mu)] = network.generate_weights(space.point(lam, mu))
            stages = InstanceOptimization(**options)
            mask, covered = stages.similarity_mask(fixed_mask if stages.use_mask else None, coverage)
            key = tuple(getattr(stages, k) for k in PREPARE_KEYS)
            if key not in prepared:
                begin = time.perf_counter()
                prepared[key] = (stages.prepare(fixed, moving, pair.spacing, mask, covered=covered),
                                 time.perf_counter() - begin)
            ready, prepare_s = prepared[key]
            predict = lambda m, w=weights[(lam, mu)]: network_ddf(network, w, fixed, m, grid)  # noqa: E731
            load = os.getloadavg()[0]
            begin = time.perf_counter()
            ddf = stages.register(predict, fixed, moving, torch.tensor([[lam, mu]]), pair.spacing, mask, ready)
            register_s = time.perf_counter() - begin
            metrics = evaluate_ddf(ddf[0].detach().numpy(), pair)
            row = {"case": case, "candidate": name, "options": CANDIDATES[name], "steps": list(stages.steps),
                   "torch_threads": torch.get_num_threads(), "prepare_s": prepare_s,
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


def decide(rows: list[dict], baseline: str = "defaults", tolerance: float = 0.05, pairs: int | None = None,
           cost: str = "level", strict: bool = True) -> dict:
    """A screen's rule (:data:`SCREENS`; the module docstring's, by default) on its rows: per candidate measured on
    every pair the defaults were, its means (keypoint TRE, folding, SDlogJ, seconds: ``prepare_s + register_s``, and
    ``register_s`` alone), its worst pair's TRE over the defaults', its modelled level cost (:func:`level_cost` of
    the steps that ran) and whether it passes the accuracy part (mean TRE lower than the defaults', or with
    ``strict`` False not higher); ``winner``: the passing candidate with the least ``cost`` (``"level"`` or
    ``"register_s"``), ties by the lower mean TRE (None when none passes, or when the defaults were measured on
    fewer than ``pairs`` pairs: a stopped screen decides nothing, ``partial`` then True)."""
    by = {}
    for row in rows:
        by.setdefault(row["candidate"], {})[row["case"]] = row
    cases = sorted(by[baseline])
    base = by[baseline]
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    base_rows = [base[c] for c in cases]
    summary = {}
    for name, measured in by.items():
        if set(cases) - set(measured):
            continue
        own = [measured[c] for c in cases]
        worst = max(r["tre_mm"] / b["tre_mm"] for r, b in zip(own, base_rows))
        entry = {"steps": own[0]["steps"], "cost": level_cost(own[0]["steps"], len(own[0]["steps"])),
                 "tre_mm": mean(own, "tre_mm"), "folding_percent": mean(own, "folding_percent"),
                 "sd_log_jacobian": mean(own, "sd_log_jacobian"), "register_s": mean(own, "register_s"),
                 "seconds": float(np.mean([r["prepare_s"] + r["register_s"] for r in own])),
                 "worst_pair_ratio": worst}
        better = entry["tre_mm"] < mean(base_rows, "tre_mm") if strict else entry["tre_mm"] <= mean(base_rows, "tre_mm")
        entry["passes"] = name != baseline and (
            better and worst <= 1 + tolerance
            and entry["folding_percent"] <= mean(base_rows, "folding_percent"))
        summary[name] = entry
    passing = [n for n, e in summary.items() if e["passes"]]
    partial = pairs is not None and len(cases) < pairs
    return {"cases": cases, "candidates": summary, "partial": partial, "cost": cost,
            "winner": min(passing, key=lambda n: (summary[n]["cost" if cost == "level" else cost], summary[n]["tre_mm"]))
            if passing and not partial else None}


def table(rows: list[dict], decision: dict) -> list[str]:
    """Markdown: per candidate and pair, keypoint TRE (mm), % det J <= 0, SDlogJ and seconds; then the means and
    ``decision``'s verdicts (:func:`decide` of these rows, as recorded: a record keeps the rule it was judged by),
    with the modelled level cost and the mean ``register_s`` where the decision has them."""
    cases = decision["cases"]
    # the modelled level cost counts steps, which a strided similarity's screen (judged by seconds) does not compare
    costs = decision.get("cost", "level") == "level" and all("cost" in e for e in decision["candidates"].values())
    timed = decision.get("cost") == "register_s"
    cell = {(r["candidate"], r["case"]): r for r in rows}
    short = lambda case: case.split("/")[0].replace("breath_hold", "bh").replace("followup", "fu") + " " + \
        case.split("/")[1].split(".")[0]  # noqa: E731
    extra = ["modelled level cost", "mean register s"] if costs else ["mean register s"] if timed else []
    lines = ["| candidate | " + " | ".join(short(c) for c in cases) + " | mean TRE | mean % J<=0 | mean SDlogJ "
             "| mean s | " + "".join(f"{e} | " for e in extra) + "worst pair / defaults | passes |",
             "|---|" + "---|" * (len(cases) + 6 + len(extra))]
    for name, entry in decision["candidates"].items():
        cells = []
        for case in cases:
            r = cell[(name, case)]
            cells.append(f"{r['tre_mm']:.2f} ({r['folding_percent']:.2f} %, {r['sd_log_jacobian']:.2f}, "
                         f"{r['prepare_s'] + r['register_s']:.0f} s)")
        label = name + (f" ({'/'.join(map(str, entry['steps']))})" if (costs or timed) and name == "defaults" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {entry['tre_mm']:.3f} | "
                     f"{entry['folding_percent']:.3f} | {entry['sd_log_jacobian']:.2f} | {entry['seconds']:.1f} | "
                     + (f"{entry['cost']:.1f} | " if costs else "")
                     + (f"{entry['register_s']:.1f} | " if costs or timed else "")
                     + f"{entry['worst_pair_ratio']:.2f} | {'yes' if entry['passes'] else 'no'} |")
    for name in dict.fromkeys(r["candidate"] for r in rows):  # stopped before every pair: shown, not judged
        if name not in decision["candidates"]:
            cells = [f"{cell[(name, c)]['tre_mm']:.2f} ({cell[(name, c)]['folding_percent']:.2f} %, "
                     f"{cell[(name, c)]['sd_log_jacobian']:.2f}, "
                     f"{cell[(name, c)]['prepare_s'] + cell[(name, c)]['register_s']:.0f} s)"
                     if (name, c) in cell else "-" for c in cases]
            lines.append(f"| {name} | " + " | ".join(cells) + " | - | - | - | - | " + "- | " * len(extra)
                         + "- | not on every pair |")
    return lines


if __name__ == "__main__":
    import logging

    logging.getLogger("elastic_hypermorph_bundle").setLevel(logging.WARNING)
    out = Path(sys.argv[1])
    chosen = sys.argv[sys.argv.index("--screen") + 1] if "--screen" in sys.argv else "schedules"
    if chosen not in SCREENS:
        raise SystemExit(f"--screen must be one of {tuple(SCREENS)}, got {chosen!r}.")
    rule = SCREENS[chosen]
    names = [a for a in sys.argv[2:] if not a.startswith("--") and a != chosen]
    if "--summary" in sys.argv:
        rows = [json.loads(line) for line in out.read_text().splitlines() if line]
        decision = decide(rows, pairs=len(pair_files()), cost=rule.cost, strict=rule.strict)
        print("\n".join(table(rows, decision)))
        print(json.dumps({"winner": decision["winner"]}))
        if "--record" in sys.argv:
            from bench.speed_candidates import record

            record(chosen, {"rows": rows, "decision": decision, "rule": rule.rule}, module="defaults_screen")
    else:
        screen(out, names or list(rule.candidates))
