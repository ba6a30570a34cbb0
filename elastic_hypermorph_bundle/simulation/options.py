"""The simulator's settings: the realism options and their named presets, the checks of every option of
:func:`.generator.simulate_pair`, and the default voxel size (the Learn2Reg lung field of view on the requested
grid)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LUNG_FIELD_OF_VIEW_MM", "BASE_OPTIONS", "PRESETS", "resolve_options", "resolve_settings"]

LUNG_FIELD_OF_VIEW_MM = (336.0, 240.0, 364.0)
"""Field of view of the Learn2Reg lung CT images (192 x 192 x 208 voxels of 1.75 x 1.25 x 1.75 mm)."""


def _default_spacing(spatial_size: Sequence[int]) -> tuple[float, float, float]:
    return tuple(float(f / n) for f, n in zip(LUNG_FIELD_OF_VIEW_MM, spatial_size))


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be a pair (min, max) with {low} <= min <= max <= {high}, got {value}.")
    return value


BASE_OPTIONS = {
    "noise_std": 20.0,
    "max_displacement_range": (12.0, 20.0),
    "rib_weight_range": (0.3, 0.6),
    "mass_conservation": False,
    "sliding": 0.0,
    "noise_std_range": None,
    "blur_range": (0.0, 0.0),
    "intensity_shift_range": (0.0, 0.0),
    "volume_change_range": None,
    "fixed_field_of_view": False,
    "pleural_load_range": None,
}
"""Options of :func:`simulate_pair` that a preset may set, with their values when neither it nor the caller does."""

PRESETS = {
    "realistic": {
        "mass_conservation": True,
        "sliding": 0.8,
        "noise_std_range": (10.0, 40.0),
        "blur_range": (0.0, 1.5),
        "intensity_shift_range": (-20.0, 20.0),
        "volume_change_range": (0.12, 0.22),
        "max_displacement_range": (20.0, 30.0),
        "rib_weight_range": (0.4, 0.8),
        "fixed_field_of_view": True,
    },
}
PRESETS["followup"] = dict(PRESETS["realistic"])  # + a new position and scanner grid (.followup; real CTs only)
"""Named sets of realism options. ``realistic``: breath-hold exhale/inhale pairs (mass conservation, sliding at
the pleura, per-phase scanner differences, lung volume +12-22 % with 20-30 mm diaphragm motion, fixed field of
view; measured on generated pairs: TRE before registration 8-20 mm, lung volume +10-25 %)."""


def resolve_options(preset: str | None = None, **given) -> dict:
    """The realism options of :data:`BASE_OPTIONS`: explicit (not None) values > ``preset`` > base values."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}.")
    unknown = set(given) - set(BASE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown simulation options {sorted(unknown)}; known: {sorted(BASE_OPTIONS)}.")
    options = {**BASE_OPTIONS, **(PRESETS[preset] if preset else {})}
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def _check_options(options: dict) -> dict:
    options = dict(options)
    if options["noise_std"] < 0:
        raise ValueError(f"noise_std must be >= 0, got {options['noise_std']}.")
    options["max_displacement_range"] = _check_range(
        "max_displacement_range", options["max_displacement_range"], 1e-6, np.inf
    )
    options["rib_weight_range"] = _check_range("rib_weight_range", options["rib_weight_range"], 0.0, np.inf)
    if options["noise_std_range"] is not None:
        options["noise_std_range"] = _check_range("noise_std_range", options["noise_std_range"], 0.0, np.inf)
    options["blur_range"] = _check_range("blur_range", options["blur_range"], 0.0, np.inf)
    options["intensity_shift_range"] = _check_range(
        "intensity_shift_range", options["intensity_shift_range"], -np.inf, np.inf
    )
    if options["volume_change_range"] is not None:
        options["volume_change_range"] = _check_range("volume_change_range", options["volume_change_range"], 0.0, 1.0)
    if options["pleural_load_range"] is not None:
        options["pleural_load_range"] = _check_range("pleural_load_range", options["pleural_load_range"], 0.0, np.inf)
        options["volume_change_range"] = None  # the volume change is then the solve's outcome, not a draw
    if not 0.0 <= float(options["sliding"]) <= 1.0:
        raise ValueError(f"sliding must be in [0, 1], got {options['sliding']}.")
    options["sliding"] = float(options["sliding"])
    for flag in ("mass_conservation", "fixed_field_of_view"):
        if not isinstance(options[flag], (bool, np.bool_)):
            raise ValueError(f"{flag} must be true or false, got {options[flag]!r}.")
        options[flag] = bool(options[flag])
    return options


def resolve_settings(
    spatial_size: Sequence[int],
    spacing: Sequence[float] | None,
    poisson_range: Sequence[float],
    mu_range: Sequence[float],
    padding_fraction: float,
    preset: str | None,
    **realism,
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, float], tuple[float, float], dict]:
    """The checked settings of :func:`simulate_pair`: ``(spatial_size, spacing, poisson_range, mu_range, options)``,
    ``options`` the realism options in effect (:func:`resolve_options`). Raises ValueError naming a bad option."""
    spatial_size = tuple(int(n) for n in spatial_size)
    if len(spatial_size) != 3 or min(spatial_size) < 8:
        raise ValueError(f"spatial_size must be 3 sizes of at least 8 voxels, got {spatial_size}.")
    spacing = _default_spacing(spatial_size) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}.")
    if padding_fraction < 0:
        raise ValueError(f"padding_fraction must be >= 0, got {padding_fraction}.")
    options = _check_options(resolve_options(preset, **realism))
    poisson_range = _check_range("poisson_range", poisson_range, 0.0, 0.499)
    mu_range = _check_range("mu_range", mu_range, 1e-6, np.inf)
    return spatial_size, spacing, poisson_range, mu_range, options
