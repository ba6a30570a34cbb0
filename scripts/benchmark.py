#!/usr/bin/env python
"""Benchmark of the bundle: cost of hyper-conditioning, regularizer cost, sweep throughput, full-size training
memory, accuracy/time against classical registration, conditioning capacity, and where the time of one registration
in the engine goes (per stage). Writes docs/benchmarks.md and docs/benchmarks.json.

    python scripts/benchmark.py            # default settings (~1.5 h on 2 CPU cores; section 6 alone ~45 min)
    python scripts/benchmark.py --sections "[8]"   # the per-stage profile alone (~10 min, once its pairs exist)
    python scripts/benchmark.py --sections "[9]"   # section 6b: the model's (lam, mu) response and start
    python scripts/benchmark.py --sections "[9]" --response_size "[48,48,54]"   # the same on a coarser grid
    python scripts/benchmark.py --quick    # a few minutes: tiny sizes, few repeats (checks the script only)
    python scripts/benchmark.py --sections "[1,2]" --output_dir /tmp/bench   # a subset, elsewhere
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import fire
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # bundle root, bench/

from bench import (accuracy, capacity, cost, inference_config, inference_schedule, report, response,  # noqa: E402
                   stages)
from bench.timing import machine_description  # noqa: E402
from elastic_hypermorph_bundle.networks.hyper import DEFAULT_HYPER_RANK  # noqa: E402
from elastic_hypermorph_bundle.optimize import AUTO_PREALIGN_MARGIN  # noqa: E402

FULL_SIZE = [192, 192, 208]  # Learn2Reg LungCT grid
BREATH_HOLD = {"max_displacement_range": [20.0, 30.0]}  # simulate_pair settings: breath-hold inhale/exhale motion


def _config(network, size, batch, modes, warmup, repeats):
    return {"network": network, "spatial_size": size, "batch": batch, "modes": modes, "warmup": warmup,
            "repeats": repeats}


def settings_for(quick: bool, cuda: bool, response_size=None) -> dict:
    """Every section's settings: ``quick`` tiny sizes and few repeats; ``cuda`` adds the CUDA rows of section 1;
    ``response_size`` replaces section 9's grid of voxels.

    Raises:
        ValueError: ``response_size`` not three positive whole numbers.
    """
    settings = _settings(quick, cuda)
    if response_size is not None:
        size = list(response_size) if isinstance(response_size, (list, tuple)) else [response_size]
        if len(size) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
            raise ValueError(f"--response_size must be three positive whole numbers [X, Y, Z], got {response_size!r}.")
        settings["response"] = {**settings["response"], "spatial_size": size}
    return settings


def _settings(quick: bool, cuda: bool) -> dict:
    both = ["inference", "training"]
    if quick:
        # the network-cost sections (1, 3, 4) at 16^3, the smallest grid of HyperUNet's levels (their figures are
        # not read; the code path is the same); the phantom sections at 32^3, where the simulated anatomy is resolved
        n, s = [16, 16, 16], [32, 32, 32]
        return {
            "preset": "quick", "full_size": n,
            # both modes, two rows per batch (the grouped per-sample convolution), each variant's memory in a fresh
            # process; HyperLocalNet's twin is checked by test_benchmark's layout test and gpu_check's dry run
            "conditioning": [_config("HyperUNet", n, 2, both, 1, 2)],
            "memory_probes": True,
            "regularizer_sizes": [s], "regularizer_warmup": 1, "regularizer_repeats": 3,
            "sweep": {"network": "HyperUNet", "spatial_size": n, "pairs": 2, "grid": 2, "warmup": 1, "repeats": 2},
            # elastix: one 2-resolution B-spline stage instead of the Par0011-like 4 + 2 (the runner is checked, the
            # figure is not)
            "accuracy": accuracy_settings(s, seeds=[9000], elastix_iterations=30, demons_iterations=[20, 10],
                                          convex_adam={"grid_sp": 4, "disp_hw": 3, "selected_niter": 20},
                                          optimize_steps=[10], network_optimize_steps=[10], prealign="none",
                                          tiny_model_seconds=2.0, tiny_model_seeds=[100], elastix_pyramids=[[2, 1]]),
            "accuracy_real": real_anatomy_settings(s, cts=REAL_CTS[:1], followups=FOLLOWUPS[:1],
                                                   elastix_iterations=30, demons_iterations=[20, 10],
                                                   convex_adam={"grid_sp": 4, "disp_hw": 3, "selected_niter": 20},
                                                   optimize_steps=[10], network_optimize_steps=[10]),
            "capacity": capacity_settings(s, train_seeds=[2000], test_seeds=[3000], steps=3, grid_points=2,
                                          variants=["plain", "instance_norm", "rank1", "full"]),
            # sections 5 and 8 (rendered as 7) are checked here, not measured: no pre-alignment (its auto check took
            # 217 s of a 290 s stage-profile path at 32^3 on the shared 2-core machine; test_auto_stages.py tests it)
            # and, in the stage profile, 3 steps per level
            "stages": {**stages_settings(s), "convex_adam": False, "overhead_run": False,
                       "overrides": {"prealign": "none", "instance_steps": 3}},
            "response": response.response_settings(s, None, seeds=[9001], points=2, steps=2, start_steps=[1, 2]),
        }
    m64, m96 = [64] * 3, [96] * 3
    conditioning = [
        _config("HyperUNet", m64, 1, both, 1, 3),
        _config("HyperUNet", m64, 2, both, 1, 3),
        _config("HyperLocalNet", m64, 1, both, 1, 3),
        _config("HyperLocalNet", m64, 2, ["inference"], 1, 3),
        _config("HyperUNet", m96, 1, both, 1, 2),
        _config("HyperUNet", FULL_SIZE, 1, ["inference"], 1, 2),
    ]
    if cuda:
        conditioning = [dict(c, device="cuda") for c in conditioning] + [
            dict(_config(n, FULL_SIZE, 1, both, 2, 5), device="cuda") for n in ("HyperUNet", "HyperLocalNet")]
    return {
        "preset": "default", "full_size": FULL_SIZE, "conditioning": conditioning, "memory_probes": True,
        "regularizer_sizes": [m96, FULL_SIZE], "regularizer_warmup": 1, "regularizer_repeats": 5,
        "sweep": {"network": "HyperUNet", "spatial_size": [48] * 3, "pairs": 2, "grid": 11, "warmup": 2,
                  "repeats": 3},
        "accuracy": accuracy_settings(FULL_SIZE),
        "accuracy_real": real_anatomy_settings(FULL_SIZE),
        "capacity": capacity_settings([32, 32, 32]),
        "stages": stages_settings(FULL_SIZE),
        # the Learn2Reg field of view at a third of its grid (5.25 x 3.75 x 5.06 mm, finer than the release's network
        # grid) on the CT no release trained on: 2 pairs x 25 grid points of optimisation (not yet timed on free cores)
        "response": response.response_settings([64, 64, 72], held_out_real_ct("nsclc_r01_001.nii.gz")),
    }


#: the real chest CTs of ../shared/data/real_ct, one breath-hold pair each, and the follow-up cases (CT, seed)
REAL_CTS = ("lidc_idri_0001.nii.gz", "lidc_idri_0002.nii.gz", "nsclc_r01_001.nii.gz", "fourdlung_113_phase40.nii.gz")
FOLLOWUPS = (("lidc_idri_0002.nii.gz", 1201), ("nsclc_r01_001.nii.gz", 1202))
#: the CTs the shipped model (0.5.0) saw in training (docs/README.md, "Training data"); nsclc_r01_001 is held out
MODEL_SAW = ("lidc_idri_0001.nii.gz", "lidc_idri_0002.nii.gz", "fourdlung_113_phase40.nii.gz", "chest_ct_cropped.nii.gz")
#: the rows of section 5b (:func:`real_anatomy_methods`) measured on every pair before any other row: the
#: comparisons of issue 18's goals (the follow-ups' goal needs every peer); the others come after all pairs
FIRST_ROWS = {"breath_hold": ("identity", "network", "defaults", "from_identity", "network_forced", "convex_adam"),
              "followup": ("identity", "network", "defaults", "from_identity", "network_forced", "demons", "elastix",
                           "convex_adam")}


def real_anatomy_settings(spatial_size, breath_hold_seed=1101, cts=REAL_CTS, followups=FOLLOWUPS,
                          real_ct_dir=None, **overrides) -> dict:
    """Section 5, real anatomy (issue 18): a realistic breath-hold pair on each real CT and baseline / follow-up
    pairs (``preset="followup"``), the peers retuned to finish (elastix: Par0011-like, 150 iterations per level of its
    6 B-spline resolutions (450 s per full-size pair at load 6 on 2 cores; 500 per level did not fit), an affine stage
    first for the follow-ups), the bundle's defaults, the optimisation from identity, the network start forced,
    the network alone. ``cases`` (group, CT, seed) are measured in this order: the held-out anatomy first, then
    the follow-ups, then the CTs the model saw."""
    root = Path(__file__).resolve().parents[1]  # ../shared next to the bundle root (or a worktree's ancestor's)
    folder = Path(real_ct_dir) if real_ct_dir else next(
        (p / "shared" / "data" / "real_ct" for p in root.parents if (p / "shared" / "data" / "real_ct").is_dir()),
        root.parent / "shared" / "data" / "real_ct")
    schedule = inference_schedule()  # the bundle's rows run its inference schedule, whatever it is
    base = accuracy_settings(spatial_size, **{"elastix_iterations": 150, "optimize_steps": (schedule["steps"],),
                                              "network_optimize_steps": (schedule["steps"],),
                                              "method_timeout_s": 1800.0, **overrides})
    base["coverage_mask"] = schedule["coverage_mask"]  # the follow-ups' (bench.accuracy.moving_coverage)
    strides = schedule["similarity_stride"]
    if set(strides if isinstance(strides, list) else [strides]) != {1}:
        # only where some level is strided, so that the rows measured before the stride existed keep their keys
        base["optimize_kwargs"] = {**base["optimize_kwargs"], "similarity_stride": strides}
    for unused in ("seeds", "simulation"):  # the pairs are the cases below
        base.pop(unused)
    cases = [["breath_hold", name, breath_hold_seed] for name in cts] + [["followup", name, int(seed)]
                                                                         for name, seed in followups]
    cases.sort(key=lambda case: (case[1] in MODEL_SAW, case[0] != "followup"))  # stable: held out, follow-ups
    # resolved, so that a link to the data names the same pairs in the cache (its key holds the CT's path)
    return {**base, "real_ct_dir": str(folder.resolve()), "cases": cases, "model_saw": list(MODEL_SAW),
            "first_rows": {group: list(rows) for group, rows in FIRST_ROWS.items()}}


def accuracy_settings(spatial_size, seeds=(1000, 1001), elastix_iterations=200, demons_iterations=(100, 50),
                      convex_adam=None, optimize_steps=(25,), network_optimize_steps=(25, 50), **extra) -> dict:
    """Section 5 settings: held-out pair seeds (disjoint from any training seed the bundle's scripts use),
    breath-hold amplitudes, the peers' iterations, the optimisation step counts; (lam, mu) default to the bundle's
    inference defaults."""
    return {"spatial_size": list(spatial_size), "seeds": list(seeds), "simulation": dict(BREATH_HOLD),
            "elastix_iterations": elastix_iterations, "demons_iterations": list(demons_iterations),
            "convex_adam": dict(convex_adam or {}), "optimize_steps": list(optimize_steps),
            "network_optimize_steps": list(network_optimize_steps), "lam": None, "mu": None, "use_mask": False,
            "prealign": "auto", "optimize_kwargs": {}, "method_timeout_s": 450.0, **extra}


def capacity_settings(spatial_size, train_seeds=tuple(range(2000, 2012)), test_seeds=tuple(range(3000, 3004)),
                      steps=300, grid_points=3, variants=("plain", "instance_norm", "rank1", "rank4", "rank16", "full"),
                      ) -> dict:
    """Section 6 settings: realistic simulated pairs (training and held-out seeds disjoint from every other seed the
    bundle's scripts use), the equal training budget in steps, the (lam, mu) grid, the variants; the TRE's (lam, mu)
    defaults to the bundle's inference defaults."""
    return {"spatial_size": list(spatial_size), "simulation": {"preset": "realistic"},
            "train_seeds": list(train_seeds), "test_seeds": list(test_seeds), "steps": steps,
            "grid_points": grid_points, "variants": list(variants), "default_hyper": None,
            "learning_rate": 1e-3, "seed": 0}


def held_out_real_ct(name: str = "nsclc_r01_001.nii.gz") -> str | None:
    """A real chest CT that the release model did not train on (0.5.0 trained on lidc_idri_0001/0002 and
    fourdlung_113, model card), from ``shared/data/real_ct`` in the nearest ancestor of the bundle root that has
    it; None when absent."""
    for folder in Path(__file__).resolve().parents[1].parents:
        path = folder / "shared" / "data" / "real_ct" / name
        if path.is_file():
            return str(path)
    return None


def stages_settings(spatial_size, pairs=2, seed=21) -> dict:
    """Section 8 settings (rendered as section 7): a simulated dataset of ``pairs`` realistic breath-hold pairs on a
    held-out real CT (phantom anatomy when the CT is absent), registered with the inference defaults; the split path
    is run a second time without the profiler when ``overhead_run`` is set, and ConvexAdam registers the single
    path's pair in the same run when ``convex_adam`` is set (and installed)."""
    return {"spatial_size": list(spatial_size), "pairs": pairs, "seed": seed, "simulation": {"preset": "realistic"},
            "real_ct": held_out_real_ct(), "overhead_run": True, "convex_adam": True}


def run_stages(options: dict, model_dir: str, pair_cache: str, log) -> dict:
    """Section 8 (rendered as 7): the per-stage time of the engine's split and single-pair paths
    (:mod:`bench.stages`)."""
    import tempfile

    from elastic_hypermorph_bundle.simulation.real_ct import LUNG_MASK_RULE

    # a dataset on a real CT is named after the lung-mask rule it was simulated under, so a new rule simulates anew
    anatomy = (f"{Path(options['real_ct']).name.split('.')[0]}_lungrule{LUNG_MASK_RULE}" if options.get("real_ct")
               else "phantom")
    name = f"stages_{'x'.join(map(str, options['spatial_size']))}_{options['pairs']}_{options['seed']}_{anatomy}"
    with tempfile.TemporaryDirectory(prefix="bench_stages_") as outputs:
        return stages.run({**options, "dataset_dir": str(Path(pair_cache) / name / "LungCT"),
                           "model": str(Path(model_dir) / "model.pt"), "output_dir": outputs}, log)


def run_capacity(options: dict, pair_cache: str, log) -> dict:
    """Section 6: every conditioning variant trained on the same pairs for the same steps (:mod:`bench.capacity`)."""
    load = lambda seeds: [accuracy.load_pair(p) for p in accuracy.cached_pairs(  # noqa: E731
        options["spatial_size"], seeds, options["simulation"], pair_cache, log)]
    if options.get("default_hyper") is None:
        defaults = inference_defaults()
        options = {**options, "default_hyper": [defaults["lam"], defaults["mu"]]}
    train, test = load(options["train_seeds"]), load(options["test_seeds"])
    result = capacity.run(options, train, test, log)
    result["setup"].update(spacing=list(train[0].spacing), torch_threads=torch.get_num_threads(),
                           default_rank=DEFAULT_HYPER_RANK)
    return result


def run_response(options: dict, model_dir: str, pair_cache: str, log) -> dict:
    """Section 9 (rendered as 6b): the model's (lam, mu) response against the optimisation's, and the optimisation's
    steps from the network's start against the identity's (:mod:`bench.response`)."""
    if options.get("default_hyper") is None:
        defaults = inference_defaults()
        options = {**options, "default_hyper": [defaults["lam"], defaults["mu"]]}
    pairs = [accuracy.load_pair(p) for p in accuracy.cached_pairs(
        options["spatial_size"], options["seeds"], options["simulation"], pair_cache, log)]
    return response.run(options, str(Path(model_dir) / "model.pt"), pairs, log)


def inference_defaults() -> dict:
    """The bundle's inference defaults (``configs/inference.json``): the (lam, mu) a user gets without choosing."""
    config = inference_config()
    return {key: config[key] for key in ("lam", "mu") if key in config}


def section5_methods(options: dict, model_path: str) -> list[dict]:
    """The methods of section 5 (``bench.register_probe`` kinds), all on the same pairs."""
    lam_mu = {"lam": options["lam"], "mu": options["mu"]}
    optimize = {**lam_mu, "use_mask": options["use_mask"], "prealign": options["prealign"],
                "optimize_kwargs": options["optimize_kwargs"]}
    methods = [
        {"name": "identity (no registration)", "kind": "identity"},
        {"name": "elastix B-spline (NCC + bending energy)", "kind": "elastix",
         "options": {"iterations": options["elastix_iterations"],
                     **({"pyramids": options["elastix_pyramids"]} if options.get("elastix_pyramids") else {})}},
        {"name": "SimpleITK demons (fast symmetric forces)", "kind": "demons",
         "options": {"iterations": options["demons_iterations"]}},
        {"name": "ConvexAdam (MIND-SSC, convex + Adam)", "kind": "convex_adam",
         "options": {"convex_adam_kwargs": options["convex_adam"]}},
        {"name": "bundle: network alone", "kind": "network", "options": {**lam_mu, "model": model_path}},
    ]
    for steps in options["optimize_steps"]:
        methods.append({"name": f"bundle: optimisation from identity, {report.schedule_name(steps)}", "kind": "optimize",
                        "options": {**optimize, "steps": steps, "init": "identity"}})
    for steps in options["network_optimize_steps"]:
        methods.append({"name": f"bundle: network + optimisation, {report.schedule_name(steps)}", "kind": "optimize",
                        "options": {**optimize, "steps": steps, "init": "network", "model": model_path}})
    return methods


def real_anatomy_methods(options: dict, model_path: str, group: str) -> list[dict]:
    """The rows of section 5b on one pair, each with its ``row`` id: no registration, the network alone, the
    bundle's defaults (pre-alignment ``auto``, the network's start when its objective is lower than the identity's,
    the optimisation), the optimisation from identity, the network start forced (no start selection), ConvexAdam,
    demons, elastix (an affine stage first for the follow-ups)."""
    steps = options["network_optimize_steps"][0]
    lam_mu = {"lam": options["lam"], "mu": options["mu"]}
    kwargs = options["optimize_kwargs"]
    if group == "followup" and options.get("coverage_mask"):
        # as inference compares a follow-up (another grid) only where its scan has data; breath-hold pairs share one
        # grid and have no coverage, so their rows (and row keys) stay as they were
        kwargs = {**kwargs, "coverage_mask": True}
    optimize = {**lam_mu, "use_mask": options["use_mask"], "prealign": options["prealign"],
                "optimize_kwargs": kwargs, "steps": steps}
    steps = report.schedule_name(steps)
    forced = {**optimize, "optimize_kwargs": {**kwargs, "select_start": False}}
    return [
        {"row": "identity", "name": "identity (no registration)", "kind": "identity"},
        {"row": "network", "name": "bundle: network alone", "kind": "network", "options": {**lam_mu, "model": model_path}},
        {"row": "defaults", "name": f"bundle: defaults (start selected, {steps})", "kind": "optimize",
         "options": {**optimize, "init": "network", "model": model_path}},
        {"row": "from_identity", "name": f"bundle: optimisation from identity, {steps}", "kind": "optimize",
         "options": {**optimize, "init": "identity"}},
        {"row": "network_forced", "name": f"bundle: network start forced, {steps}", "kind": "optimize",
         "options": {**forced, "init": "network", "model": model_path}},
        {"row": "convex_adam", "name": "ConvexAdam (MIND-SSC, convex + Adam)", "kind": "convex_adam",
         "options": {"convex_adam_kwargs": options["convex_adam"]}},
        {"row": "demons", "name": "SimpleITK demons (fast symmetric forces)", "kind": "demons",
         "options": {"iterations": options["demons_iterations"]}},
        {"row": "elastix", "name": "elastix B-spline (NCC + bending energy)"
         + (", affine first" if group == "followup" else ""), "kind": "elastix",
         "options": {"iterations": options["elastix_iterations"], "affine_stage": group == "followup"}},
    ]


def _file_sha(path: Path) -> str | None:
    import hashlib

    return hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path.is_file() else None


def row_key(spec: dict, pair_path: Path, model_sha: str | None) -> str:
    """What makes a measured row the same: the method's spec (the model as its file's hash, not its path), the
    pair (its cache folder, which hashes the simulation settings, and seed)."""
    import hashlib

    options = {k: v for k, v in spec.get("options", {}).items() if k != "model"}
    uses_model = "model" in spec.get("options", {})
    key = {"spec": {**spec, "options": options}, "pair": list(Path(pair_path).parts[-2:]),
           "model": model_sha if uses_model else None}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def real_anatomy_plan(options: dict, model_path: str) -> list[tuple[list, dict]]:
    """The (case, spec) of section 5b in the order they are measured: :data:`FIRST_ROWS` on every case (in the
    settings' case order), then the other rows on every case."""
    work = [(case, spec) for case in options["cases"] for spec in real_anatomy_methods(options, model_path, case[0])]
    return sorted(work, key=lambda item: item[1]["row"] not in options["first_rows"][item[0][0]])  # stable


def run_real_anatomy(options: dict, model_dir: str, pair_cache: str, log, kinds=None, earlier=None,
                     groups=None, save=None, measure=None, remeasure=()) -> dict:
    """Section 5 on real anatomy (5b): every row of :func:`real_anatomy_methods` on every case of
    :func:`real_anatomy_settings`, one (pair, row) at a time in the order of :func:`real_anatomy_plan`.

    Resumable: after every row the result so far goes to ``save(result)`` (the caller writes it atomically), and a
    row of ``earlier`` with the same :func:`row_key` is kept, not measured again (unless its ``row`` id is in
    ``remeasure``). ``kinds`` (method kinds) and ``groups`` (``breath_hold``, ``followup``) limit what is measured
    in this run; the other rows of ``earlier`` that belong to the plan are kept. ``measure(spec, pair_paths,
    timeout)`` defaults to :func:`bench.accuracy.run_method`."""
    options = {**options, **{k: v for k, v in inference_defaults().items() if options.get(k) is None}}
    measure = measure or accuracy.run_method
    folder = Path(options["real_ct_dir"])
    missing = sorted({name for _, name, _ in options["cases"] if not (folder / name).is_file()})
    if missing:
        return {"skipped": f"real CTs not found in {folder}: {missing}"}
    model_path = Path(model_dir) / "model.pt"
    model_sha = _file_sha(model_path)
    card = json.loads(model_path.with_name("model.json").read_text()) if model_path.with_name(
        "model.json").is_file() else None
    pair_of = {}

    def simulation(case):
        return {"preset": "followup" if case[0] == "followup" else "realistic", "real_ct": str(folder / case[1])}

    def pair(case):  # simulated (once) only when a row on it is measured
        if tuple(case) not in pair_of:
            pair_of[tuple(case)] = accuracy.cached_pairs(options["spatial_size"], [case[2]], simulation(case),
                                                         pair_cache, log)[0]
        return pair_of[tuple(case)]

    plan = real_anatomy_plan(options, str(model_path))
    earlier_rows = {row["key"]: row for row in (earlier or {}).get("rows", []) if "key" in row}
    result = {"setup": {**options, "model": str(model_path), "model_sha": model_sha, "model_card": card,
                        "prealign_margin": AUTO_PREALIGN_MARGIN},  # what `prealign auto` used
              "cases": {}, "rows": []}
    if (earlier or {}).get("notes"):  # hand-written notes on the pairs (report._paragraphs) outlive a re-measurement
        result["notes"] = earlier["notes"]

    def record_case(case, path):
        loaded = accuracy.load_pair(path)
        result["cases"]["/".join(map(str, case))] = {
            "group": case[0], "ct": case[1], "seed": case[2], "pair_file": str(path), "spacing": list(loaded.spacing),
            "seen_in_training": case[1] in options["model_saw"], "simulated": loaded.simulation}

    keys = [row_key(spec, accuracy.pair_path(options["spatial_size"], case[2], simulation(case), pair_cache), model_sha)
            for case, spec in plan]

    def snapshot(index):  # what a kill after row `index` must leave: the rows so far and the earlier rows still ahead
        ahead = [earlier_rows[key] for key in keys[index + 1:] if key in earlier_rows]
        cases = {**{row["case"]: earlier["cases"][row["case"]] for row in ahead
                    if row.get("case") in (earlier or {}).get("cases", {})}, **result["cases"]}
        return {**result, "cases": cases, "rows": result["rows"] + ahead}

    for index, (case, spec) in enumerate(plan):
        case_id = "/".join(map(str, case))
        key = keys[index]
        wanted = (kinds is None or spec["kind"] in kinds) and (groups is None or case[0] in groups)
        # a row this run does not measure (another kind or group) keeps its earlier value, even one named in remeasure
        if key in earlier_rows and (spec["row"] not in remeasure or not wanted):
            result["rows"].append(earlier_rows[key])
            if case_id in (earlier or {}).get("cases", {}):
                result["cases"].setdefault(case_id, earlier["cases"][case_id])
            continue
        if not wanted:
            continue
        path = pair(case)
        if case_id not in result["cases"]:
            record_case(case, path)
        log(f"  [{index + 1}/{len(plan)}] {case_id}: {spec['name']}")
        defaults = next((r for r in result["rows"] if r["case"] == case_id and r["row_id"] == "defaults"), None)
        took = _took_network_start(defaults) if defaults else None
        if (spec["row"] == "network_forced" and took) or (spec["row"] == "from_identity" and took is False):
            # the start selection took this row's start on this pair: the same computation (bit-identical)
            row = {**defaults, "method": spec["name"], "options": spec["options"], "same_as": "defaults"}
        else:
            row = measure(spec, [path], timeout=options["method_timeout_s"])
        row.update(key=key, case=case_id, group=case[0], row_id=spec["row"])
        result["rows"].append(row)
        log(f"    " + (f"TRE {row['tre_mm']:.2f} mm (dense {row['tre_dense_mm']:.2f}), "
                       f"{row['seconds_per_pair']:.1f} s, peak {row['peak_rss_mib']:.0f} MiB"
                       + (" (the defaults' computation: their start selection took this start)"
                          if row.get("same_as") else "")
                       if "tre_mm" in row else str(row.get("skipped") or row.get("error")
                                                   or f"did not finish within {row.get('timed_out_s', 0):.0f} s")))
        if save is not None:
            save(snapshot(index))
    return result


def _took_network_start(row: dict) -> bool | None:
    """Whether the start selection of a measured ``optimize`` row took the network's start on every pair (True),
    the identity on every pair (False), or neither / not recorded (None). None too where ``prealign auto`` decided
    a proposed map by the best start's objective: a row with one start decides it by that start's, maybe otherwise."""
    records = (row.get("details") or {}).get("records") or []
    if any("start_objective_without_map" in r for r in records):
        return None
    starts = [float(v) > 0.5 for r in records for v in r.get("start_network", [])]
    if not starts or len(records) != row.get("pairs", len(records)):
        return None
    return True if all(starts) else False if not any(starts) else None


def run_accuracy(options: dict, model_dir: str | None, pair_cache: str, log, kinds=None) -> dict:
    """Section 5: every method of :func:`section5_methods` (or those of ``kinds``) on the same held-out simulated
    pairs."""
    options = {**options, **{k: v for k, v in inference_defaults().items() if options.get(k) is None}}
    pairs = accuracy.cached_pairs(options["spatial_size"], options["seeds"], options["simulation"], pair_cache, log)
    model_path = Path(model_dir) / "model.pt" if model_dir else None
    if options.get("tiny_model_seconds"):
        train = [accuracy.load_pair(p) for p in accuracy.cached_pairs(
            options["spatial_size"], options["tiny_model_seeds"], options["simulation"], pair_cache, log)]
        model_path = accuracy.train_tiny_model(train, options["tiny_model_seconds"],
                                               Path(pair_cache) / "quick_model", seed=0)
        log(f"  trained a tiny model for {options['tiny_model_seconds']} s (quick run)")
    methods = []
    for spec in section5_methods(options, str(model_path)):
        if kinds is not None and spec["kind"] not in kinds:
            continue
        methods.append(accuracy.run_method(spec, pairs, timeout=options.get("method_timeout_s", 3600)))
        row = methods[-1]
        log(f"  {spec['name']}: " + (f"TRE {row['tre_mm']:.2f} mm, {row['seconds_per_pair']:.1f} s/pair, "
                                      f"peak {row['peak_rss_mib']:.0f} MiB" if "tre_mm" in row
                                      else row.get("skipped") or row.get("error")
                                      or f"did not finish within {row['timed_out_s']:.0f} s"))
    first = accuracy.load_pair(pairs[0])
    card = None
    if model_path is not None and model_path.with_name("model.json").is_file():
        card = json.loads(model_path.with_name("model.json").read_text())
    return {
        "setup": {**options, "spacing": list(first.spacing), "pair_files": [str(p) for p in pairs],
                  "model": str(model_path), "model_card": card,
                  "simulated": [accuracy.load_pair(p).simulation for p in pairs],
                  "elastix_grid": "6 then 3 voxels (the zoo's 10 mm then 5 mm at Learn2Reg's lung resolution)"},
        "methods": methods,
    }


SECTION_KEYS = {1: "hyper_conditioning", 2: "regularizer", 3: "sweep", 4: "training_memory", 5: "accuracy",
                6: "capacity", 7: "accuracy_real", 8: "stages", 9: "response"}  # 7: section 5 on real anatomy
# (rendered in section 5); 8: where the time of a registration goes (rendered as section 7); 9: the model's (lam, mu)
# response and start (rendered as section 6b; run only when named)


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _write_results(results: dict, json_path: Path, md_path: Path) -> None:
    """``benchmarks.json`` and, when sections 1-6 are all there, ``benchmarks.md``, each replaced atomically."""
    _atomic_write(json_path, json.dumps(results, indent=2, default=float) + "\n")
    if all(key in results for section, key in SECTION_KEYS.items() if section not in (7, 8, 9)):
        _atomic_write(md_path, report.render(results))


def main(quick: bool = False, output_dir: str = "docs", sections=None, model_dir: str = "models",
         pair_cache: str | None = None, rows=None, groups=None, real_cts=None, remeasure=None,
         response_size=None) -> str:
    """Run the benchmark; write ``benchmarks.md`` and ``benchmarks.json`` into ``output_dir``; return the md path.

    Args:
        quick: tiny sizes and few repeats (a few minutes), for checking that everything runs.
        output_dir: where the two result files go (default ``docs``, relative to the repository root).
        sections: which sections to run (default: all but 9; with ``quick`` also not 7); the markdown needs 1-6; 7 is
            section 5 on real anatomy (the real CTs of ``../shared/data/real_ct``: a breath-hold pair on each, two
            follow-ups; about 1.5 h on 2 shared cores, resumable), rendered in section 5.
            8 is the per-stage time of a registration in the engine (about 10 min), rendered as section 7.
            9 (only when named) is the model's (lam, mu) response against the optimisation's and the steps the
            optimisation needs from its start (estimated tens of minutes; not yet timed), rendered as section 6b.
        model_dir: folder of the bundle's model (``model.pt`` + ``model.json``) for section 5 (relative to the
            repository root); ``--quick`` trains a tiny one instead.
        rows: method kinds (:data:`bench.accuracy.KINDS`) that section 5 re-measures, keeping the other rows of the
            existing ``benchmarks.json``, whose pairs it must share (e.g. ``"[network,optimize]"`` after a new
            release); default: every method.
        real_cts: the real CTs of section 7's breath-hold group (file names; default :data:`REAL_CTS`), e.g. those
            whose pairs are simulated already when time is short.
        groups: the pair groups of section 7 to measure (``"[followup]"``, ``"[breath_hold]"``; default both),
            keeping the others of the existing ``benchmarks.json``.
        remeasure: row ids of section 7 (``defaults``, ``from_identity``, ``network_forced``, ``network``,
            ``convex_adam``, ``demons``, ``elastix``, ``identity``) to measure again although a row with the same
            settings is in ``benchmarks.json`` (e.g. after a change of the bundle's code); section 7 otherwise keeps
            every row already measured with the same settings, so rerunning a killed run resumes it.
        pair_cache: where sections 5 and 6's simulated pairs are cached (default
            ``$XDG_CACHE_HOME/elastic_hypermorph_bundle/benchmark_pairs``).
        response_size: section 9's grid of voxels ``[X, Y, Z]`` (default 64 x 64 x 72; the field of view stays the
            Learn2Reg lung's, so a smaller grid has larger voxels), e.g. when the full run does not fit the time.

    Raises:
        ValueError: ``response_size`` not three positive whole numbers.
    """
    start = time.perf_counter()
    root = Path(__file__).resolve().parents[1]
    output = Path(output_dir) if Path(output_dir).is_absolute() else root / output_dir
    output.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    model_dir = str(Path(model_dir) if Path(model_dir).is_absolute() else root / model_dir)
    pair_cache = pair_cache or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                   / "elastic_hypermorph_bundle" / "benchmark_pairs")
    settings = settings_for(quick, cuda, response_size)
    settings["command"] = "python scripts/benchmark.py" + (" --quick" if quick else "")
    if response_size is not None:
        settings["command"] += f' --response_size "[{",".join(map(str, settings["response"]["spatial_size"]))}]"'
    if real_cts is not None:
        real_cts = [real_cts] if isinstance(real_cts, str) else list(real_cts)
        settings["accuracy_real"]["cases"] = [case for case in settings["accuracy_real"]["cases"]
                                              if case[0] != "breath_hold" or case[1] in real_cts]
        settings["command"] += f" --real_cts \"{real_cts}\""
    if sections is None:
        sections = [s for s in SECTION_KEYS if s != 9 and not (quick and s == 7)]
    sections = {int(s) for s in (sections if isinstance(sections, (list, tuple)) else [sections])}
    json_path = output / "benchmarks.json"
    # a subset run replaces only its own sections of an existing benchmarks.json; each section records its run
    results = json.loads(json_path.read_text()) if json_path.is_file() and sections != set(SECTION_KEYS) else {}
    results.pop("classical", None)  # the former section 5 (a 32^3 comparison), superseded by "accuracy"
    runs = results.setdefault("runs", {})
    for key in SECTION_KEYS.values():  # sections kept from a run that predates per-section records
        if key in results and key not in runs:
            runs[key] = {"date_utc": results["machine"]["date_utc"], "command": results["settings"]["command"],
                         "run_seconds": results.get("total_seconds", 0.0)}
    results.update(machine=machine_description(), settings={**results.get("settings", {}), **settings})

    def log(message):
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    if 1 in sections:
        log("section 1: hyper-conditioning cost")
        results["hyper_conditioning"] = []
        for config in settings["conditioning"]:
            device = config.get("device", "cpu")
            results["hyper_conditioning"] += cost.hyper_conditioning_cost([config], device, settings["memory_probes"])
            log(f"  {config['network']} {config['spatial_size']} batch {config['batch']} done")
    if 2 in sections:
        log("section 2: regularizer cost")
        results["regularizer"] = []
        for device in ["cpu"] + (["cuda"] if cuda else []):
            results["regularizer"] += cost.regularizer_cost(settings["regularizer_sizes"], device,
                                                            settings["regularizer_warmup"],
                                                            settings["regularizer_repeats"])
    device = "cuda" if cuda else "cpu"
    if 3 in sections:
        log("section 3: sweep throughput")
        results["sweep"] = cost.sweep_throughput(device=device, **settings["sweep"])
    if 4 in sections:
        log("section 4: full-size training memory")
        results["training_memory"] = cost.training_memory("HyperUNet", settings["full_size"], 1, device, 12.0)
    if isinstance(rows, str):
        rows = [rows]
    if rows is not None and (not set(rows) <= set(accuracy.KINDS) or not {5, 7} & sections):
        raise ValueError(f"--rows must name kinds of {accuracy.KINDS} and go with section 5 or 7, got {rows!r}.")
    if 5 in sections and rows is not None:
        log(f"section 5: the rows of {rows}, on the pairs of the existing results")
        if "accuracy" not in results:
            raise ValueError(f"--rows needs section 5 in {json_path}; run section 5 in full first.")
        earlier = results["accuracy"]
        same_pairs = {key: earlier["setup"][key] for key in ("spatial_size", "seeds", "simulation")}
        paths = accuracy.cached_pairs(same_pairs["spatial_size"], same_pairs["seeds"], same_pairs["simulation"],
                                      pair_cache, log)
        if [p.parts[-2:] for p in paths] != [Path(p).parts[-2:] for p in earlier["setup"]["pair_files"]]:
            raise ValueError("--rows: the pairs differ from those of the existing section 5.")
        # the earlier run's pairs, today's settings for the rest
        fresh = run_accuracy({**settings["accuracy"], **same_pairs}, model_dir, pair_cache, log, kinds=rows)
        earlier["methods"] = [m for m in earlier["methods"] if m["kind"] not in rows] + fresh["methods"]
        if {"network", "optimize"} & set(rows):
            bundle_settings = ("optimize_steps", "network_optimize_steps", "lam", "mu", "use_mask", "prealign",
                               "optimize_kwargs", "model", "model_card")
            earlier["setup"].update({key: fresh["setup"][key] for key in bundle_settings})
    elif 5 in sections:
        log("section 5: accuracy, time and memory of every method on the same held-out pairs")
        results["accuracy"] = run_accuracy(settings["accuracy"], model_dir, pair_cache, log)
    if 7 in sections:
        log("section 5 on real anatomy: breath-hold pairs on the real CTs and follow-up pairs"
            + (f", the rows of {rows}" if rows is not None else ""))
        quick_model = Path(pair_cache) / "quick_model"  # the tiny model of a --quick section 5, if it ran

        def save_real(partial):  # after every (pair, row): a killed run loses nothing (rerun the command to resume)
            results["accuracy_real"] = partial
            _write_results(results, json_path, output / "benchmarks.md")

        results["accuracy_real"] = run_real_anatomy(settings["accuracy_real"],
                                                    str(quick_model) if quick and quick_model.is_dir() else model_dir,
                                                    pair_cache, log,
                                                    kinds=rows, earlier=results.get("accuracy_real"),
                                                    groups=[groups] if isinstance(groups, str) else groups,
                                                    save=save_real,
                                                    remeasure=[remeasure] if isinstance(remeasure, str)
                                                    else list(remeasure or ()))
    if 6 in sections:
        log("section 6: conditioning capacity at an equal training budget")
        results["capacity"] = run_capacity(settings["capacity"], pair_cache, log)
    if 9 in sections:
        log("section 9 (rendered as 6b): the model's (lam, mu) response and the optimisation's steps from its start")
        results["response"] = run_response(settings["response"], model_dir, pair_cache, log)
    if 8 in sections:
        log("section 8 (rendered as 7): where the time of a registration goes (engine, per stage)")
        results["stages"] = run_stages(settings["stages"], model_dir, pair_cache, log)
    results["total_seconds"] = time.perf_counter() - start
    for old in ("accuracy_optimisation_rows", "accuracy_bundle_rows"):  # earlier names of re-measured rows' records
        if old in runs:
            runs["accuracy_rows[network,optimize]"] = runs.pop(old)
    if 5 in sections and rows is None:  # a full section 5 supersedes every re-measured row
        for key in [key for key in runs if key.startswith("accuracy_rows")]:
            del runs[key]
    for section in sections:
        key = f"accuracy_rows[{','.join(rows)}]" if section == 5 and rows is not None else SECTION_KEYS[section]
        if section == 7 and (rows is not None or groups is not None):  # a part of section 7: its own record
            key += "".join(f"[{','.join([part] if isinstance(part, str) else part)}]" for part in (groups, rows)
                           if part is not None)
        runs[key] = {"date_utc": results["machine"]["date_utc"], "command": settings["command"]
                                       + ("" if sections == set(SECTION_KEYS) else f' --sections "{sorted(sections)}"')
                                       + (f' --rows "[{",".join(rows)}]"' if rows is not None else "")
                                       + (f" --groups {','.join([groups] if isinstance(groups, str) else groups)}"
                                          if groups is not None and section == 7 else ""),
                                       "run_seconds": results["total_seconds"]}
    if "accuracy" in results and 5 in sections:
        figure = output / "figures" / "benchmark_tre_vs_time.png"
        report.plot_accuracy_time(results["accuracy"], figure)
        results["accuracy"]["figure"] = str(figure.relative_to(output))
    md_path = output / "benchmarks.md"
    _write_results(results, json_path, md_path)
    log(f"wrote {output / 'benchmarks.json'}" + (f" and {md_path}" if md_path.exists() else ""))
    return str(md_path)


if __name__ == "__main__":
    fire.Fire(main)
