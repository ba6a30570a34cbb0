"""A registration as a standard transform: the bundle's voxel DDF as an ITK displacement field, and its use.

The bundle's field (package conventions) is ``u``, ``(D, *spatial)``: channel ``j`` is the displacement along voxel
axis ``j`` of the fixed image, in voxels, and registration is backward, ``warped(x) = moving(x + u(x))``. The file
written for other tools is ITK's displacement field: a 3-component vector image on the fixed image's grid whose
vector at a voxel is the displacement in millimetres in ITK's physical space (LPS: x to the patient's left,
y to the posterior, z to the head), so that ITK's :class:`DisplacementFieldTransform` maps a fixed-image point
``p`` (mm, LPS) to ``p + d(p)``, the corresponding moving-image point, exactly the backward warp of the bundle.

With the fixed image's voxel -> world affine ``A`` (nibabel's, RAS mm) and ``F = diag(-1, -1, 1)`` (RAS <-> LPS),

* displacement: ``d(x) = F A[:3, :3] u(x)`` (mm, LPS), linear in ``u`` (translation terms cancel);
* grid: origin ``F A[:3, 3]``, spacing the column norms of ``A[:3, :3]``, direction ``F A[:3, :3]`` with its
  columns normalised (an affine with shear has no ITK grid and is refused).

The same file is read by SimpleITK/ITK (``sitk.DisplacementFieldTransform(sitk.Cast(image,
sitk.sitkVectorFloat64))``), ANTs (a ``*Warp.nii.gz``), and 3D Slicer (load it as a transform); it is a NIfTI
vector image (intent ``vector``, ITK's layout). Points and images are moved here with ITK itself
(:func:`map_points`, :func:`resample`), so what the bundle applies is what those tools apply.

Moving-space points need the inverse map, which a backward field does not store: :func:`map_points` with
``inverse=True`` solves ``q = p + d(p)`` for ``p`` per point by fixed-point iteration ``p <- q - d(p)``
(converges where the map is a contraction, i.e. the field's gradient is below 1; a point whose residual stays
above ``tolerance`` is refused, naming it).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

__all__ = [
    "RAS_TO_LPS",
    "itk_grid",
    "physical_displacement",
    "reference_grid",
    "displacement_image",
    "displacement_transform",
    "write_displacement_field",
    "read_displacement_field",
    "image_from_nifti",
    "resample",
    "array_from_image",
    "voxel_to_physical",
    "physical_to_voxel",
    "map_points",
    "physical_points",
    "INTERPOLATORS",
    "POINT_SPACES",
]

#: ``diag(-1, -1, 1)``: nibabel's world (RAS) <-> ITK's physical space (LPS); it is its own inverse
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: coordinates of a point CSV: 0-based voxel xyz (Learn2Reg), or millimetres in ITK's (LPS) or nibabel's (RAS) world
POINT_SPACES = ("voxel", "lps", "ras")


def _sitk():
    import SimpleITK as sitk  # imported where used: the package's tensor core does not need it

    return sitk


def itk_grid(affine) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(origin, spacing, direction)`` of ITK's LPS grid for a ``(4, 4)`` voxel -> RAS affine (nibabel).

    Raises:
        ValueError: the affine is not 4x4, singular, or has shear (its axes are not orthogonal).
    """
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu(), dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 voxel -> world matrix, got shape {affine.shape}.")
    linear = RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine {affine.tolist()} is singular: a voxel axis has zero length.")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError(f"affine {affine.tolist()} has shear; ITK grids need orthogonal voxel axes.")
    origin = RAS_TO_LPS @ affine[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.reshape(-1).tolist())


def _lps_millimetres(ddf: torch.Tensor, affine, dtype=torch.float32) -> torch.Tensor:
    """``(3, X, Y, Z)`` voxel DDF -> ``(3, X, Y, Z)`` displacement in mm, LPS, ``d = F A[:3, :3] u`` (one 3x3 matrix
    product over the contiguous channels)."""
    if ddf.ndim != 4 or ddf.shape[0] != 3:
        raise ValueError(f"ddf must have shape (3, X, Y, Z) in voxels, got {tuple(ddf.shape)}.")
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu())
    linear = torch.as_tensor(RAS_TO_LPS @ affine[:3, :3], dtype=dtype)
    return (linear @ ddf.detach().to("cpu", dtype).reshape(3, -1)).view(ddf.shape)


def physical_displacement(ddf: torch.Tensor, affine, dtype=torch.float32) -> np.ndarray:
    """``(3, X, Y, Z)`` voxel DDF -> ``(Z, Y, X, 3)`` displacement in mm, LPS, ``d = F A[:3, :3] u``, in ITK's
    (and SimpleITK's numpy) index order, a contiguous array."""
    return _lps_millimetres(ddf, affine, dtype).permute(3, 2, 1, 0).contiguous().numpy()


def _set_grid(image, affine) -> None:
    origin, spacing, direction = itk_grid(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)


def reference_grid(shape: Sequence[int], affine):
    """A ``sitk.Image`` (uint8, empty) with the grid of ``affine`` and ``shape``: what :func:`resample` fills."""
    sitk = _sitk()
    grid = sitk.Image([int(size) for size in shape], sitk.sitkUInt8)
    _set_grid(grid, affine)
    return grid


def displacement_image(ddf: torch.Tensor, affine, dtype=torch.float32):
    """The ITK displacement field (``sitk.Image`` of 3-vectors, LPS mm; float32 to write, float64 for
    ``sitk.DisplacementFieldTransform``) of a ``(3, X, Y, Z)`` voxel DDF on the grid of ``affine``."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(physical_displacement(ddf, affine, dtype), isVector=True)
    _set_grid(image, affine)
    return image


def displacement_transform(ddf: torch.Tensor, affine):
    """``sitk.DisplacementFieldTransform`` of a ``(3, X, Y, Z)`` voxel DDF on the grid of ``affine``."""
    return _sitk().DisplacementFieldTransform(displacement_image(ddf, affine, torch.float64))


def write_displacement_field(path: str | os.PathLike, ddf: torch.Tensor, affine, compression_level: int = 1) -> Path:
    """Write the ITK displacement field of a ``(3, X, Y, Z)`` voxel DDF on the grid of ``affine``.

    ``.nii.gz``/``.nii``: written by nibabel in ITK's NIfTI layout for vector images (shape ``(X, Y, Z, 1, 3)``,
    intent ``vector``, the vectors in mm LPS, the grid as the fixed image's affine), gzip ``compression_level``
    0 (fastest) to 9 (smallest); other suffixes (``.nrrd``, ``.mha``) by SimpleITK."""
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        _sitk().WriteImage(displacement_image(ddf, affine), str(path), True)
        return path
    # (3, Z, Y, X) contiguous is the file's own order (NIfTI stores x fastest, the vector component slowest): its
    # transpose is the (X, Y, Z, 1, 3) array in Fortran order, which nibabel writes without another copy
    vectors = _lps_millimetres(ddf, affine).permute(0, 3, 2, 1).contiguous().numpy().T
    image = nib.Nifti1Image(vectors[:, :, :, None, :], np.asarray(affine, dtype=np.float64))
    image.header.set_intent("vector")
    if path.name.endswith(".nii"):
        nib.save(image, str(path))
    else:
        with gzip.GzipFile(path, "wb", compresslevel=int(compression_level), mtime=0) as stream:
            image.to_stream(stream)
    return path


def read_displacement_field(path: str | os.PathLike):
    """``(transform, grid)``: the ``sitk.DisplacementFieldTransform`` of a written field, and a scalar image on the
    field's grid (the fixed image's) to resample onto.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a 3D field of 3-vectors.
    """
    sitk = _sitk()
    if not Path(path).is_file():
        raise FileNotFoundError(f"transform {path} does not exist (a registration's transform.nii.gz).")
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(
            f"transform {path} is not a displacement field: expected a 3D image of 3-vectors, got "
            f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)."
        )
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64)), grid


def image_from_nifti(path: str | os.PathLike):
    """A NIfTI file as a ``sitk.Image`` whose grid is nibabel's reading of it (the bundle's), values as stored
    (e.g. HU): reading through nibabel keeps the bundle and ITK on the same affine where a file's qform and sform
    disagree."""
    sitk = _sitk()
    nifti = nib.load(str(path))
    data = np.asanyarray(nifti.dataobj)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path} must be a 3D volume, got shape {data.shape}.")
    if data.dtype == np.float16 or data.dtype.kind == "b":
        data = data.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    _set_grid(image, nifti.affine)
    return image


def array_from_image(image) -> np.ndarray:
    """A scalar ``sitk.Image`` as a numpy array in the package's (NIfTI) axis order ``(X, Y, Z)``."""
    return _sitk().GetArrayFromImage(image).transpose(2, 1, 0)


INTERPOLATORS = ("linear", "nearest")


def resample(image, transform, grid, interpolation: str = "linear", default: float | None = None):
    """``image`` (``sitk.Image``) warped onto ``grid`` by ``transform``: ``out(p) = image(T(p))`` (ITK's
    ``Resample``), ``"linear"`` for intensities, ``"nearest"`` for label maps. Points mapped outside ``image`` take
    ``default``; None: the nearest edge voxel's value for images (as the bundle's warp, ``padding_mode="border"``)
    and 0 for label maps (as :func:`~elastic_hypermorph_bundle.networks.warp_label`). Keeps the pixel type."""
    sitk = _sitk()
    if interpolation not in INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {INTERPOLATORS}, got {interpolation!r}.")
    interpolator = sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor
    extrapolate = default is None and interpolation == "linear"
    default = 0.0 if default is None else float(default)
    return sitk.Resample(image, grid, transform, interpolator, default, image.GetPixelID(), extrapolate)


def _grid_affine(grid) -> np.ndarray:
    """Voxel -> physical (LPS) ``(4, 4)`` matrix of a ``sitk.Image``."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(grid.GetDirection()).reshape(3, 3) * np.asarray(grid.GetSpacing())
    matrix[:3, 3] = grid.GetOrigin()
    return matrix


def voxel_to_physical(points, grid) -> np.ndarray:
    """``(N, 3)`` 0-based voxel xyz of ``grid`` (``sitk.Image``; array order of the NIfTI file, the Learn2Reg CSV
    convention) -> ``(N, 3)`` mm, LPS."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    matrix = _grid_affine(grid)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def physical_to_voxel(points, grid) -> np.ndarray:
    """Inverse of :func:`voxel_to_physical`."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    matrix = np.linalg.inv(_grid_affine(grid))
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def map_points(
    points,
    transform,
    inverse: bool = False,
    tolerance: float = 1e-3,
    max_iterations: int = 200,
) -> np.ndarray:
    """Move ``(N, 3)`` physical points (mm, LPS) with a backward displacement field transform.

    ``inverse=False``: fixed-space points to moving space, ``q = p + d(p)`` (ITK's ``TransformPoint``).
    ``inverse=True``: moving-space points to fixed space, ``p`` with ``p + d(p) = q``, by the fixed-point iteration
    ``p <- q - d(p)`` from ``p = q`` until ``|p + d(p) - q| < tolerance`` mm (module docstring).

    Raises:
        ValueError: ``inverse=True`` and a point did not converge (the field is not invertible there).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    forward = transform.TransformPoint
    if not inverse:
        return np.array([forward(tuple(p)) for p in points]).reshape(-1, 3)
    mapped = np.empty_like(points)
    for index, target in enumerate(points):
        estimate = target.copy()
        for _ in range(max_iterations):
            residual = np.asarray(forward(tuple(estimate))) - target
            if np.linalg.norm(residual) < tolerance:
                break
            estimate = estimate - residual
        else:
            raise ValueError(
                f"point {index} {target.round(3).tolist()} (mm, LPS) has no inverse image under the field within "
                f"{tolerance} mm after {max_iterations} iterations (residual {np.linalg.norm(residual):.3g} mm): "
                "the field folds or is too steep there."
            )
        mapped[index] = estimate
    return mapped


def physical_points(points, grid, space: str, inverse: bool = False) -> np.ndarray:
    """Points given in ``space`` (``"voxel"``: 0-based voxel xyz of ``grid``; ``"lps"`` or ``"ras"``: mm) as mm, LPS;
    with ``inverse``, mm LPS points expressed in ``space`` (the RAS/LPS flip is its own inverse)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if space == "voxel":
        return physical_to_voxel(points, grid) if inverse else voxel_to_physical(points, grid)
    if space == "lps":
        return points
    if space == "ras":
        return points @ RAS_TO_LPS
    raise ValueError(f"point space must be one of {POINT_SPACES}, got {space!r}.")

