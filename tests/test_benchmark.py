"""Benchmark machinery: ITK/elastix field conversion, classical peers' conventions, plain twins, timers, probes,
ground-truth metrics, and an end-to-end ``--quick`` run writing well-formed results (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp
from scipy.ndimage import gaussian_filter

from bench import classical
from bench.nets import PlainConv, PlainTwin, build_network
from bench.timing import interleaved_medians
from elastic_hypermorph_bundle.networks import HyperConv

ROOT = Path(__file__).resolve().parents[1]
needs_elastix = pytest.mark.skipif(not classical.elastix_available(), reason="itk-elastix is not installed")
needs_convex_adam = pytest.mark.skipif(not classical.convex_adam_available(), reason="convexAdam is not installed")
needs_sitk = pytest.mark.skipif(importlib.util.find_spec("SimpleITK") is None, reason="SimpleITK is not installed")

SHAPE = (20, 24, 28)  # distinct sizes and spacings catch any axis-order mix-up
SPACING = (1.5, 2.0, 2.5)


def _blob(center, shape=SHAPE, sigma=3.0):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    return np.exp(-((grid - np.reshape(center, (3, 1, 1, 1))) ** 2).sum(0) / (2 * sigma**2)).astype(np.float32)


def test_itk_field_to_ddf_axes_and_units():
    field = np.zeros((SHAPE[2], SHAPE[1], SHAPE[0], 3))  # ITK order (Z, Y, X), components physical x, y, z
    field[7, 5, 3] = (3.0, -4.0, 5.0)
    ddf = classical.itk_field_to_ddf(field, SPACING)
    assert ddf.shape == (3, *SHAPE)
    np.testing.assert_allclose(ddf[:, 3, 5, 7], np.array([3.0, -4.0, 5.0]) / SPACING)
    assert np.count_nonzero(ddf) == 3
    with pytest.raises(ValueError, match="displacement field array"):
        classical.itk_field_to_ddf(np.zeros((4, 4, 4, 2)), SPACING)


@needs_elastix
def test_transformix_translation_matches_package_ddf_and_warp():
    import itk

    translation_mm = (3.0, -4.0, 5.0)
    parameters = itk.ParameterObject.New()
    parameter_map = parameters.GetDefaultParameterMap("translation")
    for key, value in {
        "Transform": ["TranslationTransform"], "NumberOfParameters": ["3"],
        "TransformParameters": [str(t) for t in translation_mm], "Size": [str(n) for n in SHAPE],
        "Spacing": [str(s) for s in SPACING], "Origin": ["0", "0", "0"], "Index": ["0", "0", "0"],
        "Direction": ["1", "0", "0", "0", "1", "0", "0", "0", "1"], "ResultImagePixelType": ["float"],
        "ResampleInterpolator": ["FinalLinearInterpolator"],
    }.items():
        parameter_map[key] = value
    parameters.AddParameterMap(parameter_map)
    moving = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    moving_image = classical._itk_image(moving, SPACING)

    ddf = classical.itk_field_to_ddf(classical._transformix_field(moving_image, parameters), SPACING)
    expected = np.array(translation_mm) / np.array(SPACING)
    np.testing.assert_allclose(ddf.reshape(3, -1).T, np.broadcast_to(expected, (ddf[0].size, 3)), atol=1e-4)

    # transformix's resampled moving image == MONAI Warp of the moving image with the converted DDF
    resampled = np.asarray(itk.transformix_filter(moving_image, parameters)).T
    warped = Warp(mode="bilinear", padding_mode="zeros")(torch.from_numpy(moving)[None, None],
                                                         torch.from_numpy(ddf)[None])[0, 0].numpy()
    np.testing.assert_allclose(resampled[4:-4, 4:-4, 4:-4], warped[4:-4, 4:-4, 4:-4], atol=1e-4)


@needs_elastix
def test_elastix_recovers_known_shift_in_package_convention():
    import itk

    shift = np.array([2.0, -1.5, 1.0])  # voxels: moving content sits at fixed content + shift
    center = np.array(SHAPE) / 2
    fixed, moving = _blob(center), _blob(center + shift)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("translation"))
    ddf = classical.elastix_register(fixed, moving, SPACING, parameters)
    # backward convention: moving(x + u(x)) = fixed(x), so u = +shift everywhere
    np.testing.assert_allclose(ddf.reshape(3, -1).mean(1), shift, atol=0.15)


@needs_sitk
def test_demons_moves_in_the_direction_of_the_shift():
    shift = np.array([1.5, -1.0, 1.0])
    center = np.array(SHAPE) / 2
    fixed, moving = _blob(center, sigma=4.0), _blob(center + shift, sigma=4.0)
    ddf = classical.demons_register(fixed, moving, SPACING, iterations=(50,), smoothing_sigma=1.0)
    near = _blob(center, sigma=4.0) > 0.5
    mean = ddf[:, near].mean(1)
    assert np.all(np.sign(mean) == np.sign(shift))
    np.testing.assert_allclose(mean, shift, atol=0.6)


def test_convex_adam_field_conversion_moves_channels_first():
    field = np.zeros((*SHAPE, 3))
    field[3, 5, 7] = (1.0, -2.0, 3.0)
    ddf = classical.convex_adam_field_to_ddf(field)
    assert ddf.shape == (3, *SHAPE) and ddf.dtype == np.float32
    np.testing.assert_array_equal(ddf[:, 3, 5, 7], [1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match="ConvexAdam displacement"):
        classical.convex_adam_field_to_ddf(np.zeros((3, *SHAPE)))


@needs_convex_adam
def test_convex_adam_recovers_known_shift_in_package_convention():
    # smooth random texture; the moving image is the fixed one with its content moved by +shift voxels, so the
    # backward field is u = +shift (moving(x + u) = fixed(x)); distinct sizes per axis catch an axis mix-up
    shape, shift = (48, 42, 36), np.array([3, -2, 4])
    fixed = gaussian_filter(np.random.default_rng(0).standard_normal([n + 16 for n in shape]), 2.0)
    moving = np.roll(fixed, shift, axis=(0, 1, 2))
    crop = tuple(slice(8, 8 + n) for n in shape)
    ddf = classical.convex_adam_register(fixed[crop], moving[crop])
    assert ddf.shape == (3, *shape)
    inner = ddf[:, 10:-10, 10:-10, 10:-10].reshape(3, -1)
    np.testing.assert_allclose(np.median(inner, axis=1), shift, atol=0.3)
    # and the package's warp with the converted field reproduces the fixed image
    warped = Warp(mode="bilinear", padding_mode="border")(torch.from_numpy(moving[crop].astype(np.float32))[None, None],
                                                         torch.from_numpy(ddf)[None])[0, 0].numpy()
    error = np.abs(warped - fixed[crop])[10:-10, 10:-10, 10:-10].mean()
    assert error < 0.25 * np.abs(moving[crop] - fixed[crop])[10:-10, 10:-10, 10:-10].mean()


def test_pair_cache_round_trip_and_reuse(tmp_path):
    from bench.accuracy import cached_pairs, load_pair
    from elastic_hypermorph_bundle.simulation.generator import simulate_pair

    settings = {"max_displacement_range": [6.0, 8.0]}
    paths = cached_pairs((16, 16, 16), [5], settings, tmp_path, log=lambda message: None)
    pair, expected = load_pair(paths[0]), simulate_pair((16, 16, 16), seed=5, **settings)
    np.testing.assert_array_equal(pair.fixed_image, expected.fixed_image)
    np.testing.assert_array_equal(pair.displacement, expected.displacement)
    assert pair.spacing == expected.spacing and pair.simulation == expected.simulation
    modified = paths[0].stat().st_mtime_ns
    assert cached_pairs((16, 16, 16), [5], settings, tmp_path, log=None) == paths  # reused, not re-simulated
    assert paths[0].stat().st_mtime_ns == modified
    other = cached_pairs((16, 16, 16), [5], {"max_displacement_range": [6.0, 9.0]}, tmp_path, log=lambda m: None)
    assert other[0].parent != paths[0].parent  # other settings, other folder


def test_network_field_resampled_to_the_pair_grid_keeps_its_physical_size():
    from bench.register_probe import network_ddf

    class OneVoxelShift(torch.nn.Module):  # 1 voxel of its own grid along every axis
        def forward(self, x, weights=None):
            return torch.ones(x.shape[0], 3, *x.shape[2:])

    fixed = torch.rand(1, 1, 21, 31, 41)
    ddf = network_ddf(OneVoxelShift(), None, fixed, fixed, grid=(11, 11, 11))
    assert ddf.shape == (1, 3, 21, 31, 41)
    torch.testing.assert_close(ddf[0, :, 3, 4, 5], torch.tensor([2.0, 3.0, 4.0]))
    torch.testing.assert_close(network_ddf(OneVoxelShift(), None, fixed, fixed), torch.ones(1, 3, 21, 31, 41))


@pytest.mark.parametrize("name", ["HyperUNet", "HyperLocalNet"])
def test_plain_twin_has_the_same_layout_without_hyper_conditioning(name):
    torch.manual_seed(0)
    hyper_net = build_network(name, "hyper")
    twin = PlainTwin(hyper_net)
    hyper_convs = [(n, m.kernel_shape) for n, m in hyper_net.named_modules() if isinstance(m, HyperConv)]
    plain_convs = [(n.removeprefix("backbone."), tuple(m.conv.weight.shape))
                   for n, m in twin.named_modules() if isinstance(m, PlainConv)]
    assert plain_convs == hyper_convs and len(plain_convs) > 3
    assert not any(isinstance(m, HyperConv) for m in twin.modules())
    assert not hasattr(twin.backbone, "hypernetwork")
    assert any(isinstance(m, HyperConv) for m in hyper_net.modules())  # the original is untouched
    x = torch.rand(2, 2, 16, 16, 16)
    with torch.no_grad():
        ddf = twin(x)
        assert ddf.shape == (2, 3, 16, 16, 16) == hyper_net(x, torch.rand(2, 2)).shape
        assert torch.equal(twin(x, torch.rand(2, 2)), ddf)  # hyperparameters have no effect on the twin


def test_interleaved_medians_alternates_order_after_warmup():
    calls = []
    durations = {"a": iter([0.0] * 10), "b": iter([0.0] * 10)}
    candidates = {name: (lambda name=name: calls.append(name) or next(durations[name])) for name in ("a", "b")}
    result = interleaved_medians(candidates, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert set(result) == {"a", "b"} and all(len(r["times_s"]) == 3 for r in result.values())
    assert all(r["min_s"] <= r["median_s"] for r in result.values())
    with pytest.raises(ValueError, match="repeats"):
        interleaved_medians(candidates, repeats=0, warmup=0)


def test_ground_truth_scores_zero_error_and_identity_does_not():
    from bench.accuracy import evaluate_ddf
    from elastic_hypermorph_bundle.simulation.generator import simulate_pair

    pair = simulate_pair((24, 24, 24), seed=3)
    truth = evaluate_ddf(pair.displacement, pair)
    identity = evaluate_ddf(np.zeros_like(pair.displacement), pair)
    assert truth["tre_dense_mm"] == pytest.approx(0.0, abs=1e-5)
    assert truth["tre_mm"] < 0.05 * identity["tre_mm"]
    assert identity["tre_dense_mm"] > 1.0 and identity["folding_percent"] == 0.0 and identity["sd_log_jacobian"] == 0.0
    assert truth["dice_mean"] > identity["dice_mean"]


def test_capacity_variants_differ_only_in_conditioning():
    from bench.capacity import build_variant
    from bench.nets import count_parameters

    sizes = {v: count_parameters(build_variant(v, seed=0)[1]) for v in ("plain", "instance_norm", "rank1", "rank4")}
    assert sizes["plain"] < sizes["instance_norm"] < sizes["rank1"] < sizes["rank4"]
    # the same seed builds the same network: equal budgets start from equal weights
    a, b = build_variant("rank1", seed=3)[1], build_variant("rank1", seed=3)[1]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="variant must be one of"):
        build_variant("dense", seed=0)


@pytest.mark.slow
def test_quick_benchmark_writes_six_sections_and_parsable_json(tmp_path):
    import benchmark
    md_path = Path(benchmark.main(quick=True, output_dir=str(tmp_path), pair_cache=str(tmp_path / "pairs")))
    markdown = md_path.read_text()
    from bench.report import SECTIONS

    assert all(f"## {section}" in markdown for section in SECTIONS)
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    assert {"machine", "settings", "hyper_conditioning", "regularizer", "sweep", "training_memory", "accuracy",
            "capacity", "total_seconds", "runs"} <= set(results)
    assert results["machine"]["cpu_count"] >= 1 and "torch" in results["machine"]
    assert all(row["ratio"] > 0 for row in results["hyper_conditioning"])
    # the memory probes (a fresh process per variant, bench.probe): monotonic peaks, and section 4's saved tensors
    peaks = {row["mode"]: row["peak_memory_mib"] for row in results["hyper_conditioning"]}
    for variant, baseline in results["hyper_conditioning"][0]["baseline_memory_mib"].items():
        assert 0 < baseline <= peaks["inference"][variant] <= peaks["training"][variant], (variant, peaks)
    memory = results["training_memory"]["fp32"]
    assert "error" not in memory, memory
    assert 0 < memory["baseline_mib"] <= memory["training_peak_mib"]
    assert memory["saved_total_mib"] > 0 and memory["saved_by_module_mib"]
    rows = {row["kind"]: row for row in results["accuracy"]["methods"]}
    assert {"identity", "elastix", "demons", "convex_adam", "network", "optimize"} <= set(rows)
    assert all("error" not in row for row in results["accuracy"]["methods"]), results["accuracy"]["methods"]
    for kind in ("demons", "convex_adam", "network"):
        assert rows[kind]["peak_rss_mib"] >= rows[kind]["baseline_rss_mib"] > 0
        assert rows[kind]["seconds_per_pair"] > 0
    identity = rows["identity"]
    assert identity["folding_percent"] == 0.0 and identity["sd_log_jacobian"] == 0.0
    assert rows["convex_adam"]["tre_mm"] < identity["tre_mm"]
    assert (tmp_path / results["accuracy"]["figure"]).is_file()
    assert "## 5." in markdown and "ConvexAdam" in markdown
    assert not (ROOT / "deformationField.nii").exists()  # transformix must not write into the working directory
    capacity = {row["variant"]: row for row in results["capacity"]["rows"]}
    assert set(capacity) == {"plain", "instance_norm", "rank1", "full"}
    assert capacity["plain"]["field_change_mm"] == 0.0 and capacity["plain"]["step_ratio"] == 1.0
    assert all(row["field_change_mm"] > 0 for key, row in capacity.items() if key != "plain")  # conditioning acts
    assert all(np.isfinite(row["heldout_objective"]) and row["steps"] == 3 for row in capacity.values())
    assert "## 6." in markdown and "kernel map, full (HyperMorph)" in markdown
    paths = {path["name"]: path for path in results["stages"]["paths"]}
    assert set(paths) == {"split", "single pair"} and paths["split"]["iterations"] == 2
    assert paths["single pair"]["iterations"] == 1 and len(paths["split"]["level_seconds"]) == 3
    assert all(path["engine_s"] >= path["iteration_s"] > path["stages"]["instance optimisation"]["seconds"] > 0
               for path in paths.values())
    assert all("<pair>/transform.nii.gz" in path["outputs"] for path in paths.values())  # the default output
    assert "## 7. Where" in markdown and "<pair>/transform.nii.gz" in markdown

    # after a new release: only the rows named are measured again (here the network's), the others are kept as
    # they were
    benchmark.main(quick=True, output_dir=str(tmp_path), sections=[5], rows=["network"],
                   pair_cache=str(tmp_path / "pairs"))
    again = json.loads((tmp_path / "benchmarks.json").read_text())
    peers = lambda r: [m for m in r["accuracy"]["methods"] if m["kind"] != "network"]  # noqa: E731
    assert peers(again) == peers(results) and again["capacity"] == results["capacity"]
    assert {m["kind"] for m in again["accuracy"]["methods"]} == {m["kind"] for m in results["accuracy"]["methods"]}
    assert '--rows "[network]"' in again["runs"]["accuracy_rows[network]"]["command"]
    assert again["runs"]["accuracy"] == results["runs"]["accuracy"]


def test_real_anatomy_saves_every_row_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Section 5b: after every (pair, row) the result so far is saved; a rerun after a kill measures only the rows
    not saved yet; a changed setting measures again only the rows it changes; the forced network start (the
    optimisation from identity) is not run again when the defaults' start selection took the network's start
    (the identity's)."""
    import benchmark
    from bench import accuracy

    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "a.nii.gz").write_bytes(b"")  # only its presence is checked; the pairs are faked below
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.pt").write_bytes(b"weights")
    monkeypatch.setattr(accuracy, "cached_pairs", lambda size, seeds, simulation, cache, log: [
        accuracy.pair_path(size, seeds[0], simulation, cache)])
    monkeypatch.setattr(accuracy, "load_pair", lambda path: type("Pair", (), {"spacing": (1.0, 1.0, 1.0),
                                                                            "simulation": {}})())
    calls = []

    def measure(spec, paths, timeout, kill_after=None, took_network=False):
        if kill_after is not None and len(calls) == kill_after:
            raise KeyboardInterrupt  # the run is killed here
        calls.append((spec["row"], Path(paths[0]).parent.name))
        records = [{"start_network": [1.0 if took_network else 0.0]}] if spec["kind"] == "optimize" else []
        return {"method": spec["name"], "kind": spec["kind"], "tre_mm": float(len(calls)), "tre_dense_mm": 1.0,
                "dice_mean": 0.9, "folding_percent": 0.0, "sd_log_jacobian": 0.1, "seconds_per_pair": 1.0,
                "peak_rss_mib": 1.0, "details": {"records": records}}

    options = benchmark.real_anatomy_settings([8, 8, 8], cts=["a.nii.gz"], followups=[("a.nii.gz", 5)],
                                              real_ct_dir=str(tmp_path / "ct"))
    plan = benchmark.real_anatomy_plan(options, "model.pt")
    assert len(plan) == 16 and [spec["row"] for _, spec in plan[:6]] == list(benchmark.FIRST_ROWS["breath_hold"])
    saved = []
    run = lambda measure, earlier=None, settings=options: benchmark.run_real_anatomy(  # noqa: E731
        settings, str(tmp_path / "model"), str(tmp_path / "pairs"), lambda message: None, earlier=earlier,
        save=lambda result: saved.append(json.loads(json.dumps(result))), measure=measure)
    with pytest.raises(KeyboardInterrupt):
        run(lambda *a, **k: measure(*a, **k, kill_after=5))
    # every row saved as it came: 5 measured, the row from identity the defaults' (their start: the identity)
    assert len(saved) == len(saved[-1]["rows"]) == 6 and len(calls) == 5
    first, killed = list(calls), saved[-1]
    calls.clear()
    resumed = run(measure, earlier=killed)
    assert len(calls) == 16 - 6 - 1 and not set(calls) & set(first)  # only the rows not saved
    assert resumed["rows"][:6] == killed["rows"]  # kept as measured
    calls.clear()
    notes = {"breath_hold/a.nii.gz/1101": ["measured outside the runner: ..."]}
    changed = run(measure, earlier={**resumed, "notes": notes}, settings={**options, "elastix_iterations": 7})
    assert [row for row, _ in calls] == ["elastix", "elastix"] and len(changed["rows"]) == 16
    assert changed["notes"] == notes  # what a person wrote on a pair outlives the re-measurement
    calls.clear()  # a re-measurement killed after its first row: every earlier row is still in what it saved
    saved.clear()
    with pytest.raises(KeyboardInterrupt):
        run(lambda *a, **k: measure(*a, **k, kill_after=1), earlier=resumed, settings={**options, "elastix_iterations": 9})
    # (the elastix row not re-measured yet is not kept: its settings are no longer the plan's)
    assert len(calls) == 1 and len(saved[-1]["rows"]) == 15 and sorted(saved[-1]["cases"]) == sorted(resumed["cases"])
    assert [r for r in saved[-1]["rows"] if r["row_id"] != "elastix"] == [r for r in resumed["rows"] if r["row_id"] != "elastix"]
    calls.clear()  # a re-measurement limited to one group re-measures its rows and keeps the other group's
    again = benchmark.run_real_anatomy({**options, "elastix_iterations": 7}, str(tmp_path / "model"), str(tmp_path / "pairs"), lambda message: None,
                                       earlier=changed, groups=["breath_hold"], remeasure=["defaults"], measure=measure)
    assert [row for row, _ in calls] == ["defaults"] and len(again["rows"]) == 16
    followup_defaults = lambda result: [r for r in result["rows"] if r["group"] == "followup" and  # noqa: E731
                                        r["row_id"] == "defaults"]
    assert followup_defaults(again) == followup_defaults(changed)
    calls.clear()
    fresh = run(lambda *a, **k: measure(*a, **k, took_network=True))
    forced = [row for row in fresh["rows"] if row["row_id"] == "network_forced"]
    assert len(calls) == 14 and all(row["same_as"] == "defaults" for row in forced)
    calls.clear()
    fresh = run(measure)  # the identity's start taken: the row from identity is the defaults' computation
    assert len(calls) == 14 and all(row["same_as"] == "defaults" for row in fresh["rows"]
                                    if row["row_id"] == "from_identity")
    from bench.report import _section5_real

    fresh["setup"]["lam"], fresh["setup"]["mu"] = 0.083, 0.03
    text = "\n".join(_section5_real(fresh))
    assert text.count("| bundle: defaults") == 2 and "Not measured yet" not in text  # every pair's table
    case_id = "/".join(map(str, plan[0][0]))
    text = "\n".join(_section5_real({**fresh, "notes": {case_id: ["A note on the first pair."]}}))
    first_goals = text.index("Goals of issue 18 on this pair")
    assert text.index("A note on the first pair.") > first_goals  # after that pair's goals,
    assert text.index("A note on the first pair.") < text.index("Goals of issue 18", first_goals + 1)  # not later


def test_committed_benchmarks_md_is_the_render_of_benchmarks_json():
    """docs/benchmarks.md is exactly what ``bench.report.render`` makes of docs/benchmarks.json, hand-written notes
    included (stored with their section's figures): a re-render after a new measurement deletes nothing. Compared
    section by section, so that a failure names the section edited by hand."""
    import re

    from bench import report

    results = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    sections = lambda text: re.split(r"(?m)^(?=#{2,3} )", text)  # noqa: E731
    assert sections(report.render(results)) == sections((ROOT / "docs" / "benchmarks.md").read_text())


@pytest.mark.slow
def test_response_section_measures_the_shipped_model_against_the_optimisation(monkeypatch):
    """Section 6b on one small phantom pair: every (lam, mu) of the grid has a network and an optimised row, the
    corners' fields differ for both (the conditioning and the objective act), the identity start reaches its own
    TRE at its (only) step count, and the section renders. ``prealign auto`` proposes a map here (a 40 mm shift
    along the body, made up) that the start objective rejects: every registration of the section, the network
    alone included, goes through the stages' decision and drops it, as inference would."""
    from bench import report, response
    from elastic_hypermorph_bundle.networks.spatial import Affine
    from elastic_hypermorph_bundle.simulation import simulate_pair
    from elastic_hypermorph_bundle.workflow import instance

    options = {**response.response_settings([24, 24, 24], None, seeds=[9002], points=2, steps=1, start_steps=[1]),
               "default_hyper": [0.083, 0.03]}
    pair = simulate_pair([24, 24, 24], seed=9002, preset="realistic")
    shift = Affine(torch.eye(3)[None], torch.tensor([[0.0, 0.0, 40.0]]), pair.spacing)
    monkeypatch.setattr(instance, "auto_prealign", lambda *args, **kwargs: (shift, {
        "prealign_similarity_identity": torch.ones(1), "prealign_similarity_rigid": torch.full((1,), 0.5),
        "prealign_applied": torch.ones(1)}))
    result = response.run(options, str(ROOT / "models" / "model.pt"), [pair], print)
    assert result["setup"]["prealigned"] == [True]  # proposed ...
    assert [row["prealign_kept"] for row in result["rows"]] == [0.0] * 8  # ... and dropped by every registration
    assert len(result["rows"]) == 2 * 2 * 2 and {row["mode"] for row in result["rows"]} == {"network", "optimised"}
    assert result["field_change_mm"]["network"] > 0 and result["field_change_mm"]["optimised"] > 0
    assert -1 <= result["spearman_tre"] <= 1 or np.isnan(result["spearman_tre"])
    identity = result["starts"]["identity"]
    assert identity["steps_to_identity_tre"] == 1
    assert all(np.isfinite(v) for start in result["starts"].values() for v in start["tre_mm"].values())
    assert "### 6b." in "\n".join(report._section6b(result))


def test_response_size_sets_section_9_grid_and_refuses_other_shapes():
    import benchmark

    assert benchmark.settings_for(False, False, [48, 48, 54])["response"]["spatial_size"] == [48, 48, 54]
    assert benchmark.settings_for(False, False)["response"]["spatial_size"] == [64, 64, 72]  # the default
    for bad in ([48, 48], [48, 0, 54], [48.5, 48, 54], 48):
        with pytest.raises(ValueError, match="--response_size must be three positive whole numbers"):
            benchmark.settings_for(False, False, bad)


def test_schedule_screen_rule_takes_the_cheapest_schedule_that_costs_no_accuracy():
    """Issue 21's rule: the accuracy part of issue 18's (mean TRE lower, no pair > 5 % worse, no more folding)
    decides who may replace the defaults; the least modelled level cost among them wins, ties by TRE; measured
    seconds are reported, not judged."""
    from bench.defaults_screen import decide, level_cost

    assert level_cost(25) == level_cost([25, 25, 25]) == pytest.approx(25 + 25 / 8 + 25 / 64)
    assert level_cost([50, 50, 20]) == pytest.approx(20 + 50 / 8 + 50 / 64)
    assert level_cost([4, 2], levels=2) == pytest.approx(2 + 4 / 8)

    def row(candidate, case, tre, steps, seconds=10.0, folding=0.1):
        return {"candidate": candidate, "case": case, "tre_mm": tre, "folding_percent": folding, "steps": steps,
                "sd_log_jacobian": 0.5, "prepare_s": 0.0, "register_s": seconds}

    rows = [row("defaults", "a", 1.0, [25] * 3), row("defaults", "b", 2.0, [25] * 3),
            row("better", "a", 0.9, [50, 50, 20]), row("better", "b", 2.05, [50, 50, 20]),  # b 2.5 % worse: passes
            row("cheaper", "a", 0.95, [60, 60, 12], 14.0), row("cheaper", "b", 2.0, [60, 60, 12], 14.0),  # passes
            row("tied", "a", 0.97, [60, 60, 12]), row("tied", "b", 2.0, [60, 60, 12]),  # same cost, worse TRE
            row("best_mean", "a", 0.5, [50, 50, 15]), row("best_mean", "b", 2.2, [50, 50, 15]),  # b 10 % worse: fails
            row("folds", "a", 0.8, [50, 50, 10], folding=0.5), row("folds", "b", 1.9, [50, 50, 10]),  # fails
            row("partial", "a", 0.1, [1, 1, 1])]  # not measured on every pair: not judged
    decision = decide(rows)
    assert decision["winner"] == "cheaper"
    assert {name for name, entry in decision["candidates"].items() if entry["passes"]} == {"better", "cheaper", "tied"}
    assert "partial" not in decision["candidates"]
    assert decision["candidates"]["cheaper"]["register_s"] == 14.0  # slower as measured: reported, not judged
    assert decision["candidates"]["best_mean"]["worst_pair_ratio"] == pytest.approx(1.1)
    assert decide([r for r in rows if r["candidate"] in ("defaults", "best_mean")])["winner"] is None
    stopped = decide(rows, pairs=3)  # the defaults on 2 of 3 pairs: nothing decided
    assert stopped["partial"] and stopped["winner"] is None and stopped["candidates"]["cheaper"]["passes"]
    # the screens' "defaults" candidate is the config's whole schedule: its steps and its similarity stride
    from bench.defaults_screen import inference_defaults

    config = json.loads((ROOT / "configs" / "inference.json").read_text())
    assert inference_defaults()["steps"] == config["instance_steps"]
    assert inference_defaults()["similarity_stride"] == config["instance_similarity_stride"]
    # the stride screen's rule: mean TRE not higher (equal passes), the least measured seconds win
    timed = decide(rows + [row("equal", "a", 1.0, [50, 50, 30], 8.0), row("equal", "b", 2.0, [50, 50, 30], 8.0)],
                   cost="register_s", strict=False)
    assert timed["winner"] == "equal" and timed["candidates"]["equal"]["passes"] and timed["cost"] == "register_s"
    assert not decide(rows + [row("equal", "a", 1.0, [1] * 3), row("equal", "b", 2.0, [1] * 3)])["candidates"][
        "equal"]["passes"]


def test_pair_cache_keys_real_ct_pairs_on_the_lung_mask_rule(monkeypatch, tmp_path):
    """A pair simulated on a real CT follows that CT's lung mask, so a new ``segment_lungs`` rule must give a new cache
    path (a stale pair would otherwise be served); a phantom pair does not depend on it and keeps its path."""
    from bench import accuracy

    real = {"preset": "realistic", "real_ct": "/data/ct.nii.gz"}
    phantom = {"preset": "realistic"}
    before = {name: accuracy.pair_path([8, 8, 8], 1, sim, tmp_path) for name, sim in (("real", real), ("ph", phantom))}
    monkeypatch.setattr(accuracy, "LUNG_MASK_RULE", accuracy.LUNG_MASK_RULE + 1)
    assert accuracy.pair_path([8, 8, 8], 1, real, tmp_path) != before["real"]
    assert accuracy.pair_path([8, 8, 8], 1, phantom, tmp_path) == before["ph"]
