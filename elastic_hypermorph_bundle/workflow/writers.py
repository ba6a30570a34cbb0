"""Files written by inference and evaluation: registration results per pair and metric tables.

Every file goes through one :class:`OutputFiles` per run, which stages the run's files next to ``output_dir`` and
moves them in only when the run succeeds: a failed run leaves ``output_dir`` as it was, existing files are
refused unless ``overwrite``, and an overwrite replaces the earlier run's whole set. Layout under ``output_dir``:

* per pair, on the fixed image's file grid (:class:`InferenceWriter`, which lists them and which are written by
  default: the registration ONCE, as ``<pair_id>/transform.nii.gz``, an ITK displacement field in mm, LPS; on
  request also ``<pair_id>/ddf.nii.gz`` and the Learn2Reg ``submission/disp_<pair_id>.nii.gz`` in voxels), the
  warped moving image (in its file's units, e.g. HU) and mask, an optional Jacobian map, and ``preview.png``;
* ``metrics.csv`` (one row per pair, then the mean) and ``metrics.json`` (mean, per-pair rows, hyperparameters).
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from ..atomic import NoSpaceError, _out_of_space, atomic_write_text, check_output_folder, json_ready
from ..data.transforms import ddf_to_original_grid
from ..displacement import (
    array_from_image,
    displacement_transform,
    image_from_nifti,
    reference_grid,
    resample,
    write_displacement_field,
)
from ..forward import plain
from ..metrics import JACOBIAN_BORDER, jacobian_determinant, target_registration_error
from ..networks import warp_image, warp_label
from ..hyperparams import HyperSpace
from . import parse_flag
from .ignite_metrics import as_pairs, points_kind, registered_pair_metrics

__all__ = ["OutputFiles", "InferenceWriter", "EvaluationWriter"]

logger = logging.getLogger("elastic_hypermorph_bundle")


class OutputFiles:
    """The files one run writes under ``root``: all of them, or none.

    :meth:`new` hands out paths in a fresh staging folder next to ``root`` (``.<root name>.staging-<random>``,
    created on first use), so nothing under ``root`` changes while the run works. :meth:`run` executes the
    workflow; if it raises, the staging folder is deleted (``root`` is exactly as before), otherwise
    :meth:`commit` moves the new files into ``root``:

    * without ``overwrite``, an output that exists already is refused (at the start of the run through
      :meth:`check`, and again by :meth:`new` and :meth:`commit`);
    * with ``overwrite``, the new set replaces the earlier run's whole set: the files the earlier run recorded in
      ``root/.output_files.json`` that this run does not write are removed, so none of them stays behind. If
      ``root`` holds nothing else, the swap is two renames of the whole folder; otherwise the files are moved one
      by one and other files in ``root`` (e.g. training logs) are left alone.

    Before any work (:meth:`run` calls :meth:`prepare`) the folder is checked: an existing file is not an output
    folder (refused with or without ``overwrite``), the folder (or the nearest existing folder above it) must be
    writable, and every path of the earlier run's record must lie inside ``root``: a record naming a path outside
    (``../x``, an absolute path, a path through a link to another folder) is refused, so an output folder received
    from someone else cannot make an overwrite delete files elsewhere. Only files are removed, and folders only
    when emptied by that removal and inside ``root``.

    Files may be written in the background (:meth:`submit`): the run goes on (e.g. registers the next pair) while
    one thread writes, at most :attr:`MAX_PENDING` writes are in flight, and a failed write is raised in the run's own
    thread (at the next :meth:`submit`, or :meth:`wait`, which :meth:`run` calls before it commits): the run
    then fails as if it had written in place, and nothing is committed. :meth:`discard` waits for the thread,
    so no file appears in a staging folder being deleted.

    Under distributed runs every process stages and commits its own files (the record of the earlier set is
    then per process's view, and stale files are removed only by the process that finds them in the record).

    Args:
        root: output folder.
        overwrite: replace an earlier run's outputs instead of failing.
    """

    #: the record of the files a committed run wrote (relative to ``root``), used by the next ``overwrite``
    MANIFEST = ".output_files.json"
    #: background writes (:meth:`submit`) left running or waiting when a submit returns (it waits for the oldest
    #: beyond that), so the data held for writing stays bounded: one pair written while the next is registered
    MAX_PENDING = 1

    def __init__(self, root: str | os.PathLike, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.overwrite = parse_flag("overwrite", overwrite)
        self.files: list[Path] = []  # staged files, in the order handed out
        self.staging: Path | None = None
        self._made_parents: list[Path] = []
        self._writer: ThreadPoolExecutor | None = None  # the background writes' one thread, made on first use
        self._pending: deque[Future] = deque()

    def prepare(self) -> None:
        """Check the output folder before any work: not a file, writable, and an earlier record (read when
        ``overwrite``) naming only paths inside it.

        Raises:
            NotADirectoryError: ``root``, or a folder above it, is an existing file.
            PermissionError: ``root`` (or, if it does not exist yet, the nearest existing folder above it) is not
                writable.
            ValueError: the record of the earlier run names a path outside ``root``.
        """
        check_output_folder(self.root, "output_dir")
        if self.overwrite:
            self._recorded()

    def _inside(self, relative: str, source: str) -> str:
        """``relative`` if ``root/relative`` lies inside ``root`` (also once links are followed), else a
        ``ValueError`` naming it and ``source`` (where the path came from)."""
        root = Path(os.path.abspath(self.root))
        path = Path(os.path.normpath(root / relative))
        inside = not Path(relative).is_absolute() and root in path.parents
        if inside and root.exists():
            resolved = path.resolve()
            inside = root.resolve() in resolved.parents
        if not inside:
            raise ValueError(
                f"{source} names {relative}, a path outside the output folder {root}: refused (outputs and their "
                "record stay inside --output_dir; remove that entry or the record, or choose another --output_dir)."
            )
        return relative

    def check(self, relative_paths: Sequence[str]) -> None:
        """Fail before any work if one of these outputs already exists (and ``overwrite`` is off)."""
        if self.overwrite:
            return
        existing = [str(self.root / p) for p in relative_paths if (self.root / p).exists()]
        if existing:
            shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            raise FileExistsError(
                f"output(s) of an earlier run exist: {shown}; pass --overwrite true to replace them or choose "
                "another --output_dir."
            )

    def _staging(self) -> Path:
        if self.staging is None:
            root = Path(os.path.abspath(self.root))
            missing = [folder for folder in root.parents if not folder.exists()]
            for folder in reversed(missing):
                folder.mkdir()
                self._made_parents.append(folder)
            try:
                self.staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.staging-", dir=root.parent))
            except PermissionError:  # e.g. --output_dir . in a folder whose parent is read-only: stage inside
                if not root.exists():
                    root.mkdir()
                    self._made_parents.append(root)
                self.staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        return self.staging

    def new(self, relative_path: str) -> Path:
        """Path (in the staging folder) for a new output ``root/relative_path``, its folder created."""
        self._inside(relative_path, "an output of this run")
        self.check([relative_path])
        path = self._staging() / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(path)
        return path

    def submit(self, write: Callable[[], None]) -> None:
        """Run ``write()`` in the background thread; it must write only paths this run's :meth:`new` handed out
        (call :meth:`new` in the run's thread, before submitting). Raises here the error of an earlier write that
        failed; returns once at most :attr:`MAX_PENDING` writes are running or waiting (waiting for the oldest)."""
        self._raise_failed()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="output-writer")
        self._pending.append(self._writer.submit(write))
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popleft().result()

    def _raise_failed(self) -> None:
        """Raise the error of the first finished background write that failed (drop the finished ones)."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def wait(self) -> None:
        """Wait for every background write; raise the first one's error (the later ones are then cancelled or
        waited for by :meth:`discard`)."""
        while self._pending:
            self._pending[0].result()
            self._pending.popleft()

    def _stop(self) -> None:
        """Cancel the background writes not started, wait for the running one, ignore their errors (the run failed
        already), and end the thread."""
        for future in self._pending:
            future.cancel()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        self._writer, self._pending = None, deque()

    def _written(self) -> list[str]:
        staging = self.staging
        return sorted({p.relative_to(staging).as_posix() for p in self.files if p.is_file()}) if staging else []

    def _recorded(self) -> set[str]:
        """The files the earlier committed run recorded in ``root`` (none if it kept no record, or an unreadable
        one); a recorded path outside ``root`` is refused (:meth:`_inside`)."""
        record = self.root / self.MANIFEST
        try:
            files = json.loads(record.read_text())["files"]
            files = {str(name) for name in files} if isinstance(files, list) else set()
        except (OSError, ValueError, KeyError, TypeError):
            return set()
        return {self._inside(name, f"the record {record}") for name in files}

    def commit(self) -> None:
        """Move the staged files into ``root`` (see the class docstring); a no-op if the run wrote nothing."""
        if self.staging is None:
            return
        written = self._written()
        if not self.overwrite:
            self.check(written)  # another run may have written them in the meantime
        record = self._recorded() if self.root.exists() else set()
        stale = (record - set(written)) if self.overwrite else set()
        manifest = sorted((record - stale) | set(written))
        atomic_write_text(self.staging / self.MANIFEST, json.dumps({"files": manifest}, indent=1))
        if not self.root.exists():
            os.replace(self.staging, self.root)
        elif self.overwrite and self.staging.parent != self.root.resolve() and self._holds_only(record):
            previous = self.staging.with_name(self.staging.name.replace(".staging-", ".previous-"))
            os.replace(self.root, previous)
            os.replace(self.staging, self.root)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            for relative in written:
                target = self.root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.staging / relative, target)
            for relative in stale:
                if (self.root / relative).is_dir():  # a record names files; a folder it names is left alone
                    continue
                (self.root / relative).unlink(missing_ok=True)
                for folder in (self.root / relative).parents:
                    if folder == self.root or not folder.is_dir() or any(folder.iterdir()):
                        break
                    folder.rmdir()
            os.replace(self.staging / self.MANIFEST, self.root / self.MANIFEST)
            shutil.rmtree(self.staging, ignore_errors=True)
        if stale:
            logger.info("overwrite=true: removed %d file(s) of the earlier run not written again", len(stale))
        self.staging, self._made_parents = None, []

    def _holds_only(self, record: set[str]) -> bool:
        """Whether ``root`` holds nothing but the recorded files (and their folders) and the record."""
        for path in self.root.rglob("*"):
            relative = path.relative_to(self.root).as_posix()
            if path.is_dir():
                if not any(name == relative or name.startswith(relative + "/") for name in record):
                    return False
            elif relative != self.MANIFEST and relative not in record:
                return False
        return True

    def discard(self) -> None:
        """Delete the staging folder (and the parent folders made for it, if empty), once the background writes have
        stopped: ``root`` is untouched."""
        self._stop()
        if self.staging is not None:
            count = len(self._written())
            shutil.rmtree(self.staging, ignore_errors=True)
            logger.warning("run failed: discarded the %d output file(s) it had written; %s is as it was.", count, self.root)
        for folder in reversed(self._made_parents):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.staging, self.files, self._made_parents = None, [], []

    def run(self, workflow: Callable[[], object]) -> None:
        """:meth:`prepare`, run ``workflow()`` (e.g. ``evaluator.run``), :meth:`wait` for its background writes, then
        :meth:`commit`; on any error discard and re-raise."""
        self.prepare()
        try:
            workflow()
            self.wait()
            self._stop()
            self.commit()
        except BaseException:
            self.discard()
            raise


def _save_nifti(path: Path, array: np.ndarray, affine, compression_level: int = 1, dtype=None) -> None:
    """``array`` as a gzipped NIfTI with ``affine`` at ``compression_level`` (0 fastest .. 9 smallest); ``dtype``
    e.g. ``np.int16`` stores a float array scaled (NIfTI ``scl_slope``, read back as floats by any reader)."""
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    if dtype is not None:
        image.set_data_dtype(dtype)
    with gzip.GzipFile(path, "wb", compresslevel=int(compression_level), mtime=0) as stream:
        image.to_stream(stream)


#: gzip level of each kind of NIfTI output without ``compression_level``: the displacement fields stored (level 0,
#: still ``.nii.gz``), as float32 vectors deflate little (a full-size transform: 83.4 MB in 3.0 s at level 1, 92.0 MB
#: in 0.4 s stored, on 2 shared cores); images and masks at level 1 (an int16 image 10.1 MB in 0.26 s against 15.3
#: MB, a mask 0.3 against 7.7 MB in 0.02 s; issue 21)
COMPRESSION_LEVELS = {"transform": 0, "ddf": 0, "submission": 0}

#: how the Learn2Reg submission stores the displacement: float32, or int16 scaled by NIfTI's ``scl_slope`` (half
#: the size; resolution (max |u|) / 32767 voxels; NIfTI has no float16 type)
SUBMISSION_DTYPES = {"float32": np.float32, "int16": np.int16}


class InferenceWriter:
    """Write each registered pair as the evaluator completes an iteration, and one summary line at the end.

    The field is brought to the fixed image's original (file) grid once (only when the pair was registered on
    another grid, ``registration_grid="network"``) and every output is derived from that one tensor. Files under
    ``output_dir`` (each on the fixed image's file grid, with its affine):

    * ``<pair_id>/transform.nii.gz`` (``transform``, default): the registration as an ITK displacement field, mm,
      LPS (:mod:`elastic_hypermorph_bundle.displacement`): ITK/SimpleITK, ANTs and 3D Slicer apply it, and so does
      ``configs/apply.json``;
    * ``<pair_id>/ddf.nii.gz`` (``ddf``): the bundle's own field, channel ``j`` = displacement along voxel axis
      ``j`` in voxels, channel-last ``(X, Y, Z, 3)`` float32;
    * ``submission/disp_<pair_id>.nii.gz`` (``submission``): the Learn2Reg submission, the same layout as
      ``ddf.nii.gz``, in ``submission_dtype``;
    * ``<pair_id>/warped_image.nii.gz`` (``warped``, default): the moving image file warped (linear, edge values
      repeated outside), in the file's own intensity units (e.g. HU) and integer type rounded;
      ``<pair_id>/warped_mask.nii.gz``: the moving mask warped (nearest), when the pair has one;
    * ``<pair_id>/jacobian.nii.gz`` (``jacobian``): ``det(I + grad u)`` (central differences, the two border voxels
      repeated), float32;
    * ``<pair_id>/preview.png`` (``preview``, default): :func:`elastic_hypermorph_bundle.visualize.plot_pair`.

    Args:
        output_files: the run's :class:`OutputFiles`.
        pair_ids: the pairs of the run (their ids, or the datalist's pair dicts with ``"pair_id"``), whose outputs
            are checked for existence when the run starts.
        transform, ddf, submission, warped, jacobian, preview: which files to write (``true``/``false``).
        submission_dtype: ``"float32"`` or ``"int16"`` (:data:`SUBMISSION_DTYPES`).
        compression_level: gzip level of every NIfTI file, 0 (stored: fastest, largest) to 9; ``None``: per kind,
            :data:`COMPRESSION_LEVELS`.
        hyper_space: the model's hyperparameter space, whose names label the preview (``lam``, ``mu``).
        background: write each pair's files in a background thread while the next pair is registered
            (:meth:`OutputFiles.submit`: one pair in flight, a failed write fails the run in its own thread, the
            files still appear all or none); off: written before the next pair starts.
    """

    def __init__(
        self,
        output_files: OutputFiles,
        pair_ids: Sequence[str] = (),
        transform: bool = True,
        ddf: bool = False,
        submission: bool = False,
        warped: bool = True,
        jacobian: bool = False,
        preview: bool = True,
        submission_dtype: str = "float32",
        compression_level: int | None = None,
        hyper_space: HyperSpace | None = None,
        background: bool = True,
    ) -> None:
        self.files = output_files
        self.background = parse_flag("write_background", background)
        self.pair_ids = [pair["pair_id"] if isinstance(pair, Mapping) else str(pair) for pair in pair_ids]
        self.write = {
            name: parse_flag(f"write_{name}", value)
            for name, value in (("transform", transform), ("ddf", ddf), ("submission", submission),
                                ("warped", warped), ("jacobian", jacobian), ("preview", preview))
        }  # fmt: skip
        if submission_dtype not in SUBMISSION_DTYPES:
            raise ValueError(f"submission_dtype must be one of {list(SUBMISSION_DTYPES)}, got {submission_dtype!r}.")
        self.submission_dtype = SUBMISSION_DTYPES[submission_dtype]
        if compression_level is not None and (isinstance(compression_level, bool) or compression_level not in range(10)):
            raise ValueError(f"compression_level must be an integer from 0 to 9 (or null), got {compression_level!r}.")
        self.compression_level = None if compression_level is None else int(compression_level)
        self.hyper_names = list(hyper_space.names) if hyper_space is not None else None
        self.written: list[str] = []  # the pairs written by this run
        self.runtimes: list[float] = []
        self.tre: list[list[float]] = []  # [after, before] mean TRE (mm) of the pairs with points
        self.names: set[str] = set()  # the kinds of file written

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def _started(self, engine: Engine) -> None:
        self.files.check(self._planned(self.pair_ids))
        self.written, self.runtimes, self.tre, self.names = [], [], [], set()

    def _planned(self, pair_ids: Sequence[str]) -> list[str]:
        per_pair = {
            "transform": ["transform.nii.gz"],
            "ddf": ["ddf.nii.gz"],
            "warped": ["warped_image.nii.gz", "warped_mask.nii.gz"],
            "jacobian": ["jacobian.nii.gz"],
            "preview": ["preview.png"],
        }
        paths = []
        for pair_id in pair_ids:
            if self.write["submission"]:
                paths.append(f"submission/disp_{pair_id}.nii.gz")
            paths += [f"{pair_id}/{name}" for kind, names in per_pair.items() if self.write[kind] for name in names]
        return paths

    def __call__(self, engine: Engine) -> None:
        for pair in as_pairs(engine.state.output):
            self.write_pair(pair)

    def write_pair(self, pair: dict) -> None:
        """Hand out the pair's output paths, write its files (in the background unless ``background`` is off) and
        note it for the summary."""
        pair_id = pair.get("pair_id")
        if not pair_id:
            raise ValueError("each pair needs a 'pair_id' (e.g. '0001_0001') to name its output files.")
        paths = {kind: self._new(pair_id, name) for kind, name in self._files_of(pair_id, pair)}
        if self.background:
            self.files.submit(lambda: self.write_files(pair, paths))
        else:
            self.write_files(pair, paths)
        self.written.append(str(pair_id))
        if "runtime" in pair:
            self.runtimes.append(float(pair["runtime"]))
        kind = points_kind(pair)
        if kind is not None:  # a pair with corresponding points: its TRE in the summary (voxels of the registration grid)
            points = [plain(pair[f"{role}_{kind}"]).double().cpu() for role in ("fixed", "moving")]
            spacing = plain(pair["spacing"]).reshape(-1).tolist()
            field = plain(pair["pred"]).detach().double().cpu()
            self.tre.append([target_registration_error(f, *points, spacing).mean().item()
                             for f in (field, torch.zeros_like(field))])

    def _files_of(self, pair_id: str, pair: dict) -> list[tuple[str, str]]:
        """``(kind, name)`` of each file this pair gets (``name`` relative to its folder, or ``submission/...``)."""
        kinds = [("transform", "transform.nii.gz"), ("ddf", "ddf.nii.gz"),
                 ("submission", f"submission/disp_{pair_id}.nii.gz"), ("moving_image", "warped_image.nii.gz"),
                 ("moving_mask", "warped_mask.nii.gz"), ("jacobian", "jacobian.nii.gz"), ("preview", "preview.png")]
        wanted = lambda kind: self.write["warped"] and kind in pair if kind.startswith("moving_") else self.write[kind]  # noqa: E731
        return [(kind, name) for kind, name in kinds if wanted(kind)]

    def write_files(self, pair: dict, paths: Mapping[str, Path]) -> None:
        """Write the files of one pair to ``paths`` (kind -> staged path, from :meth:`_files_of`): the field brought
        to the fixed image's file grid once, then each file from it (:meth:`write_file`). A full file system is
        raised as :class:`~elastic_hypermorph_bundle.atomic.NoSpaceError` naming the folder."""
        try:
            self._write_files(pair, paths)
        except Exception as error:
            folder = next(iter(paths.values())).parent if paths else self.files.root
            if _out_of_space(error, folder):
                raise NoSpaceError(
                    f"no space left on {folder} (writing the outputs of pair {pair['pair_id']}); nothing of this run "
                    f"was moved into {self.files.root}: free space there and run again."
                ) from error
            raise

    def _write_files(self, pair: dict, paths: Mapping[str, Path]) -> None:
        fixed = pair["fixed_image"]
        ddf = plain(pair["pred"]).detach().to("cpu", torch.float32)
        affine, original_affine = _affine(fixed), fixed.meta["original_affine"]
        shape = [int(s) for s in fixed.meta["spatial_shape"]]
        same_grid = list(ddf.shape[1:]) == shape and torch.allclose(affine, torch.as_tensor(original_affine, dtype=torch.float64))
        if not same_grid:  # registered on the network's grid: the field on the file grid, once
            ddf = ddf_to_original_grid(ddf[None], affine, original_affine, shape)[0]
            pair = {key: value for key, value in pair.items() if key != "warped_mask"}  # on the other grid
        affine = np.asarray(torch.as_tensor(original_affine, dtype=torch.float64))
        for kind, path in paths.items():
            self.write_file(kind, path, pair, ddf, affine)

    def write_file(self, kind: str, path: Path, pair: dict, ddf: torch.Tensor, affine: np.ndarray) -> None:
        """One output file of ``kind`` (a key of :meth:`_files_of`) from the field ``ddf`` ``(3, X, Y, Z)`` in voxels
        of the fixed file grid with ``affine``."""
        level = COMPRESSION_LEVELS.get(kind, 1) if self.compression_level is None else self.compression_level
        if kind == "transform":
            write_displacement_field(path, ddf, affine, level)
        elif kind in ("ddf", "submission"):
            dtype = self.submission_dtype if kind == "submission" else None
            _save_nifti(path, ddf.movedim(0, -1).numpy(), affine, level, dtype=dtype)
        elif kind in ("moving_image", "moving_mask"):
            warped = _warp_file(pair[kind], ddf, affine, "linear" if kind == "moving_image" else "nearest",
                                pair.get("warped_mask") if kind == "moving_mask" else None)
            _save_nifti(path, warped, affine, level)
        elif kind == "jacobian":
            det = np.pad(jacobian_determinant(ddf[None])[0].numpy(), JACOBIAN_BORDER, mode="edge")
            _save_nifti(path, det.astype(np.float32), affine, level)
        elif kind == "preview":
            self._write_preview(path, pair)
        else:
            raise ValueError(f"unknown output kind {kind!r}.")

    def _new(self, pair_id: str, name: str) -> Path:
        """The staged path of one output of ``pair_id`` (``name`` relative to its folder, or ``submission/...``)."""
        self.names.add("submission/disp_<pair>.nii.gz" if name.startswith("submission/") else f"<pair>/{name}")
        return self.files.new(name if name.startswith("submission/") else f"{pair_id}/{name}")

    def _write_preview(self, path: Path, pair: dict) -> None:
        from ..visualize import save_pair_png  # matplotlib only when previews are asked for

        hyper = torch.as_tensor(pair["hyper"]).reshape(-1).tolist()
        names = self.hyper_names or [f"h{index}" for index in range(len(hyper))]
        symbols = {"lam": "λ", "mu": "μ", "alpha": "α"}
        described = ", ".join(f"{symbols.get(name, name)} = {value:.3g}" for name, value in zip(names, hyper))
        masks = {key: pair[key][0] for key in ("fixed_mask", "moving_mask") if key in pair}
        # the images as registered (the network's [0, 1] window of the HU range), already in memory; the moving
        # image warped at the three cuts shown only (the window of the whole warp there, not of the HU file's)
        save_pair_png(path, pair["fixed_image"][0], pair["moving_image"][0], warped=True,
                      ddf=pair["pred"], spacing=torch.as_tensor(pair["spacing"]).reshape(-1).tolist(),
                      window=(0.0, 1.0), title=f"pair {pair['pair_id']}, {described}", **masks)

    def _summary(self, engine: Engine) -> None:
        self.files.wait()  # the last pair's files are written (or their error raised) before the line naming them
        if not self.written:
            return
        timing = f", {np.mean(self.runtimes):.1f} s per pair" if self.runtimes else ""
        if self.tre:
            after, before = np.mean(self.tre, axis=0)
            timing += f", TRE {after:.2f} mm (before {before:.2f} mm, {len(self.tre)} pair(s) with points)"
        logger.info(
            "registered %d pair(s)%s; outputs in %s: %s", len(self.written), timing, self.files.root,
            ", ".join(sorted(self.names)) or "no files",
        )


def _affine(image) -> torch.Tensor:
    affine = getattr(image, "affine", None)
    if affine is None:
        raise ValueError("the fixed image must be a MetaTensor with an affine (load it with the bundle's transforms).")
    return torch.as_tensor(affine, dtype=torch.float64)


def _warp_file(image, ddf: torch.Tensor, affine: np.ndarray, interpolation: str, warped=None) -> np.ndarray:
    """The file behind a loaded MetaTensor (its own voxels and units, e.g. HU, not the network's [0, 1] window)
    warped onto the fixed grid (``affine``, ``ddf``'s shape): by the bundle's warp (edge values repeated outside;
    labels nearest, 0 outside) when the file is on that grid, else by ITK through both grids (the same rules).
    An integer file type is kept (rounded). ``warped``: the registration step's warp of the loaded ``image`` by
    this field on the CPU (``(1, X, Y, Z)``), taken instead of warping again where the file holds the very voxels
    that were loaded (a mask, whose values loading keeps; 0.4 s per full-size pair)."""
    path = image.meta.get("filename_or_obj") if hasattr(image, "meta") else None
    if not path:
        raise ValueError("the pair's images must be loaded from files by the bundle's transforms (no file name found).")
    nifti = nib.load(str(path))
    data = np.asanyarray(nifti.dataobj)
    data = data[..., 0] if data.ndim == 4 and data.shape[-1] == 1 else data
    on_grid = data.shape == tuple(ddf.shape[1:]) and np.allclose(nifti.affine, affine, atol=1e-4)
    loaded = on_grid and warped is not None and warped.device.type == "cpu" and tuple(image.shape[1:]) == data.shape
    if loaded and torch.equal(plain(image)[0], torch.as_tensor(data).to(image.dtype)):
        warped = plain(warped)[0].numpy()
    elif on_grid:
        volume = torch.as_tensor(data.astype(np.float32))[None, None]
        warp = warp_image if interpolation == "linear" else warp_label
        warped = warp(volume, ddf[None])[0, 0].numpy()
    else:
        transform = displacement_transform(ddf, affine)
        moved = resample(image_from_nifti(path), transform, reference_grid(ddf.shape[1:], affine), interpolation)
        warped = array_from_image(moved)
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        return np.clip(np.rint(warped), info.min, info.max).astype(data.dtype)
    return warped.astype(np.float32)


def rounded(values: Mapping[str, float], digits: int = 3) -> str:
    """``name value`` pairs for a log line, each value to ``digits`` significant digits (``nan`` where missing)."""
    return ", ".join(f"{name} {float(value):.{digits}g}" for name, value in values.items())


def _mean(values) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else math.nan


class EvaluationWriter:
    """Collect the metrics of every pair (``pair_id``, :func:`~elastic_hypermorph_bundle.metrics.pair_metrics`
    with the values before registration, ``runtime_s``) and, when the run completes, write ``metrics.csv`` (one
    row per pair and a ``mean`` row) and ``metrics.json`` (``mean``, ``pairs``, and ``info``, e.g. the
    hyperparameters and checkpoint). Under distributed evaluation the rows are gathered and rank 0 writes.

    Args:
        output_files: the run's :class:`OutputFiles`.
        labels: mask labels to score (default: nonzero labels of each fixed mask).
        masked: Jacobian metrics inside the fixed mask (Learn2Reg "masked_evaluation").
        info: JSON-serialisable context stored in ``metrics.json``; its ``hyper_names`` (e.g. ``["lam", "mu"]``)
            name the pairs' hyperparameter row (for ``elastic_energy``).
        hyper_space, hyper: the model's hyperparameter space and the row of the run, recorded in ``info`` as
            ``hyper_names`` and ``hyper``.
    """

    FILES = ("metrics.csv", "metrics.json")

    def __init__(
        self,
        output_files: OutputFiles,
        labels: Sequence[int] | None = None,
        masked: bool = True,
        info: dict | None = None,
        hyper_space: HyperSpace | None = None,
        hyper: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        self.files = output_files
        self.labels = labels
        self.masked = masked
        self.info = dict(info or {})
        if hyper_space is not None:
            self.info["hyper_names"] = list(hyper_space.names)
        if hyper is not None:
            self.info["hyper"] = torch.as_tensor(hyper, dtype=torch.float32).reshape(-1).tolist()
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _started(self, engine: Engine) -> None:
        self.files.check(self.FILES)
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        names = self.info.get("hyper_names")
        for pair in as_pairs(engine.state.output):
            metrics = registered_pair_metrics(pair, names, self.labels, self.masked)
            stages = {key: float(value) for key, value in pair.get("stages", {}).items()}  # pre-alignment, start
            self.rows.append({"pair_id": pair.get("pair_id", ""), **metrics, "runtime_s": float(pair["runtime"]),
                              **stages})

    def summary(self) -> dict:
        """Mean of every numeric column over the pairs that have it."""
        columns = [key for row in self.rows for key in row if key != "pair_id"]
        columns = list(dict.fromkeys(columns))
        return {key: _mean(row[key] for row in self.rows if key in row) for key in columns}

    def _write(self, engine: Engine) -> None:
        if idist.get_world_size() > 1:
            gathered = [row for rank_rows in idist.all_gather(self.rows) for row in rank_rows]
            self.rows = list({row["pair_id"]: row for row in gathered}.values())  # a padded pair counts once
        if idist.get_rank() != 0:
            return
        self.rows.sort(key=lambda row: row["pair_id"])
        mean = self.summary()
        columns = ["pair_id", *mean]
        with open(self.files.new("metrics.csv"), "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
            writer.writerow({"pair_id": "mean", **mean})
        record = {"info": self.info, "num_pairs": len(self.rows), "mean": mean, "pairs": self.rows}
        self.files.new("metrics.json").write_text(json.dumps(json_ready(record), indent=4, allow_nan=False))
        logger.info("evaluated %d pair(s): metrics.csv, metrics.json in %s; mean %s", len(self.rows), self.files.root,
                    rounded(mean))
