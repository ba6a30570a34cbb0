"""One simulated case: its draws (material, amplitude, realism values, per-phase acquisition), its ``simulation``
record, and the pair it yields (:class:`SimulatedPair`), whatever its anatomy (the phantom, :mod:`.generator`; a real
CT, :mod:`.real_ct`; a follow-up, :mod:`.followup`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..physics import young_poisson_from_lame
from .realism import acquire

__all__ = ["SimulatedPair", "CaseDraw", "draw_case", "draw_acquisition", "realism_record", "acquire_pair"]


@dataclass(frozen=True)
class SimulatedPair:
    """One simulated case. Images ``(X, Y, Z)``; fields channel-first ``(3, X, Y, Z)``; points ``(N, 3)`` voxels."""

    fixed_image: np.ndarray  # int16 HU, exhale
    moving_image: np.ndarray  # int16 HU, inhale
    fixed_mask: np.ndarray  # uint8 lung mask
    moving_mask: np.ndarray
    fixed_labels: np.ndarray  # uint8, phantom.LABELS
    moving_labels: np.ndarray
    displacement: np.ndarray  # float32 voxels, fixed grid, backward
    force: np.ndarray  # float64 body force (kPa/mm) balanced by the displacement (in mm)
    fixed_keypoints: np.ndarray
    moving_keypoints: np.ndarray
    spacing: tuple[float, float, float]
    simulation: dict  # seed, lam, mu, poisson_ratio, youngs_modulus, max_displacement_mm, rib_weight
    moving_grid_affine: np.ndarray | None = None  # a follow-up's own grid (.followup); None: the fixed grid

    @property
    def affine(self) -> np.ndarray:
        return np.diag([*self.spacing, 1.0])

    @property
    def moving_affine(self) -> np.ndarray:
        return self.affine if self.moving_grid_affine is None else self.moving_grid_affine


@dataclass(frozen=True)
class CaseDraw:
    """A case's material (Poisson ratio ``nu``, Lamé ``lam`` and ``mu``), force amplitude (``target``: maximum
    displacement in mm, ``rib_weight``), the generator of its realism draws and its target lung volume change, or
    (option ``pleural_load_range``) its pleural load: the pleural pressure's share of the load, which the elastic
    solve with the case's material turns into a volume change."""

    seed: int
    nu: float
    mu: float
    lam: float
    target: float
    rib_weight: float
    realism_rng: np.random.Generator
    volume_change: float | None
    pleural_load: float | None = None

    def record(self, anatomy: str, **extra) -> dict:
        """The start of the case's ``simulation`` record; ``extra`` (e.g. the CT's name) follows ``anatomy``."""
        youngs_modulus, _ = young_poisson_from_lame(self.lam, self.mu)
        return {
            "seed": self.seed,
            "anatomy": anatomy,
            **extra,
            "lam": float(self.lam),
            "mu": float(self.mu),
            "poisson_ratio": float(self.nu),
            "youngs_modulus": float(youngs_modulus),
            "max_displacement_mm": float(self.target),
            "rib_weight": float(self.rib_weight),
        }


def draw_case(
    rng: np.random.Generator, seed: int, options: dict, poisson_range: Sequence[float], mu_range: Sequence[float]
) -> CaseDraw:
    """Draw the material and the amplitude from ``rng`` (in this order: nu, mu, target, rib weight) and the volume
    change (or, with ``pleural_load_range``, the pleural load, in its place) from the realism generator
    ``default_rng([seed, 1])``."""
    nu, mu = rng.uniform(*poisson_range), rng.uniform(*mu_range)
    target, rib_weight = rng.uniform(*options["max_displacement_range"]), rng.uniform(*options["rib_weight_range"])
    realism_rng = np.random.default_rng([int(seed), 1])
    volume_change = pleural_load = None
    if options.get("pleural_load_range") is not None:
        pleural_load = float(realism_rng.uniform(*options["pleural_load_range"]))
    elif options["volume_change_range"] is not None:
        volume_change = float(realism_rng.uniform(*options["volume_change_range"]))
    return CaseDraw(int(seed), nu, mu, 2 * mu * nu / (1 - 2 * nu), target, rib_weight, realism_rng, volume_change,
                    pleural_load)


def draw_acquisition(rng: np.random.Generator, options: dict) -> list[dict]:
    """Per-phase scanner settings (fixed, moving): noise std, blur sigma (mm), intensity shift (HU)."""
    phases = []
    for _ in range(2):
        noise = options["noise_std"] if options["noise_std_range"] is None else rng.uniform(*options["noise_std_range"])
        phases.append(
            {
                "noise_std": float(noise),
                "blur_sigma_mm": float(rng.uniform(*options["blur_range"])),
                "shift_hu": float(rng.uniform(*options["intensity_shift_range"])),
            }
        )
    return phases


def realism_record(options, volume_change, pressure, sliding_record, acquisition, slab_depth,
                   pleural_load=None, lung_volume_change=None) -> dict:
    """The realism values of one case for its ``simulation`` record (empty when every option is off); with a drawn
    pleural load, the load, the pressure and the volume change the material gave (mean ``div u`` in the lungs)."""
    record = {}
    if volume_change is not None:
        record.update(target_volume_change=volume_change, pleural_pressure=pressure)
    if pleural_load is not None:
        record.update(pleural_load=pleural_load, pleural_pressure=pressure, volume_change=lung_volume_change)
    if options["sliding"] > 0:
        record.update(sliding_record)
    if options["mass_conservation"]:
        record["mass_conservation"] = True
    if slab_depth is not None:
        record["slab_depth_mm"] = slab_depth
    defaults = {"noise_std": options["noise_std"], "blur_sigma_mm": 0.0, "shift_hu": 0.0}
    if any(phase != defaults for phase in acquisition):
        record["acquisition"] = {"fixed": acquisition[0], "moving": acquisition[1]}
    return record


def acquire_pair(
    clean: SimulatedPair, draw: CaseDraw, rng: np.random.Generator, options: dict, pressure, sliding_record: dict,
    slab_depth: float | None = None, lung_volume_change: float | None = None,
) -> SimulatedPair:
    """The scanner's view of a simulated case, whatever its anatomy: each phase's settings drawn from
    ``draw.realism_rng`` (:func:`draw_acquisition`), the fixed then the moving image of ``clean`` (HU, noise-free)
    acquired with them and ``rng``'s noise (:func:`.realism.acquire`), and the case's realism values
    (:func:`realism_record`: ``pressure``, ``sliding_record``, ``slab_depth`` and the lungs' ``lung_volume_change``
    with a drawn pleural load) appended to its ``simulation`` record."""
    acquisition = draw_acquisition(draw.realism_rng, options)
    realism = realism_record(options, draw.volume_change, pressure, sliding_record, acquisition, slab_depth,
                             draw.pleural_load, lung_volume_change)
    return replace(
        clean,
        fixed_image=acquire(clean.fixed_image, clean.spacing, rng, **acquisition[0]),
        moving_image=acquire(clean.moving_image, clean.spacing, rng, **acquisition[1]),
        simulation={**clean.simulation, **realism},
    )
