"""Apply a written registration (``<pair_id>/transform.nii.gz``) to other data: the workflow of ``configs/apply.json``.

The transform is a backward field on the fixed image's grid (:mod:`elastic_hypermorph_bundle.displacement`):
``T(p) = p + d(p)`` sends a fixed-image point to the corresponding moving-image point. So

* images and label maps of the MOVING space are brought onto the fixed grid: ``out(p) = image(T(p))``, linear for
  images (``--image``, intensities as stored, e.g. HU; outside the image: the nearest edge value, as the bundle's warp), nearest neighbour for
  label maps (``--label``, labels kept; outside: 0), written as ``<name>_warped.nii.gz`` and
  ``<name>_warped_labels.nii.gz``, in the input's pixel type;
* points of the FIXED space go to the moving space directly, ``q = T(p)`` (``--points_direction
  fixed_to_moving``, the default);
* points of the MOVING space go to the fixed space by inverting ``T`` point by point (``moving_to_fixed``:
  ``p`` with ``T(p) = q``, fixed-point iteration to 1e-3 mm; a point where the field is not invertible is
  refused, naming it). Each is written as ``<name>_in_moving.csv`` / ``<name>_in_fixed.csv``.

Point CSVs hold one ``x,y,z`` row per point (a header line is skipped): ``--points_space voxel`` (0-based voxel
indices in the file's array order, the Learn2Reg convention; fixed-space voxels of the transform's grid,
moving-space voxels of ``--moving_grid``'s, or of the transform's grid when the images share it, as Learn2Reg's
do), ``lps`` (mm, ITK/DICOM world) or ``ras`` (mm, NIfTI/nibabel world). The output uses the same space.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..data.io import read_points, write_points
from ..displacement import (
    POINT_SPACES,
    image_from_nifti,
    map_points,
    physical_points,
    read_displacement_field,
    resample,
)
from .writers import OutputFiles

__all__ = ["ApplyRegistration", "POINT_DIRECTIONS"]

logger = logging.getLogger("elastic_hypermorph_bundle")

#: which way a point file goes: fixed-space points to the moving image, or moving-space points to the fixed image
POINT_DIRECTIONS = ("fixed_to_moving", "moving_to_fixed")


def _paths(name: str, value) -> list[Path]:
    if value is None:
        return []
    values = [value] if isinstance(value, (str, Path)) else list(value)
    paths = [Path(v) for v in values]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--{name} {path} does not exist.")
    return paths


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".csv"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class ApplyRegistration:
    """Warp images (linear) and label maps (nearest) and move point sets with a written registration (module
    docstring). Everything is checked before anything is written; the files go through ``output_files`` (all or
    none, no overwrite without ``--overwrite true``).

    Args:
        transform: the registration, ``<pair_id>/transform.nii.gz`` written by inference.
        output_files: the run's :class:`~elastic_hypermorph_bundle.workflow.writers.OutputFiles`.
        image, label: moving-space image(s) / label map(s), a path or a list of paths (NIfTI).
        points: point CSV(s), a path or a list.
        points_space: ``"voxel"``, ``"lps"`` or ``"ras"`` (:data:`~elastic_hypermorph_bundle.displacement.POINT_SPACES`).
        points_direction: ``"fixed_to_moving"`` or ``"moving_to_fixed"``.
        moving_grid: an image on the moving grid, for voxel points of the moving space when it differs from the
            fixed grid (default: the transform's grid).
    """

    def __init__(
        self,
        transform: str,
        output_files: OutputFiles,
        image: str | Sequence[str] | None = None,
        label: str | Sequence[str] | None = None,
        points: str | Sequence[str] | None = None,
        points_space: str = "voxel",
        points_direction: str = "fixed_to_moving",
        moving_grid: str | None = None,
    ) -> None:
        if transform is None:
            raise ValueError("--transform is missing: the registration to apply, e.g. outputs/inference/<pair>/transform.nii.gz.")
        self.transform_path = Path(transform)
        self.files = output_files
        self.images, self.labels, self.points = _paths("image", image), _paths("label", label), _paths("points", points)
        if not (self.images or self.labels or self.points):
            raise ValueError("nothing to apply: give --image, --label and/or --points (moving-space images, label maps, point CSVs).")
        if points_space not in POINT_SPACES:
            raise ValueError(f"--points_space must be one of {list(POINT_SPACES)}, got {points_space!r}.")
        if points_direction not in POINT_DIRECTIONS:
            raise ValueError(f"--points_direction must be one of {list(POINT_DIRECTIONS)}, got {points_direction!r}.")
        self.points_space, self.points_direction = points_space, points_direction
        self.moving_grid_path = _paths("moving_grid", moving_grid)
        names = [f"{_stem(p)}_warped.nii.gz" for p in self.images] + [f"{_stem(p)}_warped_labels.nii.gz" for p in self.labels]
        suffix = "_in_moving.csv" if points_direction == "fixed_to_moving" else "_in_fixed.csv"
        names += [f"{_stem(p)}{suffix}" for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError(f"two inputs would write the same output file ({names}); rename one.")
        self.outputs = names

    def run(self) -> None:
        """Check every input (and that no output exists), then warp and map, and log one summary line."""
        self.files.check(self.outputs)
        transform, grid = read_displacement_field(self.transform_path)
        moving_grid = image_from_nifti(self.moving_grid_path[0]) if self.moving_grid_path else grid
        point_sets = [read_points(path) for path in self.points]
        sources = [(path, "linear") for path in self.images] + [(path, "nearest") for path in self.labels]
        volumes = [image_from_nifti(path) for path, _ in sources]  # read all before writing any
        import SimpleITK as sitk

        for (path, interpolation), volume, name in zip(sources, volumes, self.outputs):
            sitk.WriteImage(resample(volume, transform, grid, interpolation), str(self.files.new(name)), True)
        inverse = self.points_direction == "moving_to_fixed"
        source_grid, target_grid = (moving_grid, grid) if inverse else (grid, moving_grid)
        for points, name in zip(point_sets, self.outputs[len(sources):]):
            mapped = map_points(physical_points(points, source_grid, self.points_space), transform, inverse=inverse)
            write_points(self.files.new(name), physical_points(mapped, target_grid, self.points_space, inverse=True))
        logger.info("applied %s: wrote %s in %s", self.transform_path, ", ".join(self.outputs), self.files.root)
