"""Crash-safe files: every checkpoint, model and model card is written whole or not at all.

A file is written to a temporary sibling (same folder, so the same file system), flushed and ``fsync``-ed, then
renamed over its final name (``os.replace`` is atomic on POSIX and Windows). A process killed at any moment leaves
either the previous complete file or the new complete file, plus at most a ``.<name>.partial-*`` leftover that no
reader picks up. :class:`AtomicCheckpointSaver` brings this to MONAI's ``CheckpointSaver`` (which writes in place
and deletes the previous checkpoint before writing the next), and :func:`readable_checkpoint` lets a resumed run
skip a checkpoint that cannot be read.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

__all__ = [
    "atomic_write",
    "atomic_torch_save",
    "atomic_write_text",
    "atomic_write_json",
    "json_ready",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "is_readable_checkpoint",
    "readable_checkpoint",
    "PARTIAL_MARKER",
    "NoSpaceError",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "check_output_folder",
]

logger = logging.getLogger("elastic_hypermorph_bundle")

#: temporary files are named ``.<final name>.partial-<random>`` in the final file's folder
PARTIAL_MARKER = ".partial-"


class NoSpaceError(OSError):
    """A file could not be written because its file system is full; the message names the folder."""


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint holds pickled objects beyond tensors and plain values, which the bundle does not load."""


#: below this many free bytes after a failed write, the failure is taken as a full file system (torch reports a
#: full disk as ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos``, without the OSError)
NO_SPACE_BYTES = 1 << 20


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a failed write into ``folder`` failed for lack of space: an ``ENOSPC`` in the error's chain, or a
    file system left with less than :data:`NO_SPACE_BYTES` free."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    try:
        return shutil.disk_usage(folder).free < NO_SPACE_BYTES
    except OSError:
        return False


def check_output_folder(folder: str | os.PathLike, name: str = "output_dir") -> Path:
    """Check, before any work, that a run can write into ``folder`` (the config id ``name``): an existing file is
    not a folder (refused with or without ``--overwrite``), and ``folder``, or the nearest existing folder above it
    when it is still to be made, must be writable. Returns the absolute path.

    Raises:
        NotADirectoryError: ``folder``, or a folder above it, is an existing file.
        PermissionError: not writable.
    """
    root = Path(os.path.abspath(folder))
    existing = next(path for path in (root, *root.parents) if path.exists())
    where = "" if existing == root else f" cannot be created: {existing}"
    if not existing.is_dir():
        raise NotADirectoryError(
            f"{name} {root}{where} is a file, not a folder; choose another --{name} (--overwrite replaces the "
            "outputs of an earlier run in a folder, never a file)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {root}{where} is not writable; choose another --{name}.")
    return root


def atomic_write(path: str | os.PathLike, write: Callable[[object], None], mode: str = "wb") -> Path:
    """Write ``path`` atomically: ``write(stream)`` fills a temporary sibling, which is fsync-ed and renamed over
    ``path`` only once complete. On any error (or a kill) ``path`` keeps its previous content; a full file system
    is reported as :class:`NoSpaceError` naming the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARKER}", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask applied)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH) & ~umask)
        os.replace(temporary, path)
    except Exception as error:
        full = _out_of_space(error, path.parent)  # measured before the partial file frees its space
        Path(temporary).unlink(missing_ok=True)
        if full:
            raise NoSpaceError(
                f"no space left on {path.parent} (writing {path.name}); the previous {path.name}, if any, is intact: "
                "free space there (or choose another folder) and run again (training: --resume true)."
            ) from error
        raise
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    return atomic_write(path, lambda stream: torch.save(obj, stream))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)`` (UTF-8), atomically."""
    return atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def json_ready(value):
    """``value`` as strict JSON values: mappings and sequences recursively, tensors and numpy arrays as lists, numpy
    scalars as Python numbers, and NaN/inf floats as None (strict JSON has no NaN; a metric that could not be
    computed is written as null)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_json(path: str | os.PathLike, value, indent: int = 4) -> Path:
    """Write ``json_ready(value)`` as strict JSON to ``path``, atomically."""
    return atomic_write_text(path, json.dumps(json_ready(value), indent=indent, allow_nan=False))


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folder``; returns them."""
    folder = Path(folder)
    found = sorted(folder.glob(f".*{PARTIAL_MARKER}*")) if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler writing each checkpoint atomically, and deleting a replaced checkpoint only after its
    successor is complete.

    Ignite's ``Checkpoint`` asks its handler to ``remove`` the old file *before* saving the new one; here the
    removal is deferred until the next save has succeeded, so at every moment one complete checkpoint exists.
    In a distributed run only rank 0 writes (as ignite's ``DiskSaver``), so every rank may attach the saver.

    Args:
        dirname: folder of the checkpoints.
        filename: fixed file name for every save (e.g. ``model_best.pt``), or None for the names ``Checkpoint``
            gives (e.g. ``checkpoint_epoch=3.pt``).
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:  # as ignite's DiskSaver: one process of a distributed run writes
            return
        name = self.filename or filename
        atomic_torch_save(checkpoint, self.dirname / name)
        for old in self._pending_removal:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)
        self._pending_removal = []

    def remove(self, filename: str) -> None:
        self._pending_removal.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` (same arguments) whose files are written atomically
    (:class:`AtomicDiskSaver`): a kill while it saves never leaves a truncated ``checkpoint_epoch=<N>.pt`` or
    ``model_best.pt``, and the previous checkpoint is deleted only after the new one is complete."""

    def __init__(self, save_dir: str, save_dict: dict, *args, **kwargs) -> None:
        super().__init__(save_dir, save_dict, *args, **kwargs)
        for attribute in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, attribute, None)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, getattr(checkpoint.save_handler, "filename", None))


def load_checkpoint(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain values only.

    Raises:
        UnsafeCheckpointError: the file holds other pickled objects (which could run code when loaded); the
            message names the file and what to do instead of torch's advice to load it unsafely.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path} holds pickled Python objects besides tensors and plain values (objects that can run code when "
            "loaded): the bundle loads weights only and will not load it. Use weights saved as a state dict "
            "(torch.save(model.state_dict(), path)) from a source you trust."
        ) from None


def is_readable_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``torch.load(path, weights_only=True)`` succeeds (a complete checkpoint of plain tensors/state)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated zip, wrong format, unsafe content: all mean "not usable"
        return False
    return True


def readable_checkpoint(candidates: Iterable[Path]) -> Path | None:
    """The first readable checkpoint of ``candidates`` (give them newest first), warning about each one skipped,
    by name; None if none is readable."""
    for path in candidates:
        if is_readable_checkpoint(path):
            return path
        logger.warning("skipping checkpoint %s: it cannot be read (incomplete or damaged file).", path)
    return None
