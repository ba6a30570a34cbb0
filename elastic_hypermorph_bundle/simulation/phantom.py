"""Analytic thorax CT phantom: a continuous function of position that can be rendered at any (displaced) points.

The anatomy is a set of signed distance functions (SDFs, mm, negative inside) in a patient frame centred in the
field of view: axis 0 runs right-left (``+x`` = patient's right, the RAS+ convention of an affine with a positive
diagonal), axis 1 posterior -> anterior, axis 2 inferior -> superior (the lung apex has the larger ``z``). Each
tissue's occupancy is a logistic function of its SDF, ``sigmoid(-sdf / edge_width)``, which mimics the partial
volume effect of a CT voxel and keeps the image a smooth function of position, so that rendering it at the
points ``x + u(x)`` of a displacement ``u`` is an exact deformation of the anatomy (no resampling).

Tissues and Hounsfield units (HU): air outside the body (-1000), subcutaneous fat (-100), soft tissue and
abdomen (+40), heart (+45), ribs and spine (bone, +700; intervertebral discs +80), two lungs (parenchyma about
-850, denser posteriorly) above a diaphragm dome, pulmonary vessel trees inside the lungs (+40; recursive
branching with decreasing radius and length, which gives lung registration its texture), and the airways (trachea,
main and lobar bronchi: air lumen with a soft-tissue wall). :data:`LABELS` names the label map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import expit

__all__ = ["LABELS", "TissueTree", "ThoraxAnatomy", "sample_anatomy", "lung_sdf", "render_phantom"]

LABELS = {
    0: "background", 1: "body", 2: "right_lung", 3: "left_lung", 4: "vessels", 5: "airways", 6: "heart", 7: "bone"
}
"""Label map written with the images; the lung mask is separate (both lungs, including their vessels and bronchi,
excluding trachea and main bronchi)."""

HU_AIR, HU_FAT, HU_SOFT_TISSUE, HU_HEART, HU_BONE, HU_DISC = -1000, -100, 40, 45, 700, 80
HU_VESSEL, HU_AIRWAY_WALL = 40, 0
AIRWAY_WALL_MM = 1.5


@dataclass(frozen=True)
class TissueTree:
    """Tubular tree as capsules (segment from ``starts[i]`` to ``ends[i]``, radius ``radii[i]``), mm, patient frame."""

    starts: np.ndarray  # (S, 3)
    ends: np.ndarray  # (S, 3)
    radii: np.ndarray  # (S,)
    bifurcations: np.ndarray  # (B, 3) branching points (a parent with two surviving children)


@dataclass(frozen=True)
class ThoraxAnatomy:
    """One case's anatomy: shape parameters in mm (patient frame, see the module docstring) and its trees."""

    center: np.ndarray  # (3,) world position (mm) of the patient-frame origin
    body_axes: tuple[float, float]  # semi-axes (x, y) of the elliptic body outline
    fat_thickness: float
    thorax_axes: tuple[float, float]  # semi-axes of the inner chest wall, the lateral lung boundary
    lung_center: tuple[float, float, float]  # right lung envelope centre; the left one is mirrored in x
    lung_axes: tuple[float, float, float]  # semi-axes of each lung's ellipsoidal envelope
    dome_top: tuple[float, float]  # diaphragm dome height under the (right, left) lung
    dome_depth: float  # how far the costophrenic recesses reach below the dome top
    mediastinum_half_width: float
    heart_center: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    spine_center: tuple[float, float]  # (x, y) of the vertebral column axis
    spine_radius: float
    rib_period: float
    rib_slope: float  # ribs descend anteriorly: rib bands are level sets of z + rib_slope * y
    lung_hu: float
    vessels: TissueTree
    airways: TissueTree

    @property
    def lung_z_range(self) -> tuple[float, float]:
        """Lowest (costophrenic recess) and highest (apex) ``z`` of the lungs, patient frame (mm)."""
        return min(self.dome_top) - self.dome_depth, self.lung_center[2] + self.lung_axes[2]


def _ellipsoid_sdf(q: np.ndarray, axes: Sequence[float]) -> np.ndarray:
    """Approximate ellipsoid/ellipse SDF ``k0 (k0 - 1) / k1`` (exact on the axes, a good bound elsewhere)."""
    axes = np.asarray(axes, dtype=q.dtype)
    k0 = np.linalg.norm(q / axes, axis=-1)
    k1 = np.linalg.norm(q / axes**2, axis=-1)
    centre = k1 < 1e-6  # the formula is 0/0 at the centre, whose distance to the surface is the smallest semi-axis
    return np.where(centre, -axes.min(), k0 * (k0 - 1) / np.where(centre, 1, k1))


def _body_sdf(anat: ThoraxAnatomy, q: np.ndarray) -> np.ndarray:
    return _ellipsoid_sdf(q[..., :2], anat.body_axes)


def _thorax_sdf(anat: ThoraxAnatomy, q: np.ndarray) -> np.ndarray:
    return _ellipsoid_sdf(q[..., :2], anat.thorax_axes)


def _heart_sdf(anat: ThoraxAnatomy, q: np.ndarray) -> np.ndarray:
    return _ellipsoid_sdf(q - np.asarray(anat.heart_center, q.dtype), anat.heart_axes)


def _spine_sdf(anat: ThoraxAnatomy, q: np.ndarray) -> np.ndarray:
    return np.linalg.norm(q[..., :2] - np.asarray(anat.spine_center, q.dtype), axis=-1) - anat.spine_radius


def lung_sdf(anat: ThoraxAnatomy, q: np.ndarray, side: int) -> np.ndarray:
    """SDF of the right (``side=+1``) or left (``side=-1``) lung at patient-frame points ``q`` ``(..., 3)`` (mm).

    The lung is its ellipsoidal envelope intersected with the inside of the chest wall and the space above the
    diaphragm dome, minus the mediastinum, the heart and the spine (intersection = max of SDFs).
    """
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    cx, cy, cz = anat.lung_center
    envelope = _ellipsoid_sdf(q - np.asarray((side * cx, cy, cz), q.dtype), anat.lung_axes)
    dome = anat.dome_top[0 if side > 0 else 1] - anat.dome_depth * (
        ((x - side * cx) / anat.lung_axes[0]) ** 2 + ((y - cy) / anat.lung_axes[1]) ** 2
    )
    sdf = np.maximum(envelope, _thorax_sdf(anat, q))
    sdf = np.maximum(sdf, dome - z)
    sdf = np.maximum(sdf, anat.mediastinum_half_width - side * x)
    sdf = np.maximum(sdf, -_heart_sdf(anat, q) + 4.0)
    return np.maximum(sdf, -_spine_sdf(anat, q) + 6.0)


def _space_filling_tree(
    rng: np.random.Generator, root: np.ndarray, territory: np.ndarray, generations: int, root_radius: float
) -> TissueTree:
    """Binary tree that fills a territory (points sampled inside an organ) by recursive bisection.

    Each node runs from its parent's end towards the centroid of its territory and, unless it is a leaf, stops
    40-70% of the way and splits the territory across its principal axis (at a random 35-65% quantile) between
    two children. Radii follow Murray's law with flow proportional to territory size:
    ``r = root_radius * (n / n_root) ** (1 / 3)``.
    """
    segments, bifurcations = [], []

    def grow(start: np.ndarray, points: np.ndarray, generation: int) -> None:
        radius = root_radius * (len(points) / len(territory)) ** (1 / 3)
        centroid = points.mean(axis=0)
        if generation + 1 == generations or len(points) < 4:
            segments.append((start, centroid, radius))
            return
        end = start + rng.uniform(0.4, 0.7) * (centroid - start)
        segments.append((start, end, radius))
        bifurcations.append(end)
        centred = points - centroid
        projection = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
        cut = np.quantile(projection, rng.uniform(0.35, 0.65))
        grow(end, points[projection <= cut], generation + 1)
        grow(end, points[projection > cut], generation + 1)

    grow(np.asarray(root, float), territory, 0)
    starts, ends, radii = (np.array(values, dtype=float) for values in zip(*segments))
    return TissueTree(starts, ends, radii, np.array(bifurcations).reshape(-1, 3))


def _merge_trees(trees: Sequence[TissueTree]) -> TissueTree:
    fields = ("starts", "ends", "radii", "bifurcations")
    return TissueTree(*(np.concatenate([getattr(t, f) for t in trees]) for f in fields))


def _sample_inside(rng: np.random.Generator, sdf: Callable[[np.ndarray], np.ndarray], box, count: int) -> np.ndarray:
    """``count`` points uniformly distributed in ``{sdf < 0}`` within the box ``(low, high)`` (rejection)."""
    found = []
    while sum(len(f) for f in found) < count:
        candidates = rng.uniform(box[0], box[1], size=(4 * count, 3))
        found.append(candidates[sdf(candidates) < 0])
    return np.concatenate(found)[:count]


def sample_anatomy(
    rng: np.random.Generator, field_of_view: Sequence[float], vessel_generations: int = 9
) -> ThoraxAnatomy:
    """Draw one case: a random global size, independent jitter of every part, and random vessel/airway trees.

    Args:
        rng: source of randomness (the case's own generator).
        field_of_view: extent of the image in mm per axis; the anatomy is centred in it (nominal sizes fit the
            Learn2Reg lung field of view of about 336 x 240 x 364 mm).
        vessel_generations: branching generations of each vessel tree (two trees per lung, arterial and venous,
            each with ``2 ** (vessel_generations - 1) - 1`` bifurcations).
    """
    size = rng.uniform(0.9, 1.05)

    def jitter(value: float, spread: float = 0.06) -> float:
        return float(value * size * rng.uniform(1 - spread, 1 + spread))

    body_axes = (jitter(150.0), jitter(105.0))
    wall = rng.uniform(18.0, 26.0)
    no_tree = TissueTree(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)))
    anat = ThoraxAnatomy(
        center=np.asarray(field_of_view, float) / 2,
        body_axes=body_axes,
        fat_thickness=float(rng.uniform(6.0, 15.0)),
        thorax_axes=(body_axes[0] - wall, body_axes[1] - wall),
        lung_center=(jitter(68.0), jitter(-5.0, 0.5), jitter(-15.0, 0.3)),
        lung_axes=(jitter(72.0), jitter(100.0), jitter(150.0)),
        dome_top=(jitter(-55.0, 0.15), jitter(-68.0, 0.15)),
        dome_depth=jitter(55.0, 0.15),
        mediastinum_half_width=jitter(16.0, 0.2),
        heart_center=(jitter(-18.0, 0.3), jitter(22.0, 0.3), jitter(-40.0, 0.2)),
        heart_axes=(jitter(58.0), jitter(48.0), jitter(52.0)),
        spine_center=(0.0, -body_axes[1] + jitter(30.0)),
        spine_radius=jitter(17.0),
        rib_period=float(rng.uniform(26.0, 32.0)),
        rib_slope=float(rng.uniform(0.3, 0.5)),
        lung_hu=float(rng.uniform(-880.0, -820.0)),
        vessels=no_tree,
        airways=no_tree,
    )
    spine_y = anat.spine_center[1]
    carina = np.array([0.0, spine_y + 40.0, rng.uniform(30.0, 50.0)])
    box = (-np.asarray(anat.thorax_axes + (200.0,)), np.asarray(anat.thorax_axes + (200.0,)))
    vessel_trees, airway_trees = [], []
    for side in (1, -1):
        def inside(points: np.ndarray, side=side) -> np.ndarray:
            return lung_sdf(anat, points, side) + 3.0

        hilum = np.array([side * 45.0, spine_y + 55.0, carina[2] - 25.0])
        for offset in ([0.0, 5.0, 5.0], [0.0, 15.0, -20.0]):  # pulmonary artery, pulmonary vein
            territory = _sample_inside(rng, inside, box, 8 * 2**vessel_generations)
            vessel_trees.append(_space_filling_tree(rng, hilum + offset, territory, vessel_generations, jitter(8.0)))
        territory = _sample_inside(rng, inside, box, 64)
        airway_trees.append(_space_filling_tree(rng, hilum + [0.0, -10.0, 0.0], territory, 4, 5.0))
    no_points = no_tree.bifurcations
    trachea = TissueTree(np.array([[0.0, carina[1], 250.0]]), carina[None], np.array([jitter(9.0)]), no_points)
    hila = np.stack([tree.starts[0] for tree in airway_trees])
    main_bronchi = TissueTree(np.stack([carina, carina]), hila, np.array([6.5, 6.0]), no_points)
    airways = _merge_trees([trachea, main_bronchi, *airway_trees])
    return replace(anat, vessels=_merge_trees(vessel_trees), airways=airways)


class _Occupancy:
    """Partial-volume occupancy ``sigmoid(-sdf / width)`` of a region given by its SDF."""

    def __init__(self, width: float):
        self.width = width

    def __call__(self, sdf: np.ndarray) -> np.ndarray:
        return expit(-sdf / self.width).astype(sdf.dtype)


def _capsule_union(
    tree: TissueTree,
    points: np.ndarray,
    spacing: np.ndarray,
    reach: tuple[np.ndarray, np.ndarray],
    occupancy: _Occupancy,
    extra_radius: float = 0.0,
) -> np.ndarray:
    """Union (max) of the capsules' occupancies at the grid-shaped world points ``points`` ``(X, Y, Z, 3)``.

    Each capsule is evaluated only on the block of grid indices that can reach its bounding box: the point
    ``x + u(x)`` lies in ``[lo, hi]`` only if ``lo - max(u) <= x <= hi - min(u)`` (``reach = (max(u), -min(u))``
    per axis, mm). Capsules are cut into pieces of at most a few voxels so that oblique ones get tight blocks
    (a union of pieces of one capsule is that capsule).
    """
    union = np.zeros(points.shape[:-1], dtype=points.dtype)
    shape = np.array(points.shape[:-1])
    piece = 4 * float(spacing.min())
    for start, end, radius in zip(tree.starts, tree.ends, tree.radii):
        radius = radius + extra_radius
        margin = radius + 8 * occupancy.width  # the logistic tail beyond is below 0.04%
        cuts = np.linspace(0, 1, int(np.ceil(np.linalg.norm(end - start) / piece)) + 1)
        for a, b in zip(start + cuts[:-1, None] * (end - start), start + cuts[1:, None] * (end - start)):
            lo = np.clip(np.floor((np.minimum(a, b) - margin - reach[0]) / spacing).astype(int), 0, shape)
            hi = np.clip(np.ceil((np.maximum(a, b) + margin + reach[1]) / spacing).astype(int) + 1, 0, shape)
            if np.any(hi <= lo):
                continue
            block = tuple(slice(i, j) for i, j in zip(lo, hi))
            relative = points[block] - a.astype(points.dtype)
            axis = (b - a).astype(points.dtype)
            t = np.clip((relative @ axis) / max(float(axis @ axis), 1e-12), 0, 1)
            distance = np.linalg.norm(relative - t[..., None] * axis, axis=-1)
            np.maximum(union[block], occupancy(distance - radius), out=union[block])
    return union


def render_phantom(
    anat: ThoraxAnatomy,
    shape: Sequence[int],
    spacing: Sequence[float],
    displacement_mm: np.ndarray | None = None,
    edge_width: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the anatomy on a grid, optionally at displaced points: ``image(x) = P(x + u(x))``.

    Args:
        anat: the case's anatomy.
        shape: grid size ``(X, Y, Z)``; voxel ``i`` sits at world position ``i * spacing`` mm (affine
            ``diag(spacing)``).
        spacing: voxel size in mm per axis.
        displacement_mm: optional ``(3, X, Y, Z)`` displacement in mm; the phantom is evaluated at ``x + u(x)``.
        edge_width: logistic edge width in mm (default ``0.3 * min(spacing)``: about one voxel of partial volume).

    Returns:
        ``(image, labels, lung_mask)``: float32 HU ``(X, Y, Z)`` (noise-free), the uint8 label map of
        :data:`LABELS` and the boolean lung mask (lung occupancy above one half).
    """
    spacing = np.asarray(spacing, dtype=float)
    occupancy = _Occupancy(edge_width if edge_width is not None else 0.3 * float(spacing.min()))
    axes = [np.arange(n, dtype=np.float32) * np.float32(h) for n, h in zip(shape, spacing)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    reach = (np.zeros(3), np.zeros(3))
    if displacement_mm is not None:
        flat = displacement_mm.reshape(3, -1)
        points += np.moveaxis(displacement_mm, 0, -1).astype(np.float32)
        reach = (np.maximum(flat.max(axis=1), 0), np.maximum(-flat.min(axis=1), 0))
    q = points - anat.center.astype(np.float32)
    x, y, z = q[..., 0], q[..., 1], q[..., 2]

    image = np.full(q.shape[:-1], HU_AIR, dtype=np.float32)
    labels = np.zeros(q.shape[:-1], dtype=np.uint8)

    def paint(occ: np.ndarray, hu, label: int | None) -> None:
        image[...] += occ * (hu - image)
        if label is not None:
            labels[occ > 0.5] = label

    body_sdf = _body_sdf(anat, q)
    paint(occupancy(body_sdf), HU_FAT, 1)
    paint(occupancy(body_sdf + anat.fat_thickness), HU_SOFT_TISSUE, None)
    paint(occupancy(_heart_sdf(anat, q)), HU_HEART, 6)

    low, apex = anat.lung_z_range
    thorax = _thorax_sdf(anat, q)
    rib_phase = np.mod(z + anat.rib_slope * y, anat.rib_period) - anat.rib_period / 2
    rib = np.maximum.reduce([-thorax - 2.0, thorax - 9.0, np.abs(rib_phase) - 5.0, z - apex - 10.0, low - 30.0 - z])
    paint(occupancy(rib), HU_BONE, 7)
    spine = _spine_sdf(anat, q)
    paint(occupancy(spine), HU_BONE, 7)
    disc = np.abs(np.mod(z, 27.0) - 13.5) - 2.5
    paint(occupancy(np.maximum(spine, -disc)), HU_DISC, None)

    right, left = (occupancy(lung_sdf(anat, q, side)) for side in (1, -1))
    lung = np.maximum(right, left)
    dependent = np.clip(0.5 - y / (2 * anat.thorax_axes[1]), 0, 1)  # denser parenchyma posteriorly (gravity)
    paint(right, anat.lung_hu + 50 * dependent, 2)
    paint(left, anat.lung_hu + 50 * dependent, 3)

    # capsules are rendered block-wise on grid indices, hence in world coordinates
    vessels = lung * _capsule_union(_shifted(anat.vessels, anat.center), points, spacing, reach, occupancy)
    paint(vessels, HU_VESSEL, 4)
    airways = _shifted(anat.airways, anat.center)
    paint(_capsule_union(airways, points, spacing, reach, occupancy, AIRWAY_WALL_MM), HU_AIRWAY_WALL, 5)
    paint(_capsule_union(airways, points, spacing, reach, occupancy), HU_AIR, None)
    return image, labels, lung > 0.5


def _shifted(tree: TissueTree, offset: np.ndarray) -> TissueTree:
    return TissueTree(tree.starts + offset, tree.ends + offset, tree.radii, tree.bifurcations + offset)
