"""Simulated breathing lung CT pairs with a known displacement: the analytic thorax (:mod:`.phantom`), the
Navier-Lamé solver (:mod:`.navier`), the realism effects (:mod:`.realism`), a real CT as the exhale anatomy
(:mod:`.real_ct`) and the pair and dataset generator (:mod:`.generator`)."""

from .generator import (
    LUNG_FIELD_OF_VIEW_MM,
    PRESETS,
    SimulatedPair,
    breathing_force,
    make_synthetic_dataset,
    resolve_options,
    simulate_pair,
)
from .navier import navier_lame_operator, solve_navier_lame
from .phantom import LABELS, ThoraxAnatomy, render_phantom, sample_anatomy
