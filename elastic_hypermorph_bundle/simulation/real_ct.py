"""A real chest CT as the exhale anatomy of a simulated pair: one CT a user has becomes pairs with known motion.

:func:`simulate_real_ct_pair` (called by :func:`.generator.simulate_pair` with ``real_ct=PATH``):

1. The CT is reoriented to the generator's frame (RAS+: axis 0 towards the patient's right, 1 anterior, 2 superior, as
   ``nibabel.as_closest_canonical`` gives it) and resampled (trilinear, after an
   anti-aliasing Gaussian when coarsening) onto the requested grid, its centre on the grid's centre; outside the
   scan the grid is air (-1000 HU). This is the FIXED (exhale) image.
2. :func:`segment_lungs`: lungs = the large connected components of ``HU < -400`` inside the body (the body is
   everything except the room: the air components that are almost pure air, ``mean HU < -950``, or reach the scan's
   side faces and are mostly air, median ``< -900``), holes (vessels) filled slice by slice. Vessels are lung voxels above -500 HU; keypoints (:func:`vessel_keypoints`) are local
   maxima of the smoothed image 100 HU above the median lung intensity (vessels), inside the eroded lungs.
3. The same Navier-Lamé motion as the phantom (:func:`mask_breathing_force`: a diaphragm pull at the lung bases,
   a rib-cage expansion, the reaction on the rest of the body), with the same realism options (pleural pressure,
   sliding, mass conservation, per-phase acquisition), solved on the exhale grid: ``u`` is defined on the fixed
   grid directly, so the ground truth needs no inversion.
4. The MOVING (inhale) image is the exhale image mapped forward: ``moving(y) = A(y - v(y))`` with ``v`` the
   inverse field (``v(y) = u(y - v(y))``, fixed-point iteration) and ``A`` the exhale image with inhale densities
   when mass conservation is on. The scanner's field of view is the CT's: the inhale image is cut by the same box;
   anatomy that enters it from outside the scan is mirrored from inside (a limitation: there is no data there).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..networks.spatial import antialias_sigma
from .breathing import breathing_field, mean_divergence
from .case import SimulatedPair, acquire_pair, draw_case
from .realism import conserve_lung_mass, jacobian_determinant, sliding_displacement

__all__ = ["LUNG_MASK_RULE", "load_real_ct", "segment_lungs", "vessel_keypoints", "mask_breathing_force", "simulate_real_ct_pair"]

HU_AIR = -1000.0
LUNG_THRESHOLD_HU, VESSEL_THRESHOLD_HU, ROOM_AIR_HU, ROOM_AIR_MEDIAN_HU = -400.0, -500.0, -950.0, -900.0
#: the version of :func:`segment_lungs`'s rule, raised whenever it changes what it calls lung (2: room air by its
#: median, e2a7729). Pairs simulated on a real CT depend on it (breathing force, keypoints, masks), so caches of such
#: pairs key on it and never serve a pair simulated under an older rule.
LUNG_MASK_RULE = 2


@functools.lru_cache(maxsize=4)
def _canonical(path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj, dtype=np.float32), tuple(float(z) for z in image.header.get_zooms()[:3])


def load_real_ct(
    path: str | os.PathLike, spatial_size: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The CT (HU, float32) on the grid ``spatial_size`` x ``spacing`` (mm), centred; and the boolean scan box.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a 3D image.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"real CT {path} is not a file (a chest CT in NIfTI format, HU).")
    data, native = _canonical(str(path))
    if data.ndim != 3:
        raise ValueError(f"real CT {path} must be a 3D image, got shape {data.shape}.")
    spacing = np.asarray(spacing, dtype=float)
    sigma = antialias_sigma(native, spacing)  # the network grid's pre-filter at inference, too
    smooth = ndimage.gaussian_filter(data, sigma) if max(sigma) > 0 else data
    # grid voxel i sits at i * spacing; the CT's centre goes to the grid's centre
    grid_center = (np.asarray(spatial_size) - 1) * spacing / 2
    ct_center = (np.asarray(data.shape) - 1) * np.asarray(native) / 2
    axes = [
        (np.arange(n) * h - gc + cc) / nh
        for n, h, gc, cc, nh in zip(spatial_size, spacing, grid_center, ct_center, native)
    ]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    box = np.all([(c >= 0) & (c <= n - 1) for c, n in zip(coords, data.shape)], axis=0)
    image = ndimage.map_coordinates(smooth, coords, order=1, mode="nearest").astype(np.float32)
    return np.where(box, image, np.float32(HU_AIR)), box


def segment_lungs(image_hu: np.ndarray, box: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(lungs, body)`` boolean masks of a chest CT by threshold and connected components (module docstring).

    The lungs are the air components (``HU < -400``, opened by one voxel) that are not room air and hold at least
    10 % of the largest one, with holes filled in each axial slice. Room air is an air component whose mean is below
    -950 HU, or that reaches a side face of the scan box (axes 0 and 1) with a median below -900 HU (mostly pure air:
    lungs, even cropped by the scan's sides, have medians of -680 to -870 HU). The mean alone missed the room around
    the body of scans whose air holds noise, the table or partial volume at the skin (means of -900 to -940 HU,
    medians below -950, in three of the five CTs of ``shared/data/real_ct``), which then became "lung", with the
    breathing force and keypoints on the air around the body. Raises ValueError when no lung is found.
    """
    box = np.ones(image_hu.shape, bool) if box is None else box
    air = ndimage.binary_opening((image_hu < LUNG_THRESHOLD_HU) & box)
    labels, count = ndimage.label(air)
    if count == 0:
        raise ValueError("no air region below -400 HU: the image does not look like a chest CT in HU.")
    index = np.arange(1, count + 1)
    sizes = ndimage.sum(air, labels, index)
    means = ndimage.mean(image_hu, labels, index)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, 1, 1] = in_plane[1, :, 1] = True
    sides = box & ~ndimage.binary_erosion(box, in_plane, border_value=0)  # the box's faces along axes 0 and 1
    medians = np.asarray(ndimage.median(image_hu, labels, index))
    at_sides = np.isin(index, labels[sides & air])
    is_room = (means < ROOM_AIR_HU) | (at_sides & (medians < ROOM_AIR_MEDIAN_HU))
    room = index[is_room]
    candidates = list(zip(sizes[~is_room], index[~is_room]))
    if not candidates:
        raise ValueError("no lung found: every air region is room air (see segment_lungs).")
    largest = max(candidates)[0]
    lungs = np.isin(labels, [i for s, i in candidates if s >= 0.1 * largest])
    lungs = ndimage.binary_closing(lungs, iterations=2) & box
    for z in range(lungs.shape[2]):
        lungs[:, :, z] = ndimage.binary_fill_holes(lungs[:, :, z])
    body = box & ~np.isin(labels, room)
    return lungs, body | lungs


def vessel_keypoints(image_hu: np.ndarray, lungs: np.ndarray, max_points: int = 2000) -> np.ndarray:
    """Vessel keypoints ``(N, 3)`` (voxels): local maxima (3^3 window) of the image smoothed by half a voxel that
    lie inside the lungs eroded by one voxel and are at least 100 HU above the median lung intensity (vessels,
    also where a coarse grid blurs them below -500 HU); the ``max_points`` brightest, in index order."""
    smooth = ndimage.gaussian_filter(image_hu.astype(np.float64), 0.5)
    inside = ndimage.binary_erosion(lungs)
    if not inside.any():
        return np.zeros((0, 3))
    threshold = np.median(smooth[lungs]) + 100.0
    peaks = (smooth == ndimage.maximum_filter(smooth, size=3)) & (smooth > threshold) & inside
    points = np.argwhere(peaks)
    order = np.argsort(-smooth[peaks], kind="stable")[:max_points]
    return points[np.sort(order)].astype(np.float64)


def mask_breathing_force(
    lungs: np.ndarray, body: np.ndarray, spacing: Sequence[float], rib_weight: float
) -> np.ndarray:
    """Unscaled inhale body force ``(3, X, Y, Z)`` from masks, the counterpart of
    :func:`.generator.breathing_force` for an anatomy without a shape model.

    With ``G`` a Gaussian of 8 mm, ``w = G(lungs)``, ``c = G(body and not lungs)``, ``z_low``/``h`` the lowest
    lung slice and the lung height, ``x_c``/``a_x`` the lungs' lateral centre and half-width, ``y_p``/``d`` their
    posterior edge and depth::

        p = w exp(-max(z - z_low, 0) / (0.15 h)) (0, 0, -1)          diaphragm pull
        e = w ((x - x_c) / a_x, clip((y - y_p) / (2 d), 0, 1), 0)   rib-cage expansion (axis 1 anterior)
        f = p + rib_weight (sum|p| / sum|e|) e - c (sum(p + ...) / sum c)
    """
    if not lungs.any():
        raise ValueError("the lung mask is empty: no breathing force can be applied.")
    spacing = np.asarray(spacing, dtype=float)
    sigma = 8.0 / spacing
    index = np.argwhere(lungs) * spacing
    low, high = index.min(axis=0), index.max(axis=0)
    x, y, z = (np.arange(n) * h for n, h in zip(lungs.shape, spacing))
    x, y, z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    w = ndimage.gaussian_filter(lungs.astype(np.float64), sigma)
    wall = ndimage.gaussian_filter((body & ~lungs).astype(np.float64), sigma)
    height = max(high[2] - low[2], spacing[2])
    pull = w * np.exp(-np.maximum(z - low[2], 0) / (0.15 * height))
    centre, half_width = (low[0] + high[0]) / 2, max((high[0] - low[0]) / 2, spacing[0])
    depth = max(high[1] - low[1], spacing[1])
    anterior = np.clip((y - low[1]) / (2 * depth), 0, 1)
    expansion = np.stack([w * (x - centre) / half_width, np.broadcast_to(w * anterior, w.shape)])
    force = np.concatenate([rib_weight * pull.sum() / max(np.abs(expansion).sum(), 1e-12) * expansion, -pull[None]])
    if wall.sum() == 0:
        return force - force.mean(axis=(1, 2, 3), keepdims=True)
    return force - wall * (force.sum(axis=(1, 2, 3)) / wall.sum())[:, None, None, None]


def _inverse_field(displacement: np.ndarray, iterations: int = 30) -> np.ndarray:
    """``v`` (voxels) with ``v(y) = u(y - v(y))`` on the grid (fixed-point iteration, trilinear ``u``)."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in displacement.shape[1:]), indexing="ij"))
    inverse = displacement.copy()
    for _ in range(iterations):
        points = grid - inverse
        inverse = np.stack([ndimage.map_coordinates(c, points, order=1, mode="nearest") for c in displacement])
    return inverse


def simulate_real_ct_pair(
    path: str | os.PathLike,
    spatial_size: Sequence[int],
    spacing: Sequence[float],
    seed: int,
    options: dict,
    poisson_range: Sequence[float],
    mu_range: Sequence[float],
    padding_fraction: float,
):
    """One pair on a real CT (module docstring); ``options`` are the checked realism options of
    :func:`.generator.simulate_pair`. Returns a :class:`.case.SimulatedPair`."""
    rng = np.random.default_rng(seed)
    draw = draw_case(rng, seed, options, poisson_range, mu_range)  # no anatomy to draw: the material comes first

    fixed, box = load_real_ct(path, spatial_size, spacing)
    lungs, body = segment_lungs(fixed, box)
    force = mask_breathing_force(lungs, body, spacing, draw.rib_weight)
    elastic_mm, force, pressure = breathing_field(
        lungs, force, draw.lam, draw.mu, spacing, padding_fraction, draw.target, draw.volume_change,
        draw.pleural_load,
    )
    lung_volume_change = mean_divergence(elastic_mm, lungs, spacing)
    displacement_mm, sliding_record = elastic_mm, {"sliding": 0.0}
    if options["sliding"] > 0:
        displacement_mm, sliding_record = sliding_displacement(elastic_mm, lungs, spacing, options["sliding"])
    spacing_column = np.asarray(spacing)[:, None, None, None]
    displacement = (displacement_mm / spacing_column).astype(np.float32)

    vessels = lungs & (fixed > VESSEL_THRESHOLD_HU)
    inhale_densities = fixed
    if options["mass_conservation"]:
        inhale_densities = conserve_lung_mass(fixed, lungs & ~vessels, 1.0 / jacobian_determinant(elastic_mm, spacing))
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in spatial_size), indexing="ij"))
    source = grid - _inverse_field(displacement)
    moving = ndimage.map_coordinates(inhale_densities, source, order=1, mode="mirror").astype(np.float32)
    moving = np.where(box, moving, np.float32(HU_AIR))  # the scanner's field of view stays where it is
    midline = np.argwhere(lungs)[:, 0].mean() if lungs.any() else spatial_size[0] / 2

    def label_map(lung: np.ndarray, vessel: np.ndarray, inside: np.ndarray) -> np.ndarray:
        labels = np.where(inside, 1, 0).astype(np.uint8)
        right = np.arange(spatial_size[0])[:, None, None] >= midline  # RAS+: +x is the patient's right
        labels[lung & right], labels[lung & ~right] = 2, 3
        labels[vessel] = 4
        return labels

    def forward(mask: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(mask.astype(np.float32), source, order=1, mode="mirror") > 0.5

    moving_lungs, moving_vessels, moving_body = forward(lungs) & box, forward(vessels) & box, forward(body) & box

    fixed_points = vessel_keypoints(fixed, lungs if options["sliding"] == 0 else ndimage.binary_erosion(lungs))
    moving_points = fixed_points + np.stack(
        [ndimage.map_coordinates(c, fixed_points.T, order=1, mode="nearest") for c in displacement], axis=1
    )
    top = np.subtract(spatial_size, 1)
    seen = np.all((moving_points >= 0) & (moving_points <= top), axis=1)
    seen &= box[tuple(np.clip(np.rint(moving_points), 0, top).astype(int).T)]
    fixed_points, moving_points = fixed_points[seen], moving_points[seen]

    clean = SimulatedPair(
        fixed_image=fixed, moving_image=moving, fixed_mask=lungs.astype(np.uint8),
        moving_mask=moving_lungs.astype(np.uint8), fixed_labels=label_map(lungs, vessels, body),
        moving_labels=label_map(moving_lungs, moving_vessels, moving_body), displacement=displacement, force=force,
        fixed_keypoints=fixed_points, moving_keypoints=moving_points, spacing=tuple(float(s) for s in spacing),
        simulation=draw.record("real_ct", real_ct=os.path.basename(str(path))),
    )
    return acquire_pair(clean, draw, rng, options, pressure, sliding_record, None, lung_volume_change)
