"""MONAI dictionary transforms for Learn2Reg pairs: images, masks and points on one network grid.

Orientation: by default the stored array order is kept (no reorientation), because Learn2Reg points and the
submitted displacement fields are defined in the array order of the files. An ``axcodes`` reorientation can
be requested: it is safe because points are mapped through the image affines (:class:`MapPointsToGridd`) and
:func:`ddf_to_original_grid` maps fields back through the same affines (permutations and flips included).

Point mapping: a point in 0-based voxel coordinates ``p`` of the original file grid (affine ``A_orig``) is at
``q = A_net^-1 A_orig p`` on the current grid (affine ``A_net``, as MONAI updates it through ``Orientationd``,
``Spacingd`` and ``ResizeWithPadOrCropd``). This is exact: both affines describe the same world space.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ResampleToMatch,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from ..networks.spatial import all_finite, antialias
from .grids import same_grid
from .io import Learn2RegDataError, read_points

__all__ = [
    "REGISTRATION_GRIDS",
    "inference_transforms",
    "PAIR_KEYS",
    "IMAGE_KEYS",
    "MASK_KEYS",
    "COVERAGE_KEY",
    "KEYPOINT_KEYS",
    "LANDMARK_KEYS",
    "detect_hu_offset",
    "LoadPointsd",
    "EnsureFinited",
    "HounsfieldOffsetd",
    "hu_window_coverage",
    "MapPointsToGridd",
    "ResampleToFixedd",
    "AntiAliasd",
    "registration_transforms",
    "map_points",
    "ddf_to_original_grid",
]

logger = logging.getLogger("elastic_hypermorph_bundle")

IMAGE_KEYS = ("fixed_image", "moving_image")
MASK_KEYS = ("fixed_mask", "moving_mask")
KEYPOINT_KEYS = ("fixed_keypoints", "moving_keypoints")
LANDMARK_KEYS = ("fixed_landmarks", "moving_landmarks")
#: where the resampled moving image has data (:class:`ResampleToFixedd`); absent when both images share a grid
COVERAGE_KEY = "moving_coverage"
#: every file key of a pair dict that the transforms load
PAIR_KEYS = IMAGE_KEYS + MASK_KEYS + KEYPOINT_KEYS + LANDMARK_KEYS


def _filename(image) -> str:
    return str(image.meta.get("filename_or_obj", "<in-memory image>")) if isinstance(image, MetaTensor) else "<array>"


def detect_hu_offset(image: torch.Tensor | np.ndarray) -> int:
    """Return 1000 if ``image`` looks stored as HU + 1000 (Learn2Reg 2020 release), else 0 (plain HU).

    Heuristic: in HU, air and the region outside the scan are <= -1000, so a CT volume always has many voxels
    far below 0; stored as HU + 1000, air is about 0 and almost nothing is negative. The image is taken as
    HU + 1000 when its 1st percentile is >= -100.
    """
    return 1000 if float(_subsample_quantiles(image, (0.01,))[0]) >= -100.0 else 0


def _subsample_quantiles(image: torch.Tensor | np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """``quantiles`` (linear interpolation) of every ``n // 1e6``-th voxel of ``image`` (a subsample keeps them cheap
    on large volumes), by numpy's partial selection rather than ``torch.quantile``'s full sort: 3-4 times faster on
    a full-size CT (0.03 against 0.13 s on 2 CPU cores)."""
    values = torch.as_tensor(image).detach().reshape(-1)
    step = max(values.numel() // 1_000_000, 1)
    return np.quantile(values[::step].float().cpu().numpy(), quantiles)


class LoadPointsd(MapTransform):
    """Load point CSVs (0-based voxel xyz of the file grid) as float32 tensors ``(N, 3)``.

    The role of a 6-column file (2020 release: fixed xyz, moving xyz) follows the key name: keys starting with
    ``"fixed"`` read the first three columns, keys starting with ``"moving"`` the last three.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            role = next((r for r in ("fixed", "moving") if str(key).startswith(r)), None)
            d[key] = torch.as_tensor(read_points(d[key], role=role), dtype=torch.float32)
        return d


class EnsureFinited(MapTransform):
    """Raise :class:`Learn2RegDataError`, naming the file, if an image contains NaN or infinite voxels."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if not all_finite(torch.as_tensor(d[key])):
                raise Learn2RegDataError(f"{key} {_filename(d[key])} contains non-finite voxels (NaN or inf).")
        return d


#: an image whose 1st-99th percentile range (in HU, after the offset) covers less of ``hu_window`` than this is
#: not CT in Hounsfield units: air (-1000) to soft tissue (0-100) alone spans over two thirds of [-1000, 500]
MIN_WINDOW_COVERAGE = 1.0 / 3.0


def hu_window_coverage(image: torch.Tensor | np.ndarray, hu_window: Sequence[float]) -> float:
    """The fraction of ``hu_window`` (low, high) that the 1st-99th percentile range of ``image`` (in HU) covers."""
    low, high = _subsample_quantiles(image, (0.01, 0.99)).tolist()
    window_low, window_high = float(hu_window[0]), float(hu_window[1])
    return max(0.0, min(high, window_high) - max(low, window_low)) / (window_high - window_low)


class HounsfieldOffsetd(MapTransform):
    """Subtract the storage offset so images are in HU: ``x - offset``, and warn about an image that is not in HU.

    Args:
        offset: 0 (stored in HU), 1000 (stored as HU + 1000, Learn2Reg 2020), or None to detect it per image
            with :func:`detect_hu_offset`. The offset used is recorded in ``image.meta["hu_offset"]``.
        hu_window: the HU range the next step maps to [0, 1]; when given, an image whose values (after the offset)
            cover less than :data:`MIN_WINDOW_COVERAGE` of it is named in a warning with its value range (uint8
            exports, HU / 1000, MR: the network would see it nearly blank or constant).
    """

    def __init__(
        self,
        keys: KeysCollection,
        offset: int | None = None,
        allow_missing_keys: bool = False,
        hu_window: Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if offset not in (None, 0, 1000):
            raise ValueError(f"offset must be None (detect), 0 or 1000, got {offset!r}.")
        self.offset = offset
        self.hu_window = None if hu_window is None else [float(v) for v in hu_window]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            offset = detect_hu_offset(d[key]) if self.offset is None else self.offset
            stored = d[key]
            d[key] = stored - offset
            if isinstance(d[key], MetaTensor):
                d[key].meta["hu_offset"] = offset
            if self.hu_window is not None and hu_window_coverage(d[key], self.hu_window) < MIN_WINDOW_COVERAGE:
                low, high = (float(v) for v in torch.aminmax(torch.as_tensor(stored).float()))
                taken = "HU + 1000 (Learn2Reg 2020 storage)" if offset else "HU"
                logger.warning(
                    "%s %s holds values %.4g to %.4g, taken as %s, which cover little of hu_window %s: the bundle "
                    "expects CT in Hounsfield units (air -1000, water 0), and this image reaches the network nearly "
                    "blank. Convert it to HU (HU / 1000: multiply by 1000; uint8 exports: the scanner's rescale "
                    "slope and intercept), or train a model with a --hu_window in its units.",
                    key, _filename(stored), low, high, taken, self.hu_window,
                )
        return d


def map_points(points: torch.Tensor, from_affine, to_affine) -> torch.Tensor:
    """Map voxel points ``(N, D)`` from the grid with affine ``from_affine`` to the grid with ``to_affine``.

    ``q = to_affine^-1 @ from_affine @ [p, 1]`` (affines ``(D+1, D+1)``, voxel -> world); computed in float64,
    returned with the dtype and device of ``points``.
    """
    points = torch.as_tensor(points)
    transform = torch.linalg.solve(
        torch.as_tensor(to_affine, dtype=torch.float64), torch.as_tensor(from_affine, dtype=torch.float64)
    ).to(points.device)
    dims = points.shape[-1]
    mapped = points.double() @ transform[:dims, :dims].T + transform[:dims, dims]
    return mapped.to(points.dtype)


class MapPointsToGridd(MapTransform):
    """Map points from the original file grid of a reference image to its current grid.

    Uses the reference image's ``meta["original_affine"]`` (file grid) and ``affine`` (current grid), see
    :func:`map_points`. Place it after all spatial transforms.

    Args:
        keys: point keys, e.g. ``("fixed_keypoints", "moving_keypoints")``.
        reference_keys: image key per point key, e.g. ``("fixed_image", "moving_image")``.
    """

    def __init__(self, keys: KeysCollection, reference_keys: Sequence[str], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if len(reference_keys) != len(self.keys):
            raise ValueError(f"need one reference key per point key, got {reference_keys} for {self.keys}.")
        self.reference = dict(zip(self.keys, reference_keys))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            reference = d[self.reference[key]]
            if not isinstance(reference, MetaTensor) or "original_affine" not in reference.meta:
                raise ValueError(f"{self.reference[key]} must be a MetaTensor with meta['original_affine'].")
            d[key] = map_points(d[key], reference.meta["original_affine"], reference.affine)
        return d


class ResampleToFixedd(MapTransform):
    """Resample the moving image and its mask into the fixed image's grid, through both affines (physical space),
    and record where the moving image has data there.

    Fixed and moving images of one patient are often on different grids (another session: another field of view,
    spacing, shape, origin or orientation). Each moving volume ``m`` becomes ``m(A_m^-1 A_f x)`` on the fixed grid
    ``x`` (MONAI ``ResampleToMatch``; ``modes`` per key, zero outside the moving image: air once intensities are
    windowed to [0, 1]), so everything after this runs on one grid and the outputs are on the fixed grid
    (Learn2Reg convention). The moving volume keeps its file affine as ``meta["original_affine"]``, so
    :class:`MapPointsToGridd` maps moving points from the moving file's voxels into the fixed grid. A moving volume
    already on the fixed grid (:func:`~.grids.same_grid`) is left as it is, and no coverage is written.

    Coverage ``coverage_key`` ``(1, *fixed spatial)``: ``c(x) = 1`` where ``A_m^-1 A_f x`` lies within the hull of
    the moving voxel centres, else 0 (a ones volume resampled bilinearly with zero padding, kept where it is 1
    within 1e-3): the voxels whose resampled value owes nothing to the zero fill. The fill is not anatomy: a
    follow-up with a smaller field of view leaves ~28 % of the baseline's grid as "air" that a similarity would
    match the baseline's tissue against (most of the folded voxels of the benchmark's follow-ups lay there), so
    :class:`~elastic_hypermorph_bundle.workflow.instance.InstanceOptimization` compares only where ``c = 1``.

    Args:
        keys: moving volumes on one grid, e.g. ``("moving_image", "moving_mask")``.
        fixed_key: the image whose grid they are resampled into.
        modes: interpolation per key (``"bilinear"`` images, ``"nearest"`` masks).
        coverage_key: where to write the coverage of the moving grid (``None``: not written).
    """

    def __init__(self, keys: KeysCollection, fixed_key: str = "fixed_image", modes: Sequence[str] | str = "bilinear",
                 allow_missing_keys: bool = False, coverage_key: str | None = COVERAGE_KEY) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fixed_key, self.coverage_key = fixed_key, coverage_key
        self.modes = [modes] * len(self.keys) if isinstance(modes, str) else list(modes)
        if len(self.modes) != len(self.keys):
            raise ValueError(f"need one mode per key, got {self.modes} for {self.keys}.")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        fixed = d[self.fixed_key]
        for key, mode in self.key_iterator(d, self.modes):
            moving = d[key]
            if same_grid(moving.shape[1:], moving.affine, fixed.shape[1:], fixed.affine):
                continue
            file_affine, filename = moving.meta["original_affine"], moving.meta.get("filename_or_obj")
            if self.coverage_key is not None and self.coverage_key not in d:
                ones = MetaTensor(torch.ones((1, *moving.shape[1:]), dtype=torch.float32), affine=moving.affine)
                covered = ResampleToMatch(mode="bilinear", padding_mode="zeros")(ones, img_dst=fixed)
                covered.array = (covered.as_tensor() >= 1.0 - 1e-3).float()
                d[self.coverage_key] = covered
            resampled = ResampleToMatch(mode=mode, padding_mode="zeros")(moving, img_dst=fixed)
            resampled.meta["original_affine"], resampled.meta["filename_or_obj"] = file_affine, filename
            d[key] = resampled
        return d


class AntiAliasd(MapTransform):
    """Low-pass filter images before ``Spacingd`` coarsens them to ``pixdim`` mm: the Gaussian pre-filter of
    :func:`~elastic_hypermorph_bundle.networks.spatial.antialias` (sigma per axis from the image's own voxel size),
    so that this path and :class:`~elastic_hypermorph_bundle.networks.grid.NetworkGrid` (inference on the images'
    grid) give the network the same input; images already at ``pixdim`` or finer-than-needed axes are untouched."""

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pixdim = tuple(float(p) for p in pixdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            batched = image.as_tensor()[None]
            filtered = antialias(batched, [float(v) for v in image.pixdim[:3]], self.pixdim)
            if filtered is not batched:  # antialias returns its input when no axis coarsens
                image = image.clone()
                image.array = filtered[0]
                d[key] = image
        return d


def registration_transforms(
    spatial_size: Sequence[int] | None = None,
    pixdim: Sequence[float] | None = None,
    hu_window: tuple[float, float] = (-1000.0, 500.0),
    hu_offset: int | None = None,
    with_masks: bool | None = None,
    with_keypoints: bool | None = None,
    with_landmarks: bool | None = None,
    axcodes: str | None = None,
) -> Compose:
    """Transforms taking a pair dict of paths (:mod:`.learn2reg`) to network inputs on one grid.

    Steps: ``LoadImaged`` (nibabel, channel first; masks too) -> :class:`EnsureFinited` -> optional
    ``Orientationd(axcodes)`` -> :class:`HounsfieldOffsetd` -> ``ScaleIntensityRanged`` (clip ``hu_window``
    HU to [0, 1]) -> :class:`ResampleToFixedd` (a moving image and mask on another grid into the fixed grid) ->
    optional :class:`AntiAliasd` and ``Spacingd(pixdim)`` (anti-aliased bilinear images, nearest masks) -> optional
    ``ResizeWithPadOrCropd(spatial_size)`` (centred, zero padding = air) -> :class:`LoadPointsd` and
    :class:`MapPointsToGridd` (points follow their image's grid) -> float32.

    The images are required; masks, keypoints and landmarks are loaded when the pair dict has them (the datalist
    decides: ``inference_datalist`` keeps the keys every pair has), unless a ``with_*`` flag says otherwise.

    Output: images and masks ``(1, *spatial)`` MetaTensors (masks 0/1 float); points ``(N, 3)`` voxel xyz of
    the network grid; ``fixed_image.meta["original_affine"]``, ``.affine`` and ``["spatial_shape"]`` give what
    :func:`ddf_to_original_grid` needs; the moving image, its mask and points follow the fixed grid; a moving
    image on another grid adds ``moving_coverage`` (:class:`ResampleToFixedd`), which follows it.

    Args:
        spatial_size: network grid shape; None keeps the (resampled) shape.
        pixdim: target voxel spacing in mm; None keeps the file spacing.
        hu_window: HU range mapped linearly to [0, 1], values outside clipped.
        hu_offset: storage offset, see :class:`HounsfieldOffsetd` (None detects it).
        with_masks, with_keypoints, with_landmarks: for each optional kind of file, None (default) loads it when
            the pair has it, True requires it (a pair without it fails naming the key), False ignores it.
        axcodes: e.g. ``"RAS"`` to reorient; None keeps the array order of the files (default, see module doc).
    """
    if hu_window[1] <= hu_window[0]:
        raise ValueError(f"hu_window must be (low, high) with low < high, got {hu_window}.")
    for name, flag in (("with_masks", with_masks), ("with_keypoints", with_keypoints), ("with_landmarks", with_landmarks)):
        if flag not in (None, True, False):
            raise ValueError(f"{name} must be None (as the data has it), True or False, got {flag!r}.")
    masks = [] if with_masks is False else list(MASK_KEYS)
    volumes = list(IMAGE_KEYS) + masks
    optional = with_masks is None  # the transforms of images and masks skip absent masks when masks are optional
    transforms = [LoadImaged(IMAGE_KEYS, reader="NibabelReader", ensure_channel_first=True, image_only=True)]
    if masks:
        transforms.append(
            LoadImaged(masks, reader="NibabelReader", ensure_channel_first=True, image_only=True, allow_missing_keys=optional)
        )
    transforms.append(EnsureFinited(IMAGE_KEYS))
    if axcodes is not None:
        transforms.append(Orientationd(volumes, axcodes=axcodes, allow_missing_keys=optional))
    transforms += [
        HounsfieldOffsetd(IMAGE_KEYS, offset=hu_offset, hu_window=hu_window),
        ScaleIntensityRanged(IMAGE_KEYS, a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0, clip=True),
        # after windowing, so that what lies outside the moving image is 0 (air)
        ResampleToFixedd(["moving_image"] + masks[1:], modes=["bilinear", "nearest"][: 1 + len(masks[1:])],
                         allow_missing_keys=optional),
    ]
    if pixdim is not None:
        modes = ["bilinear"] * len(IMAGE_KEYS) + ["nearest"] * len(masks)
        transforms.append(AntiAliasd(IMAGE_KEYS, pixdim=pixdim))
        transforms.append(Spacingd(volumes, pixdim=pixdim, mode=modes, allow_missing_keys=optional))
        transforms.append(Spacingd(COVERAGE_KEY, pixdim=pixdim, mode="nearest", allow_missing_keys=True))
    if spatial_size is not None:
        transforms.append(ResizeWithPadOrCropd(volumes, spatial_size=spatial_size, mode="constant", allow_missing_keys=optional))
        # padding is no data of the moving image either
        transforms.append(ResizeWithPadOrCropd(COVERAGE_KEY, spatial_size=spatial_size, mode="constant",
                                               allow_missing_keys=True))
    for points, flag in ((KEYPOINT_KEYS, with_keypoints), (LANDMARK_KEYS, with_landmarks)):
        if flag is not False:
            references = [f"{key.split('_')[0]}_image" for key in points]
            transforms += [
                LoadPointsd(points, allow_missing_keys=flag is None),
                MapPointsToGridd(points, reference_keys=references, allow_missing_keys=flag is None),
            ]
    transforms.append(EnsureTyped(volumes, dtype=torch.float32, track_meta=True, allow_missing_keys=optional))
    transforms.append(EnsureTyped(COVERAGE_KEY, dtype=torch.float32, track_meta=True, allow_missing_keys=True))
    return Compose(transforms)


def ddf_to_original_grid(
    ddf: torch.Tensor,
    network_affine,
    original_affine,
    original_shape: Sequence[int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample a network-grid DDF to the original (file) grid, in original voxel units.

    With ``M = original_affine^-1 @ network_affine`` (network voxel -> original voxel), the original-grid field
    is ``u_orig(x) = M_lin @ u_net(M^-1 x)``, so that ``x + u_orig(x) = M (y + u_net(y))`` with ``y = M^-1 x``:
    both fields send a fixed point to the same moving point. ``u_net`` is interpolated (``mode``) at ``M^-1 x``;
    outside the network grid (cropped regions) the border value is repeated. The moving image was resampled into
    the fixed grid (:class:`ResampleToFixedd`), so the fixed grid is the only one. For a Learn2Reg submission
    ``disp_XXXX_YYYY.nii.gz`` store ``result[0].permute(1, 2, 3, 0)``, shape ``(X, Y, Z, 3)``.

    Args:
        ddf: ``(B, D, *spatial)`` network-grid displacement in network voxels (package convention).
        network_affine: ``(D+1, D+1)`` voxel -> world affine of the network grid (``fixed_image.affine``).
        original_affine: affine of the original grid (``fixed_image.meta["original_affine"]``).
        original_shape: original spatial shape (``fixed_image.meta["spatial_shape"]``).
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``(B, D, *original_shape)`` tensor, same dtype and device as ``ddf``.
    """
    dims = ddf.ndim - 2
    if ddf.ndim < 3 or ddf.shape[1] != dims or dims not in (2, 3):
        raise ValueError(f"ddf must have shape (B, D, *spatial) with D = 2 or 3 spatial dims, got {tuple(ddf.shape)}.")
    original_shape = [int(s) for s in original_shape]
    if len(original_shape) != dims:
        raise ValueError(f"original_shape must have {dims} entries, got {original_shape}.")
    network_affine = torch.as_tensor(network_affine, dtype=torch.float64, device=ddf.device)
    original_affine = torch.as_tensor(original_affine, dtype=torch.float64, device=ddf.device)
    net_to_orig = torch.linalg.solve(original_affine, network_affine)
    axes = [torch.arange(s, dtype=torch.float64, device=ddf.device) for s in original_shape]
    original_voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)
    network_voxels = map_points(original_voxels, original_affine, network_affine)
    network_shape = torch.tensor(ddf.shape[2:], dtype=torch.float64, device=ddf.device)
    # grid_sample: align_corners=True maps index 0 -> -1 and size-1 -> +1; its last axis lists (W, H, D)
    grid = (2.0 * network_voxels / (network_shape - 1).clamp(min=1) - 1.0).flip(-1)
    grid = grid.reshape(1, *original_shape, dims).expand(ddf.shape[0], *original_shape, dims).to(ddf.dtype)
    sampled = F.grid_sample(ddf, grid, mode=mode, padding_mode="border", align_corners=True)
    linear = net_to_orig[:dims, :dims].to(ddf.dtype)
    return torch.einsum("ij,bj...->bi...", linear, sampled)


#: where inference and evaluation register a pair: on the images' own grid ("image", full resolution; the network
#: still reads its trained grid, see :class:`~elastic_hypermorph_bundle.networks.grid.NetworkGrid`) or on the
#: network's grid ("network", the preprocessing of training)
REGISTRATION_GRIDS = ("image", "network")


def inference_transforms(
    registration_grid: str = "image",
    spatial_size: Sequence[int] | None = None,
    pixdim: Sequence[float] | None = None,
    hu_window: tuple[float, float] = (-1000.0, 500.0),
) -> Compose:
    """:func:`registration_transforms` of inference and evaluation: on the images' own grid
    (``registration_grid="image"``: no resampling, pad or crop) or on the network's (``"network"``:
    ``spatial_size`` and ``pixdim``).

    Raises:
        ValueError: for an unknown ``registration_grid``.
    """
    if registration_grid not in REGISTRATION_GRIDS:
        raise ValueError(f"registration_grid must be one of {REGISTRATION_GRIDS}, got {registration_grid!r}.")
    if registration_grid == "image":
        return registration_transforms(hu_window=hu_window)
    return registration_transforms(spatial_size=spatial_size, pixdim=pixdim, hu_window=hu_window)
