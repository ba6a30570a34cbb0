"""Test-time discovery of the elastic parameters: grid sweep, resume, choice of the optimum, gradient refinement,
physical reading and comparison with the diffusion model, on a tiny simulated dataset with a briefly trained model.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset
from elastic_hypermorph_bundle.data.transforms import registration_transforms
from elastic_hypermorph_bundle.discovery import (
    ParameterSweep,
    SweepResults,
    compare_sweeps,
    pair_figure,
    prepare_pairs,
    refine_hyper,
    summarize,
    sweep_columns,
)
from elastic_hypermorph_bundle.discovery import comparison as discovery_comparison
from elastic_hypermorph_bundle.discovery.refine import objective_value
from elastic_hypermorph_bundle.hyperparams import HyperSpace
from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.networks import HyperUNet, warp_image
from elastic_hypermorph_bundle.physics import poisson_ratio
from elastic_hypermorph_bundle.workflow.datalists import pair_datalist

ROOT = Path(__file__).resolve().parents[1]
SIZE = (16, 16, 16)
GRID = {"grid_size": [3, 2], "grid_low": [0.0, 0.2], "grid_high": [1.0, 1.0]}  # mu > 0: every point a material


def _network_kwargs(hyper_dims: int) -> dict:
    return {
        "spatial_dims": 3,
        "in_channels": 2,
        "hyper_dims": hyper_dims,
        "encoder_features": [4, 8, 8],
        "decoder_features": [8, 8, 8, 4],
        "hyper_hidden": 16,
        "hyper_layers": 2,
    }


def _train_briefly(network: HyperUNet, space: HyperSpace, pairs, steps: int = 6) -> None:
    """A few Adam steps of the bundle's loss with per-step sampled hyperparameters."""
    loss = RegistrationLoss(space.regularizer)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    for step in range(steps):
        pair = pairs[step % len(pairs)]
        hyper = space.sample(1, torch.Generator().manual_seed(step))
        ddf = network(pair.network_input, hyper)
        value = loss(warp_image(pair.moving, ddf), pair.fixed, ddf, hyper)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    network.eval()


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _mean_by_point(rows: list[dict], metric: str) -> dict[int, float]:
    points = sorted({int(row["grid_index"]) for row in rows})
    return {g: np.mean([float(r[metric]) for r in rows if int(r["grid_index"]) == g]) for g in points}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_model):
    root = tmp_path_factory.mktemp("discovery")
    dataset = make_synthetic_dataset(root / "LungCT", num_pairs=3, spatial_size=SIZE, seed=3,
                                     poisson_range=(0.1, 0.45), noise_std=0.0)
    torch.manual_seed(0)
    space = HyperSpace("elastic", lam_range=(0.0, 1.0), mu_range=(0.0, 1.0))
    network = HyperUNet(**_network_kwargs(2))
    pairs = prepare_pairs(pair_datalist(dataset, "all"), registration_transforms(with_masks=False, with_keypoints=False))
    _train_briefly(network, space, pairs)
    ckpt = save_model(root / "models", network, space, _network_kwargs(2), spatial_size=SIZE)
    sweep_dir = root / "sweep_elastic"
    summary = ParameterSweep(network, space, dataset, sweep_dir, split="all", ckpt_path=ckpt, criterion="tre",
                             refine_steps=2, progress=False, spatial_size=SIZE, **GRID).run()
    return {"root": root, "dataset": dataset, "space": space, "network": network, "ckpt": ckpt,
            "sweep_dir": sweep_dir, "summary": summary}


def test_sweep_writes_complete_table_heatmaps_and_chooses_the_csv_optimum(setup):
    sweep_dir, summary = setup["sweep_dir"], setup["summary"]
    rows = _rows(sweep_dir / "sweep.csv")
    pair_ids = [pair["pair_id"] for pair in pair_datalist(setup["dataset"], "all")]
    assert list(rows[0]) == sweep_columns(("lam", "mu"), [1], with_points=True)
    assert sorted((int(r["grid_index"]), r["pair_id"]) for r in rows) == sorted(
        (g, p) for g in range(6) for p in pair_ids
    )
    for name in ("dice_mean", "tre_mm", "folding_percent", "sd_log_jacobian", "elastic_energy"):
        image = matplotlib.image.imread(sweep_dir / f"heatmap_{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100

    # dataset optimum: argmin over grid points of the CSV's mean TRE, inside the (zoomed) grid
    mean_tre = _mean_by_point(rows, "tre_mm")
    best = summary["best"]
    assert best["grid_index"] == min(mean_tre, key=mean_tre.get)
    assert best["mean"]["tre_mm"] == pytest.approx(mean_tre[best["grid_index"]])
    assert 0.0 <= best["lam"] <= 1.0 and 0.2 <= best["mu"] <= 1.0
    best_row = next(r for r in rows if int(r["grid_index"]) == best["grid_index"])
    assert (best["lam"], best["mu"]) == (float(best_row["lam"]), float(best_row["mu"]))
    assert best["physics"]["poisson_ratio"] == pytest.approx(poisson_ratio(best["lam"], best["mu"]))
    assert best["physics"]["lam_over_mu"] == pytest.approx(best["lam"] / best["mu"])

    # per-pair optima and their gain over the dataset optimum
    for pair in summary["per_pair"]:
        own = {int(r["grid_index"]): float(r["tre_mm"]) for r in rows if r["pair_id"] == pair["pair_id"]}
        assert pair["grid_index"] == min(own, key=own.get)
        assert pair["gain"] == pytest.approx(own[best["grid_index"]] - own[pair["grid_index"]])
        assert pair["gain"] >= 0
    gain = summary["per_pair_gain"]
    assert gain["per_pair_optimum_mean"] <= gain["dataset_optimum_mean"]

    # the refinement reported in the summary stays in the trained box and is not worse than its start
    refinement = summary["refinement"]
    assert refinement["objective"] <= refinement["start_objective"]
    assert refinement["start"] == {"lam": best["lam"], "mu": best["mu"]}
    assert all(0.0 <= step["lam"] <= 1.0 and 0.0 <= step["mu"] <= 1.0 for step in refinement["history"])
    assert refinement["evaluations"]["grid"] == 18


def test_resume_computes_only_the_missing_rows(setup, tmp_path):
    resumed = tmp_path / "sweep"
    shutil.copytree(setup["sweep_dir"], resumed)
    lines = (resumed / "sweep.csv").read_text().splitlines(keepends=True)
    kept = lines[:8]  # header + 7 rows: grid points 0 and 1 complete, point 2 has 1 of its 3 pairs
    (resumed / "sweep.csv").write_text("".join(kept) + "3,0.5,0.2,0001_00")  # a row cut by the interruption

    network = setup["network"]
    calls = {"generate_weights": 0, "forward": 0}
    generate = network.generate_weights

    def counting_generate(hyper):
        calls["generate_weights"] += 1
        return generate(hyper)

    network.generate_weights = counting_generate
    hook = network.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    try:
        sweep = ParameterSweep(network, setup["space"], setup["dataset"], resumed, split="all", ckpt_path=setup["ckpt"],
                               criterion="tre", refine_steps=0, progress=False, spatial_size=SIZE, **GRID)
        summary = sweep.run()
        assert summary["evaluations"]["grid_computed_this_run"] == 11
        assert calls == {"generate_weights": 4, "forward": 11}  # points 2..5, one network pass per missing row
        text = (resumed / "sweep.csv").read_text()
        assert text.startswith("".join(kept))
        rows = _rows(resumed / "sweep.csv")
        assert len(rows) == 18 and len({(r["grid_index"], r["pair_id"]) for r in rows}) == 18
        assert summary["best"]["grid_index"] == setup["summary"]["best"]["grid_index"]

        calls.update(generate_weights=0, forward=0)  # a finished sweep: nothing recomputed
        assert sweep.run()["evaluations"]["grid_computed_this_run"] == 0
        assert calls == {"generate_weights": 0, "forward": 0}
    finally:
        del network.generate_weights
        hook.remove()


def test_other_configuration_in_the_same_folder_is_refused(setup):
    sweep_dir = setup["sweep_dir"]
    before = {name: (sweep_dir / name).read_bytes() for name in ("sweep.csv", "sweep_config.json", "summary.json")}
    other = ParameterSweep(setup["network"], setup["space"], setup["dataset"], sweep_dir, split="all",
                           ckpt_path=setup["ckpt"], grid_size=2, progress=False, spatial_size=SIZE)
    with pytest.raises(ValueError, match="another configuration.*grid"):
        other.run()
    assert before == {name: (sweep_dir / name).read_bytes() for name in before}
    with pytest.raises(ValueError, match="outside the trained range"):  # a zoom must stay inside the trained box
        ParameterSweep(setup["network"], setup["space"], setup["dataset"], sweep_dir, grid_low=[0, 0], grid_high=[2, 1])


def test_sweep_refuses_preprocessing_other_than_the_models(setup, tmp_path):
    with pytest.raises(ValueError, match=r"--spatial_size \[32, 32, 32\] \(trained: \[16, 16, 16\]\)"):
        ParameterSweep(setup["network"], setup["space"], setup["dataset"], tmp_path / "sweep", ckpt_path=setup["ckpt"],
                       spatial_size=(32, 32, 32))
    with pytest.raises(ValueError, match=r"--hu_window \[-1000.0, 0.0\] \(trained: \[-1000.0, 500.0\]\)"):
        ParameterSweep(setup["network"], setup["space"], setup["dataset"], tmp_path / "sweep", ckpt_path=setup["ckpt"],
                       spatial_size=SIZE, hu_window=(-1000, 0))
    assert not (tmp_path / "sweep").exists()


def test_refinement_stays_in_the_trained_ranges_and_never_ends_worse(setup):
    space, network = setup["space"], setup["network"]
    datalist = pair_datalist(setup["dataset"], "all")[:1]
    pairs = prepare_pairs(datalist, registration_transforms(with_masks=True, with_keypoints=True), points="keypoints")
    for objective, start in (("tre", [[1.0, 0.0]]), ("dice", [[0.5, 1.0]])):  # corners and edges of the box
        result = refine_hyper(network, space, pairs, torch.tensor(start), objective, labels=[1], steps=3, lr=2.0)
        for row in result["history"] + [result["refined"]]:
            assert 0.0 <= row["lam"] <= 1.0 and 0.0 <= row["mu"] <= 1.0
        assert result["objective"] <= result["start_objective"]
        refined = torch.tensor([[result["refined"]["lam"], result["refined"]["mu"]]])
        assert objective_value(network, refined, pairs, objective, [1]) == pytest.approx(result["objective"], rel=1e-4)
        assert result["network_evaluations"] == 5  # start, 3 steps (forward + backward), the final point
    assert all(p.requires_grad for p in network.parameters())  # the network's parameters are left as they were


def test_correlation_uses_the_true_per_case_material(setup):
    spec = json.loads((setup["dataset"] / "LungCT_dataset.json").read_text())
    records = {}
    for key in ("training_paired_images", "registration_val", "registration_test"):
        for entry in spec[key]:
            case = Path(entry["fixed"]).name.split("_")[1]
            records[f"{case}_{case}"] = entry["simulation"]
    # the sweep carries each case's simulation record through to its per-pair result
    for pair in setup["summary"]["per_pair"]:
        assert pair["truth"] == records[pair["pair_id"]]

    # a table where each pair prefers a different material: r is Pearson of the real values, and needs 3 cases
    grid = np.array([[0.2, 1.0], [0.6, 0.5], [1.0, 0.25], [0.9, 0.1]])
    ids = sorted(records) + ["9999_9999"]
    tre = np.full((4, 4), 5.0)
    for j, g in enumerate([0, 2, 3, 1]):
        tre[g, j] = 1.0
    results = SweepResults(("lam", "mu"), grid, ids, {"tre_mm": tre, "folding_percent": np.zeros((4, 4))})
    summary = summarize(results, "tre", truths={**records, "9999_9999": None})
    entry = summary["material_correlation"]["poisson_ratio"]
    discovered = [poisson_ratio(*grid[g]) for g in (0, 2, 3)]
    true = [records[pair_id]["poisson_ratio"] for pair_id in ids[:3]]
    assert entry["pairs"] == ids[:3] and entry["n_cases"] == 3
    assert entry["discovered"] == pytest.approx(discovered) and entry["true"] == true
    assert entry["pearson_r"] == pytest.approx(pearsonr(discovered, true)[0])
    ratio = summary["material_correlation"]["lam_over_mu"]
    true_ratio = [records[p]["lam"] / records[p]["mu"] for p in ids[:3]]
    assert ratio["pearson_r"] == pytest.approx(pearsonr([g[0] / g[1] for g in grid[[0, 2, 3]]], true_ratio)[0])

    two_known = summarize(results, "tre", truths={ids[0]: records[ids[0]], ids[1]: records[ids[1]]})
    assert two_known["material_correlation"]["poisson_ratio"]["pearson_r"] is None
    assert "need at least 3" in two_known["material_correlation"]["poisson_ratio"]["reason"]


def test_unsupervised_criterion_maximises_similarity_under_the_folding_bound():
    grid = np.array([[0.0], [0.5], [1.0]])
    lncc = np.array([[0.9, 0.8], [0.7, 0.75], [0.5, 0.6]])  # weaker regularization, more similar ...
    folding = np.array([[3.0, 0.1], [0.4, 0.6], [0.0, 0.0]])  # ... and more folding
    results = SweepResults(("alpha",), grid, ["a", "b"], {"lncc": lncc, "folding_percent": folding})
    summary = summarize(results, "auto", max_folding_percent=0.5)
    assert summary["criterion"]["name"] == "similarity"
    assert summary["best"]["grid_index"] == 1  # point 0 is more similar but folds 1.55% on average
    assert [pair["grid_index"] for pair in summary["per_pair"]] == [1, 0]  # per pair: that pair's own folding
    assert "material_correlation" not in summary
    with pytest.raises(ValueError, match="needs 'dice_mean'"):
        summarize(results, "dice")


@pytest.mark.slow
def test_diffusion_sweep_comparison_and_pair_figure(setup, save_model, monkeypatch):
    root = setup["root"]
    torch.manual_seed(1)
    space = HyperSpace("diffusion", alpha_range=(0.0, 1.0))
    network = HyperUNet(**_network_kwargs(1)).eval()
    window = (-1000.0, 0.0)  # the diffusion model was trained with another HU window than the elastic one
    ckpt = save_model(root / "models_diffusion", network, space, _network_kwargs(1), spatial_size=SIZE,
                      hu_window=window)
    diffusion_dir = root / "sweep_diffusion"
    summary = ParameterSweep(network, space, setup["dataset"], diffusion_dir, split="all", ckpt_path=ckpt,
                             grid_size=3, criterion="tre", refine_steps=0, progress=False, spatial_size=SIZE,
                             hu_window=window).run()
    rows = _rows(diffusion_dir / "sweep.csv")
    assert len(rows) == 9 and (diffusion_dir / "curve_tre_mm.png").is_file()
    assert all(math.isnan(float(r["elastic_energy"])) for r in rows)

    comparison = compare_sweeps(setup["sweep_dir"], diffusion_dir, root / "comparison")
    table = {row["regularizer"]: row for row in comparison["table"]}
    for name, sweep_summary, folder in (("elastic", setup["summary"], setup["sweep_dir"]),
                                        ("diffusion", summary, diffusion_dir)):
        at_best = _mean_by_point(_rows(folder / "sweep.csv"), "tre_mm")[sweep_summary["best"]["grid_index"]]
        assert table[name]["tre_mm_mean"] == pytest.approx(at_best)
    assert (root / "comparison" / "comparison.csv").is_file()
    assert matplotlib.image.imread(root / "comparison" / "comparison.png").ndim == 3

    windows = []  # each model's row is preprocessed as its own sweep was (not both with the elastic one's)
    real_transforms = discovery_comparison.registration_transforms
    monkeypatch.setattr(discovery_comparison, "registration_transforms",
                        lambda **kw: windows.append(tuple(kw["hu_window"])) or real_transforms(**kw))
    figure = pair_figure(setup["sweep_dir"], diffusion_dir, root / "comparison")
    assert matplotlib.image.imread(figure).shape[1] > 500
    assert windows == [(-1000.0, 500.0), window]

    # an [alpha] sweep of the fixed-elastic baseline is labelled as such, not as "diffusion"
    fixed_dir = root / "sweep_elastic_fixed"
    shutil.copytree(diffusion_dir, fixed_dir)
    config = json.loads((fixed_dir / "sweep_config.json").read_text())
    config["identity"]["regularizer"] = "elastic_fixed"
    (fixed_dir / "sweep_config.json").write_text(json.dumps(config))
    labelled = compare_sweeps(setup["sweep_dir"], fixed_dir, root / "comparison_fixed")
    assert [row["regularizer"] for row in labelled["table"]] == ["elastic", "elastic_fixed"]
    assert set(next(iter(labelled["per_pair"].values()))["tre_mm"]) == {"elastic", "elastic_fixed"}


def test_importing_discovery_leaves_the_matplotlib_backend_alone():
    code = ("import matplotlib; matplotlib.use('pdf'); import elastic_hypermorph_bundle.discovery; "
            "print(matplotlib.get_backend())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "pdf"


def _pipeline_model(setup, save_model):
    """The setup's network with a card whose network grid differs from the images' (resampled to 1.5 x their voxel
    size, then padded to 16^3), so pairs registered on their own grid go through NetworkGrid, as with a real model."""
    spacing = prepare_pairs(pair_datalist(setup["dataset"], "all")[:1], registration_transforms())[0].spacing
    pixdim = [1.5 * s for s in spacing]
    ckpt = save_model(setup["root"] / "models_coarse", setup["network"], setup["space"], _network_kwargs(2),
                      spatial_size=SIZE, pixdim=pixdim)
    return ckpt, pixdim


# a pre-alignment that runs (an affine map of a few steps): the sweep computes it once per pair, inference per call
PIPELINE = {"steps": 3, "levels": 1, "grid": 1, "prealign": "affine", "prealign_steps": 5}


def test_pipeline_sweep_row_equals_a_single_inference_at_that_point(setup, save_model, tmp_path, monkeypatch):
    from monai.engines import SupervisedEvaluator

    from elastic_hypermorph_bundle.data.transforms import inference_transforms
    from elastic_hypermorph_bundle.discovery import sweep as sweep_module
    from elastic_hypermorph_bundle.discovery.sweep import field_metrics
    from elastic_hypermorph_bundle.workflow import instance as instance_module
    from elastic_hypermorph_bundle.networks.grid import NetworkGrid
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization
    from elastic_hypermorph_bundle.workflow.steps import RegisterStep

    ckpt, pixdim = _pipeline_model(setup, save_model)
    grid = {"grid_size": [2, 1], "grid_low": [0.0, 0.5], "grid_high": [1.0, 0.5]}
    sweep = ParameterSweep(setup["network"], setup["space"], setup["dataset"], tmp_path / "sweep", split="all",
                           ckpt_path=ckpt, criterion="tre", progress=False, spatial_size=SIZE, pixdim=pixdim,
                           instance=InstanceOptimization(**PIPELINE), **grid)
    # the similarity's features (no (lam, mu) in them) are computed once per pair for all its grid points and its
    # mind column, not once per row; the rows still equal inference's, which computes them per call (below)
    features = []
    with monkeypatch.context() as patch:
        for module in (sweep_module, instance_module):
            counted = module.similarity_features
            patch.setattr(module, "similarity_features",
                          lambda *args, counted=counted, **kwargs: features.append(1) or counted(*args, **kwargs))
        summary = sweep.run()
    rows = _rows(tmp_path / "sweep" / "sweep.csv")
    assert len(rows) == 6 and len(features) == 3  # 2 points x 3 pairs, features once per pair
    assert list(rows[0]) == sweep_columns(("lam", "mu"), [1], with_points=True, pipeline=True)
    assert summary["registration"]["pipeline"]["steps"] == [3] and summary["refinement"]["skipped"]

    # the user's inference at grid point 1 for the first pair: the evaluator's RegisterStep, same settings
    datalist = pair_datalist(setup["dataset"], "all")[:1]
    transform = inference_transforms("image", SIZE, pixdim)
    batch = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else [v]) for k, v in transform(dict(datalist[0])).items()
             if k in ("fixed_image", "moving_image", "fixed_mask", "moving_mask", "pair_id")}
    step = RegisterStep(torch.tensor([[1.0, 0.5]]), InstanceOptimization(**PIPELINE), NetworkGrid(SIZE, pixdim))
    evaluator = SupervisedEvaluator("cpu", [batch], setup["network"], iteration_update=step, decollate=False)
    evaluator.run()
    pair = sweep.prepare()[0][0]
    inference = field_metrics(evaluator.state.output["pred"], pair, {"lam": 1.0, "mu": 0.5}, [1])
    row = next(r for r in rows if r["grid_index"] == "1" and r["pair_id"] == pair.pair_id)
    assert (float(row["lam"]), float(row["mu"])) == (1.0, 0.5)
    for key, value in inference.items():
        assert float(row[key]) == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # the network-alone columns are inference with no optimisation
    network_only = RegisterStep(torch.tensor([[1.0, 0.5]]), None, NetworkGrid(SIZE, pixdim))
    evaluator = SupervisedEvaluator("cpu", [batch], setup["network"], iteration_update=network_only, decollate=False)
    evaluator.run()
    alone = field_metrics(evaluator.state.output["pred"], pair, {"lam": 1.0, "mu": 0.5}, [1])
    for key, value in alone.items():
        assert float(row[f"network_{key}"]) == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert float(row["tre_mm"]) != pytest.approx(float(row["network_tre_mm"]), rel=1e-3)  # the stages did something

    # resume: a cut table recomputes only its missing rows (each one network pass and one optimisation)
    text = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines(keepends=True)
    (tmp_path / "sweep" / "sweep.csv").write_text("".join(text[:3]) + text[3][:20])  # 2 rows kept, the 3rd cut
    calls, prepared = [], []
    register, prepare = sweep.pipeline.register, sweep.pipeline.prepare
    sweep.pipeline.register = lambda *args, **kwargs: calls.append(1) or register(*args, **kwargs)
    sweep.pipeline.prepare = lambda *args, **kwargs: prepared.append(1) or prepare(*args, **kwargs)
    again = sweep.run()
    assert again["evaluations"]["grid_computed_this_run"] == 4 and len(calls) == 4
    assert len(prepared) == 3  # the pre-alignment once per pair with missing rows (3 pairs), not once per row (4)
    assert _rows(tmp_path / "sweep" / "sweep.csv")[:2] == rows[:2]
    assert again["best"] == summary["best"]


def test_unsupervised_choice_respects_its_smoothness_bounds():
    grid = np.array([[0.0, 0.0], [0.2, 0.05], [0.5, 0.1], [1.0, 1.0]])
    lncc = np.array([[0.95, 0.9], [0.9, 0.85], [0.8, 0.84], [0.7, 0.6]])  # weaker regularization, more similar ...
    folding = np.array([[2.0, 0.0], [0.1, 0.0], [0.0, 0.0], [0.0, 0.0]])  # ... folds ...
    sdlogj = np.array([[0.3, 0.4], [0.12, 0.25], [0.08, 0.1], [0.02, 0.03]])  # ... and is rougher
    tre = np.array([[1.0, 1.2], [1.1, 1.5], [1.4, 1.3], [3.0, 3.0]])
    results = SweepResults(("lam", "mu"), grid, ["a", "b"], {"lncc": lncc, "folding_percent": folding,
                                                            "sd_log_jacobian": sdlogj, "tre_mm": tre})
    summary = summarize(results, "tre", max_folding_percent=0.5, max_sd_log_jacobian=0.2)
    chosen = summary["unsupervised"]
    assert [pair["grid_index"] for pair in chosen["per_pair"]] == [1, 2]
    for pair, j in zip(chosen["per_pair"], range(2)):
        assert pair["feasible"] and folding[pair["grid_index"], j] <= 0.5 and sdlogj[pair["grid_index"], j] <= 0.2
        assert pair["oracle"]["grid_index"] == int(np.argmin(tre[:, j]))
    assert chosen["mean_tre_mm"] == pytest.approx((1.1 + 1.3) / 2)
    assert chosen["oracle_mean_tre_mm"] == pytest.approx((1.0 + 1.2) / 2)
    assert chosen["regret_percent"] == pytest.approx(100 * (2.4 / 2.2 - 1))
    # a bound no point meets: the least folding point, ties to the smoothest, marked infeasible
    unmet = summarize(results, "tre", max_folding_percent=0.5, max_sd_log_jacobian=0.01)["unsupervised"]["per_pair"]
    assert [(pair["grid_index"], pair["feasible"]) for pair in unmet] == [(3, False), (3, False)]
    # without the SD log J bound the rough point 0 of pair b is taken; the similarity criterion applies both bounds
    assert summarize(results, "tre", max_folding_percent=0.5)["unsupervised"]["per_pair"][1]["grid_index"] == 0
    bounded = summarize(results, "similarity", max_folding_percent=0.5, max_sd_log_jacobian=0.2)
    assert bounded["best"]["grid_index"] == 1 and bounded["criterion"]["max_sd_log_jacobian"] == 0.2  # mean 0.185
    assert summarize(results, "similarity", max_folding_percent=0.5, max_sd_log_jacobian=0.15)["best"]["grid_index"] == 2


def test_unsupervised_scores_mind_and_objective_under_the_bounds():
    from elastic_hypermorph_bundle.discovery.selection import unsupervised_choice

    grid = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    mind = np.array([[0.10], [0.12], [0.13], [0.20]])  # the weakest regularization fits best ...
    volume, shear = np.array([[0.05], [0.02], [0.01], [0.01]]), np.array([[0.04], [0.01], [0.03], [0.01]])
    sdlogj, folding, tre = np.array([[0.3], [0.1], [0.1], [0.05]]), np.zeros((4, 1)), np.array([[2.0], [1.5], [1.0], [3.0]])
    lncc = np.array([[0.9], [0.8], [0.7], [0.6]])
    results = SweepResults(("lam", "mu"), grid, ["a"], {"mind": mind, "energy_volume": volume, "energy_shear": shear,
                                                       "sd_log_jacobian": sdlogj, "folding_percent": folding,
                                                       "tre_mm": tre, "lncc": lncc})
    # ... but is too rough for the SD log J bound, so MIND takes the next best point that meets it
    by_mind = unsupervised_choice(results, 0.5, 0.2, score="mind")
    assert by_mind["per_pair"][0]["grid_index"] == 1 and by_mind["per_pair"][0]["feasible"]
    # the objective at the grid's centre (0.5, 0.5): mind + 0.5 volume + 0.5 shear = .145, .135, .15, .21
    by_objective = unsupervised_choice(results, 0.5, None, score="objective")
    assert by_objective["reference"] == [0.5, 0.5] and by_objective["per_pair"][0]["grid_index"] == 1
    assert unsupervised_choice(results, 0.5, None, score="objective", reference=(2.0, 0.0))["per_pair"][0][
        "grid_index"] == 2  # .20, .16, .15, .22
    # every score's regret against the TRE oracle (point 2, 1.0 mm) is reported beside the chosen one's
    alternatives = by_mind["alternatives"]
    assert set(alternatives) == {"lncc", "mind", "objective"}
    assert alternatives["mind"]["regret_percent"] == pytest.approx(50.0) == by_mind["regret_percent"]
    assert alternatives["lncc"]["grid_index"] == [1]  # max LNCC under the bound
    with pytest.raises(ValueError, match="unsupervised score"):
        unsupervised_choice(results, score="ssd")


def test_sweep_reports_the_instance_optimisation_gain_at_the_selected_point(setup, tmp_path):
    from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

    grid = {"grid_size": [2, 1], "grid_low": [0.0, 0.5], "grid_high": [1.0, 0.5]}
    summary = ParameterSweep(setup["network"], setup["space"], setup["dataset"], tmp_path / "sweep", split="all",
                             ckpt_path=setup["ckpt"], criterion="tre", progress=False, spatial_size=SIZE,
                             instance=InstanceOptimization(steps=30, levels=1, grid=1), instance_steps=[2], **grid).run()
    result = summary["instance_optimization"]
    best = summary["best"]
    assert result["point"] == pytest.approx({"lam": best["lam"], "mu": best["mu"]})
    # the sweep's rows ran its steps, the selected point inference's (one count per level, as they ran)
    assert summary["registration"]["pipeline"]["steps"] == [2] and result["settings"]["steps"] == [30]
    # the network alone at the point is the sweep's own network column; inference's 30 steps improve on it (on 16^3
    # voxels of about 20 mm the network is already within a fifth of a voxel)
    assert result["network"]["tre_mm"] == pytest.approx(best["mean"]["network_tre_mm"], rel=1e-4)
    assert result["optimized"]["tre_mm"] < 0.95 * result["network"]["tre_mm"]
    assert result["gain"]["tre_mm"] == pytest.approx(result["optimized"]["tre_mm"] - result["network"]["tre_mm"])
    assert setup["summary"]["instance_optimization"] == {"skipped": "instance_steps is 0 and prealign is none."}
