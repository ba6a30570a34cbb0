"""Small readers and writers for Learn2Reg files: point CSVs and NIfTI headers.

Point files hold one point per row, comma separated, as 0-based voxel coordinates ``(x, y, z)`` in nibabel
array order (the Learn2Reg convention). The 2021+ releases store fixed and moving points in two 3-column files
(row ``i`` of one corresponds to row ``i`` of the other); the 2020 Zenodo release stores both in one 6-column
file, fixed ``x, y, z`` then moving ``x, y, z``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "Learn2RegDataError",
    "Learn2RegFileNotFoundError",
    "read_points",
    "write_points",
    "read_nifti_grid",
    "volume_grid",
    "check_voxels",
]


class Learn2RegDataError(ValueError):
    """A Learn2Reg dataset file or folder is malformed or inconsistent; the message names the file."""


class Learn2RegFileNotFoundError(Learn2RegDataError, FileNotFoundError):
    """A file that the dataset layout requires does not exist; the message names the file."""


def read_points(path: str | Path, role: str | None = None) -> np.ndarray:
    """Read a point CSV as a float64 array ``(N, 3)`` of 0-based voxel coordinates (x, y, z).

    Args:
        path: comma-separated file with 3 columns, or 6 columns (2020 release: fixed xyz, then moving xyz).
            A non-numeric first line is treated as a header and skipped.
        role: ``"fixed"`` or ``"moving"``: which half of a 6-column file to return. Required for 6 columns,
            ignored for 3 columns.

    Raises:
        Learn2RegFileNotFoundError: the file does not exist.
        Learn2RegDataError: the file is unreadable, has another column count, no rows, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise Learn2RegFileNotFoundError(f"point file not found: {path}")
    with open(path) as stream:
        first = stream.readline()
    try:
        skip = 0 if _is_numeric_row(first) else 1
        points = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise Learn2RegDataError(f"cannot parse point file {path}: {error}") from error
    if points.shape[0] == 0:
        raise Learn2RegDataError(f"point file {path} has no rows.")
    if points.shape[1] == 6:
        if role not in ("fixed", "moving"):
            raise Learn2RegDataError(f"point file {path} has 6 columns (fixed xyz, moving xyz): role must be "
                                     f"'fixed' or 'moving', got {role!r}.")
        points = points[:, :3] if role == "fixed" else points[:, 3:]
    elif points.shape[1] != 3:
        raise Learn2RegDataError(f"point file {path} must have 3 (or 6) columns, got {points.shape[1]}.")
    if not np.isfinite(points).all():
        raise Learn2RegDataError(f"point file {path} contains non-finite coordinates.")
    return np.ascontiguousarray(points)


def _is_numeric_row(line: str) -> bool:
    try:
        [float(value) for value in line.strip().split(",") if value.strip()]
    except ValueError:
        return False
    return True


def write_points(path: str | Path, points, fmt: str = "%.5f") -> Path:
    """Write points ``(N, 3)`` (array-like, 0-based voxel xyz) as a Learn2Reg 3-column CSV without header."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, points, fmt=fmt, delimiter=",")
    return path


def read_nifti_grid(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Return ``(spatial shape, 4x4 affine)`` of a NIfTI file from its header only (no voxel data is read).

    Raises:
        Learn2RegFileNotFoundError: the file does not exist.
        Learn2RegDataError: nibabel cannot read the header.
    """
    path = Path(path)
    if not path.is_file():
        raise Learn2RegFileNotFoundError(f"NIfTI file not found: {path}")
    try:
        image = nib.load(str(path))
        shape = tuple(int(s) for s in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises several types (ImageFileError, EOFError, gzip/zlib errors)
        raise Learn2RegDataError(f"cannot read NIfTI header of {path}: {error}") from error
    return shape, affine


def volume_grid(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """:func:`read_nifti_grid` of a 3D volume: ``(X, Y, Z)`` and the affine, from the header only. A 4D file with
    one volume, ``(X, Y, Z, 1)``, counts as 3D.

    Raises:
        Learn2RegFileNotFoundError: the file does not exist.
        Learn2RegDataError: unreadable header, or not a 3D volume (a 2D slice, a 4D series); the message names the file.
    """
    shape, affine = read_nifti_grid(path)
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        return tuple(shape[:3]), affine
    kind = f"a 4D image ({shape[3]} volumes)" if len(shape) == 4 else f"a {len(shape)}D image"
    raise Learn2RegDataError(
        f"{path} is {kind} of shape {shape}; the bundle registers 3D volumes (X, Y, Z): give one 3D NIfTI per image."
    )


def check_voxels(path: str | Path) -> None:
    """Read every voxel of a NIfTI file (the header checks of :func:`read_nifti_grid` cannot see a truncated
    ``.nii.gz``) and refuse non-finite values (NaN or inf), which would make every loss and metric NaN.

    Raises:
        Learn2RegDataError: the data cannot be read in full (truncated or damaged file), or contains non-finite
            voxels; the message names the file and the problem.
    """
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as error:  # EOFError (truncated gzip), zlib.error, OSError, ValueError (short raw data)
        raise Learn2RegDataError(
            f"cannot read the voxel data of {path}: {type(error).__name__}: {error} (truncated or damaged file?)."
        ) from error
    if np.issubdtype(data.dtype, np.inexact):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise Learn2RegDataError(
                f"{path} contains {bad} non-finite voxel(s) (NaN or inf); fix or replace the image "
                "(e.g. set them to the background value)."
            )
