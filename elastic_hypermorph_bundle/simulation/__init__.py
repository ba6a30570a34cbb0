"""Simulated breathing lung CT pairs with a known displacement: the analytic thorax (:mod:`.phantom`), the
Navier-Lamé solver (:mod:`.navier`), the realism effects (:mod:`.realism`), a real CT as the exhale anatomy
(:mod:`.real_ct`), a follow-up scan (:mod:`.followup`); the options and presets (:mod:`.options`), the breathing
motion (:mod:`.breathing`), one case's draws and result (:mod:`.case`), the pair generator (:mod:`.generator`) and
the dataset writer (:mod:`.dataset`)."""

from .breathing import breathing_field, breathing_force
from .case import SimulatedPair
from .dataset import make_synthetic_dataset
from .generator import simulate_pair
from .options import LUNG_FIELD_OF_VIEW_MM, PRESETS, resolve_options
from .navier import navier_lame_operator, solve_navier_lame
from .phantom import LABELS, ThoraxAnatomy, render_phantom, sample_anatomy
