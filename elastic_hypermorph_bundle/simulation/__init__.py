"""Simulated breathing lung CT pairs with a known displacement: the analytic thorax (:mod:`.phantom`), the
Navier-Lamé solver (:mod:`.navier`) and the pair and dataset generator (:mod:`.generator`)."""

from .generator import LUNG_FIELD_OF_VIEW_MM, SimulatedPair, breathing_force, make_synthetic_dataset, simulate_pair
from .navier import navier_lame_operator, solve_navier_lame
from .phantom import LABELS, ThoraxAnatomy, render_phantom, sample_anatomy
