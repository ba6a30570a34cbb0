"""A moving image on another grid covers only part of the fixed grid (a follow-up's smaller field of view): its
resampling records where it has data (``moving_coverage``), and the test-time stages compare only there, so the
zero fill outside it draws no field; pairs on one grid are registered exactly as before."""

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from elastic_hypermorph_bundle.data.transforms import COVERAGE_KEY, registration_transforms
from elastic_hypermorph_bundle.discovery.sweep import _stage_mask, prepare_pairs
from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

FIXED_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
FIXED_SHAPE = (20, 20, 20)
#: a smaller field of view, finer voxels, shifted by a fraction of a fixed voxel
MOVING_SPACING, MOVING_ORIGIN, MOVING_SHAPE = 1.5, np.array([10.3, 6.1, -3.7]), (12, 14, 16)
HYPER = torch.tensor([[0.1, 0.05]])


def write(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), affine), str(path))
    return str(path)


def smooth(shape, seed):
    volume = gaussian_filter(np.random.default_rng(seed).random(shape), 2.0)
    return ((volume - volume.min()) / np.ptp(volume) * 1500 - 1000).astype(np.float32)  # HU


@pytest.fixture()
def followup(tmp_path):
    moving_affine = np.diag([MOVING_SPACING] * 3 + [1.0])
    moving_affine[:3, 3] = MOVING_ORIGIN
    return {"fixed_image": write(tmp_path / "fixed.nii.gz", smooth(FIXED_SHAPE, 0), FIXED_AFFINE),
            "moving_image": write(tmp_path / "moving.nii.gz", smooth(MOVING_SHAPE, 1), moving_affine)}


def analytic_box(margin: float = 0.0) -> torch.Tensor:
    """1 where a fixed voxel centre lies within the moving voxel centres' box (world mm) grown by ``margin`` mm."""
    world = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) * 2.0 for n in FIXED_SHAPE],
                                       indexing="ij"))
    low = torch.tensor(MOVING_ORIGIN).view(3, 1, 1, 1)
    high = low + (torch.tensor(MOVING_SHAPE, dtype=torch.float64) - 1).view(3, 1, 1, 1) * MOVING_SPACING
    return ((world >= low - margin) & (world <= high + margin)).all(0).float()


def test_the_coverage_of_a_smaller_shifted_field_of_view_is_its_box(followup):
    out = registration_transforms(hu_offset=0)(followup)
    coverage = out[COVERAGE_KEY]
    assert coverage.shape == (1, *FIXED_SHAPE) and np.allclose(coverage.affine, FIXED_AFFINE)
    assert torch.equal(coverage[0].as_tensor(), analytic_box())
    assert 0 < coverage.mean() < 0.5
    # beyond one moving voxel of it the moving image is the zero fill (air); in between it blends data and fill
    assert float(out["moving_image"][0][analytic_box(MOVING_SPACING) == 0].abs().max()) == 0.0
    # on the network's grid (pixdim, pad/crop) the coverage follows the images, 0/1, padding uncovered
    coarse = registration_transforms(hu_offset=0, pixdim=(3.0, 3.0, 3.0), spatial_size=(16, 16, 16))(followup)
    assert coarse[COVERAGE_KEY].shape == coarse["moving_image"].shape == (1, 16, 16, 16)
    assert np.allclose(coarse[COVERAGE_KEY].affine, coarse["fixed_image"].affine)
    assert set(coarse[COVERAGE_KEY].unique().tolist()) == {0.0, 1.0}


def test_a_moving_image_on_the_fixed_grid_gets_no_coverage_and_the_same_field(followup, tmp_path):
    same = dict(followup, moving_image=write(tmp_path / "same.nii.gz", smooth(FIXED_SHAPE, 2), FIXED_AFFINE))
    out = registration_transforms(hu_offset=0)(same)
    assert COVERAGE_KEY not in out
    batch = {key: out[key][None] for key in ("fixed_image", "moving_image")}
    fields = []
    for on in (True, False):
        stages = InstanceOptimization(steps=5, levels=2, coverage_mask=on)
        mask, covered = stages.mask(batch)
        assert mask is None and covered is None
        fields.append(stages.register(None, batch["fixed_image"].as_tensor(), batch["moving_image"].as_tensor(),
                                      HYPER, (2.0, 2.0, 2.0), mask, covered=covered))
        assert "moving_coverage" not in stages.record
    assert fields[0].abs().max() > 0.01 and torch.equal(fields[0], fields[1])


def test_the_field_does_not_depend_on_the_moving_image_outside_its_field_of_view():
    """Fill 0 against noise outside the covered part (beyond the similarity's reach, 12 voxels: MIND-SSC's patches,
    the coarse levels' averaging, the field's displacement): with the coverage mask the same field, bit for bit,
    through the auto pre-alignment, the start choice and three levels; without it another field."""
    fixed = torch.from_numpy(gaussian_filter(np.random.default_rng(0).random((40, 24, 24)), 2.0)).float()[None, None]
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    coverage = torch.zeros_like(fixed)
    coverage[:, :, :24] = 1
    filled = torch.roll(fixed, 2, dims=2)
    filled[:, :, 24:] = 0
    noisy = filled.clone()
    noisy[:, :, 36:] = torch.rand_like(noisy[:, :, 36:])
    for on, same in ((True, True), (False, False)):
        fields = []
        for moving in (filled, noisy):
            stages = InstanceOptimization(steps=6, coverage_mask=on)
            batch = {"fixed_image": fixed, "moving_image": moving, COVERAGE_KEY: coverage}
            mask, covered = stages.mask(batch)
            fields.append(stages.register(lambda m: torch.full((1, 3, *m.shape[2:]), 0.5), fixed, moving,
                                          HYPER, (1.0, 1.0, 1.0), mask, covered=covered))
        assert fields[0].abs().max() > 0.5  # the optimisation moved
        assert torch.equal(fields[0], fields[1]) == same
        if on:
            assert stages.record["moving_coverage"].tolist() == pytest.approx([24 / 40])
        else:
            assert "moving_coverage" not in stages.record


def test_the_fixed_mask_and_the_coverage_multiply_and_the_sweep_carries_the_coverage(followup, tmp_path):
    lower_half = np.pad(np.ones((10, 20, 20)), ((10, 0), (0, 0), (0, 0)))
    followup = dict(followup, fixed_mask=write(tmp_path / "mask.nii.gz", lower_half, FIXED_AFFINE))
    out = registration_transforms(hu_offset=0)(followup)
    stages = InstanceOptimization(use_mask=True)
    mask, covered = stages.mask({key: out[key][None] for key in ("fixed_mask", COVERAGE_KEY)})
    expected = analytic_box().clone()
    expected[:10] = 0
    assert torch.equal(mask[0, 0], expected)
    # the covered fraction is the moving image's, not the fixed mask's share of it
    assert covered.tolist() == [float(analytic_box().mean())]
    # the sweep's cached pair keeps the coverage, and its stages' mask is the same
    (pair,) = prepare_pairs([dict(followup, pair_id="p")], registration_transforms(hu_offset=0))
    assert torch.equal(pair.coverage[0, 0], analytic_box())
    assert torch.equal(_stage_mask(pair, stages)[0][0, 0], expected)
    assert torch.equal(_stage_mask(pair, stages)[1], covered)
    assert torch.equal(_stage_mask(pair, InstanceOptimization())[0][0, 0], analytic_box())
    assert _stage_mask(pair, InstanceOptimization(coverage_mask="false")) == (None, None)


def test_the_covered_fraction_travels_with_its_mask_not_with_the_instance():
    """Two pairs' masks taken from one instance before either is registered: each registration records its own
    pair's covered fraction (no state of the instance between the calls); no fraction, no record."""
    fixed = torch.rand(1, 1, 16, 12, 12)
    stages = InstanceOptimization(steps=0, prealign="none")
    taken = []
    for covered_planes in (4, 12):
        coverage = torch.zeros_like(fixed)
        coverage[:, :, :covered_planes] = 1
        taken.append(stages.mask({COVERAGE_KEY: coverage}))
    for (mask, covered), fraction in reversed(list(zip(taken, (4 / 16, 12 / 16)))):
        assert covered.tolist() == [fraction] and mask.mean().item() == fraction
        stages.register(None, fixed, fixed, HYPER, (1.0, 1.0, 1.0), mask, covered=covered)
        assert stages.record["moving_coverage"].tolist() == [fraction]
        stages.register(None, fixed, fixed, HYPER, (1.0, 1.0, 1.0), mask)
        assert "moving_coverage" not in stages.record


def test_the_benchmark_gives_a_cached_followup_the_coverage_of_its_own_grid(real_ct):
    """The benchmark caches a follow-up resampled into the fixed grid (for the peers); the bundle's rows get the
    coverage the bundle's transforms compute from the scan's own grid, the simulation's draw replayed."""
    from bench.accuracy import moving_coverage

    from elastic_hypermorph_bundle.data.transforms import ResampleToFixedd
    from elastic_hypermorph_bundle.simulation.followup import on_fixed_grid
    from elastic_hypermorph_bundle.simulation.generator import simulate_pair

    from monai.data import MetaTensor

    pair = simulate_pair((48, 48, 52), (7.0, 5.0, 7.0), seed=5, preset="followup",
                         real_ct=real_ct("lidc_idri_0001.nii.gz"))
    fixed = MetaTensor(torch.as_tensor(pair.fixed_image, dtype=torch.float32)[None],
                       affine=torch.as_tensor(pair.affine))
    moving = MetaTensor(torch.as_tensor(pair.moving_image, dtype=torch.float32)[None],
                        affine=torch.as_tensor(pair.moving_grid_affine))
    moving.meta["original_affine"] = pair.moving_grid_affine
    own_grid = ResampleToFixedd("moving_image")({"fixed_image": fixed, "moving_image": moving})[COVERAGE_KEY][0]
    cached = moving_coverage(on_fixed_grid(pair))
    assert 0.2 < cached.mean() < 0.95 and np.array_equal(cached, own_grid.numpy())
    assert moving_coverage(simulate_pair((48, 48, 52), (7.0, 5.0, 7.0), seed=5, preset="realistic",
                                         real_ct=real_ct("lidc_idri_0001.nii.gz"))) is None


def test_section_5b_gives_the_followup_rows_the_coverage_and_leaves_the_breath_hold_rows_alone():
    """The bundle's rows of a follow-up run with the coverage, as inference does (configs/inference.json); their
    options are their row keys, so those rows are measured again; the breath-hold rows (one grid) keep theirs."""
    import benchmark

    options = benchmark.real_anatomy_settings([8, 8, 8], cts=["a.nii.gz"], followups=[("a.nii.gz", 5)],
                                              real_ct_dir="/nonexistent")
    assert options["coverage_mask"] is True

    def kwargs(group, settings):
        return {spec["row"]: spec["options"]["optimize_kwargs"]
                for spec in benchmark.real_anatomy_methods(settings, "model.pt", group) if spec["kind"] == "optimize"}

    off = {**options, "coverage_mask": False}
    assert len(kwargs("followup", options)) == 3
    assert all(k["coverage_mask"] is True for k in kwargs("followup", options).values())
    assert not any("coverage_mask" in k for k in kwargs("followup", off).values())
    assert kwargs("breath_hold", options) == kwargs("breath_hold", off)
