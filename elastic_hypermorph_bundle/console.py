"""What the command line shows: the ids a user changes (one table for ``--help`` and the README), and a quiet log.

* :data:`USER_IDS` is the one list of the config ids a user changes, with their meaning and default; the README's
  id table is this table (a test compares them, and compares each stated default with the configs' values), and
  ``python -m monai.bundle run --config_file configs/inference.json --help`` prints the rows whose ids the loaded
  configs define, with the values they hold (:func:`help_text`, called by
  :func:`elastic_hypermorph_bundle.cli.check_overrides`).
* :func:`quiet_third_party` (run when the package is imported) filters warnings of other packages that say nothing
  to a user of the bundle; :class:`QuietEngineLog` (an inference handler) keeps Ignite's per-run INFO lines out
  ("Engine run resuming", "Epoch[1] Complete", "Engine run finished"), so a run's last line is the bundle's summary.
  ``ELASTIC_HYPERMORPH_DEBUG=1`` keeps everything. (MONAI's config-trust warning and its "Setting logging
  properties" line come before the bundle is loaded; ``configs/logging.conf`` hides MONAI's input summary, which
  repeats the command line.)
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

__all__ = ["DEBUG_ENV", "USER_IDS", "NOISE", "debug", "quiet_third_party", "QuietEngineLog", "ids_table", "help_text"]

#: set to ``1`` for everything: every log line and warning, and Python's full traceback (:mod:`.cli`)
DEBUG_ENV = "ELASTIC_HYPERMORPH_DEBUG"

#: ``(ids, meaning, default)`` of every id a user changes: the README's table, row by row. The regularizer and
#: similarity rows name the rows of ``losses``' tables, which this bottom-layer module cannot import;
#: tests/test_console.py holds them equal, so a new table row fails CI until it is named here
USER_IDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("dataset_dir",), "Learn2Reg dataset folder (2021+ JSON layout, 2020 Zenodo layout, or plain `_0000`/`_0001` folder)",
     "`data/LungCT`"),
    (("split", "split_file", "seed"),
     "which pairs (train/val/test, paper's 20/4/6 rule; `all`), a saved split to reuse, split/sampling seed",
     "`test`, none, 0"),
    (("output_dir",), "where logs, metrics and outputs go",
     "`eval/` (train/evaluate), `outputs/...` (inference, sweep, apply)"),
    (("ckpt_dir",), "where training writes checkpoints and, at the end, the best weights `model.pt` + `model.json`",
     "`models/`"),
    (("ckpt_path",), "the weights inference, evaluation and the sweep load", "`models/model.pt`"),
    (("epochs", "val_interval", "batch_size", "learning_rate", "amp"), "training schedule (Adam; AMP on CUDA only)",
     "250, 10, 1, 1e-4, false"),
    (("spatial_size", "pixdim", "hu_window"),
     "network grid (pad/crop; optional resampling; sizes divisible by 16) and the HU range mapped to [0, 1]; recorded "
     "in the model card by training, and a run whose values differ from the card's is refused",
     "`[192,192,208]`, none, `[-1000,500]`"),
    (("allow_preprocessing_mismatch",),
     "run inference, evaluation or a sweep with preprocessing other than the model's (with a warning)", "false"),
    (("regularizer",), "a row of `losses/regularizers.py`: `elastic` (the method), `diffusion` (HyperMorph), "
     "`elastic_fixed` (fixed λ, μ over α)", "`elastic`"),
    (("similarity",),
     "training's similarity (a row of `losses/similarity.py`, recorded in the model card): `lncc` (local NCC, the "
     "paper's) or `mind` (MIND-SSC descriptors)", "`lncc`"),
    (("lam_range", "mu_range", "alpha_range", "hyper_sampling"),
     "trained ranges and how training samples them (`uniform`, `log_uniform`, `endpoints`)",
     "[0,1], [0,1], [0,1], `uniform`"),
    (("amortised_targets", "amortised_weight", "amortised_fraction", "amortised_mask"),
     "amortised optimisation (training): a cache of the instance optimisation's fields of the training pairs at a "
     "few (λ, μ) (`scripts/amortised_targets.py`); on this fraction of the batches a cached (λ, μ) is trained with "
     "the weight times the mean squared difference (voxels²) of the network's field to the cached one added to the "
     "loss, over the whole grid or, with the mask on, over the fixed lung mask (the dataset's masks); none: off",
     "none, 1, 0.5, false"),
    (("lam", "mu", "alpha"), "the hyperparameters used by validation, inference, evaluation", "0.083, 0.03, 0.05"),
    (("allow_extrapolation",), "accept (λ, μ) outside the trained range (with a warning)", "false"),
    (("registration_grid",),
     "where inference and evaluation register: `image` (the images' own grid, full resolution; the network still "
     "reads the grid it was trained on, resampled inside the step, and its field comes back) or `network` (the "
     "training preprocessing, `spatial_size`/`pixdim`)", "`image`"),
    (("init",),
     "what the optimisation starts from: `network` (the model's prediction at the same (λ, μ)) or `identity` (no "
     "trained model at all: the bundle as a pure optimisation method; `--ckpt_path` is then not read)", "`network`"),
    (("instance_steps",),
     "test-time instance optimisation of each pair's field at the same (λ, μ), started from the network's prediction "
     "(inference, evaluation, and the sweep's selected point): Adam steps of every level (a number) or of each level, "
     "coarsest first (a list, one per level, as the default: more steps on the cheap coarse levels, fewer on the "
     "finest, benchmarks.md section 7b); `--instance_steps 25`: 25 on every level; 0 = network alone", "`[50,50,30]`"),
    (("instance_similarity_stride",),
     "per level (a number, or a list coarsest first): each optimisation step compares the images on one sub-grid of "
     "every n-th voxel per axis, another sub-grid each step (1/n³ of the warp's cost; every voxel once per n³ "
     "steps); 1 = every voxel on every step; `mind` only (with `lncc` every voxel is compared, with a warning). The default strides the finest level only (with 30 steps "
     "there: 0.75x of the optimisation's time at a lower mean TRE on the 6 real-anatomy pairs; strided coarse "
     "levels lost up to 31 %, benchmarks.md section 7b)", "`[1,1,2]`"),
    (("instance_similarity",),
     "its similarity (a row of `losses/similarity.py`): `mind` (MIND-SSC descriptors compared by SSD, insensitive "
     "to the lung's density change) or `lncc`", "`mind`"),
    (("instance_levels", "instance_grid", "instance_lr"),
     "coarse-to-fine levels (each twice as fine), the finest control grid's coarsening (2 = half resolution), Adam "
     "step in voxels of each level", "3, 2, 0.2"),
    (("prealign",),
     "global pre-alignment before the network: `auto` (rigid fits from a few starts on a coarse grid, proposed "
     "only when they lower the similarity by 45 % of the identity's, then kept only when the optimisation's start "
     "objective with the rigid map, from its best start (`--instance_steps 0`: the network's field, the same check), "
     "is lower than without it: a follow-up in another position "
     "is aligned, a breathing-only pair is left as it is; the similarities, both objectives and the choice logged "
     "and in `metrics.json`), `none`, `translation`, `rigid`, `affine`", "`auto`"),
    (("instance_select_start",),
     "the optimisation continues from the better of the network's prediction and the identity, by its own objective "
     "at its first level (both values and the start taken logged and in `metrics.json`)", "true"),
    (("instance_discrete",),
     "without a network's start: a coarse discrete displacement search (MIND-SSC over a window at quarter "
     "resolution, ConvexAdam's coupled step) as the start instead of the identity", "false"),
    (("use_mask",),
     "restrict the optimisation's similarity to the fixed mask (lungs); needs `--fixed_mask` or dataset masks",
     "false"),
    (("instance_coverage_mask",),
     "a moving image on another grid: both stages compare only where it has data after its resampling into the "
     "fixed grid (not the zero fill outside its field of view; the covered fraction in `metrics.json`); pairs on "
     "one grid are unaffected", "true"),
    (("fixed", "moving", "fixed_mask", "moving_mask", "fixed_points", "moving_points"),
     "single-pair inference and evaluation (points: corresponding CSVs in the Learn2Reg voxel convention, scored by "
     "TRE)", "none"),
    (("write_transform", "write_warped", "write_preview"),
     "per pair: the registration as an ITK displacement field `transform.nii.gz` (mm, LPS; SimpleITK, ANTs, 3D Slicer "
     "and `configs/apply.json` apply it), the moving image (in its file's units, e.g. HU) and mask warped, "
     "`preview.png`", "true, true, true (evaluation: `--write_outputs`, false)"),
    (("write_ddf", "write_submission", "write_jacobian"),
     "the same field in the bundle's voxel convention `ddf.nii.gz`, the Learn2Reg `submission/disp_<pair>.nii.gz`, "
     "the Jacobian determinant `jacobian.nii.gz`", "false"),
    (("submission_dtype", "compression_level"),
     "the submission's type (`float32`, or `int16` scaled by NIfTI's slope: half the size), gzip level of every NIfTI "
     "output (0 stored, fastest .. 9 smallest); none: the displacement fields stored (float32 vectors deflate by 9 % "
     "in 7x the time), images and masks at 1", "`float32`, none"),
    (("write_background",),
     "write each pair's files in a background thread while the next pair is registered (one pair in flight; the "
     "files still appear all or none, and a failed write stops the run with its one-line error before it ends); "
     "false: write before the next pair starts", "true"),
    (("transform", "image", "label", "points"),
     "apply.json: the written registration, and the moving-space image(s), label map(s) and point CSV(s) to apply it "
     "to (a path or a list)", "none"),
    (("points_space", "points_direction", "moving_grid"),
     "apply.json: point coordinates (`voxel`: 0-based array indices, the Learn2Reg convention; `lps`/`ras`: mm), "
     "`fixed_to_moving` or `moving_to_fixed`, an image on the moving grid for moving-space voxels (default: the fixed "
     "grid, as in Learn2Reg)", "`voxel`, `fixed_to_moving`, none"),
    (("device", "num_workers"), "compute device, data-loading workers",
     "CUDA if present, 0 (inference, evaluation, sweep), 2 (training)"),
    (("resume", "overwrite"), "continue from the last checkpoint; replace existing outputs", "false, false"),
)

#: warning messages (regular expressions, matched at the start) of other packages that are noise to a bundle user
NOISE = (
    r"monai\.networks\.blocks\.Warp: Using PyTorch native grid_sample",  # MONAI's Warp without its C++ extension
    r".*tqdm is not installed",  # MONAI's caching datasets without a progress bar
)


def debug() -> bool:
    """Whether ``ELASTIC_HYPERMORPH_DEBUG`` asks for everything (set and not ``0``)."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def quiet_third_party() -> None:
    """Ignore the :data:`NOISE` warnings (unless :func:`debug`)."""
    if debug():
        return
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)


class QuietEngineLog:
    """An engine handler that raises the engine's own logger to WARNING (unless :func:`debug`): Ignite's per-run
    INFO lines go, its warnings and errors stay."""

    def attach(self, engine) -> None:
        if not debug():
            engine.logger.setLevel(logging.WARNING)


def ids_table() -> str:
    """:data:`USER_IDS` as the README's markdown table."""
    rows = ["| id | meaning | default |", "| --- | --- | --- |"]
    rows += [f"| {', '.join(f'`{i}`' for i in ids)} | {meaning} | {default} |" for ids, meaning, default in USER_IDS]
    return "\n".join(rows)


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def help_text(defined: Mapping[str, object], config_files: str = "") -> str:
    """The rows of :data:`USER_IDS` whose ids ``defined`` (the loaded configs' top-level ids) has, each id with the
    value the configs hold (an expression shown as the table's default)."""
    lines = [f"elastic_hypermorph_bundle: the ids a user changes in {config_files or 'these configs'}, "
             "each overridden as --<id> <value> (README.md, 'Config ids a user changes'):"]
    for ids, meaning, default in USER_IDS:
        present = [i for i in ids if i in defined]
        if not present:
            continue
        values = [defined[i] for i in present]
        if any(isinstance(v, (str, dict)) and (isinstance(v, dict) or str(v).startswith(("$", "@"))) for v in values):
            setting = ", ".join(f"--{i}" for i in present) + f"  (default {default.replace('`', '')})"
        else:
            setting = ", ".join(f"--{i} {_shown(v)}" for i, v in zip(present, values))
        lines += [f"  {setting}", f"      {meaning.replace('`', '')}"]
    lines.append("Booleans take true/false; an unknown id is refused with the closest valid ones; "
                 f"ELASTIC_HYPERMORPH_DEBUG=1 shows every log line and full tracebacks.")
    return "\n".join(lines)
