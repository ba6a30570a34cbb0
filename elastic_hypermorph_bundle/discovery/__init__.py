"""Test-time discovery of the regularization parameters of a trained hypernetwork: grid sweeps over (lam, mu) or
alpha (:mod:`.sweep`), choice of the optimum (:mod:`.selection`), gradient refinement (:mod:`.refine`), figures
(:mod:`.plots`), the sweep that ``configs/sweep.json`` runs (:mod:`.workflow`) with its output folder
(:mod:`.store`), and the comparison with a baseline (:mod:`.comparison`). See ``docs/discovery.md``."""

from .refine import OBJECTIVES, pair_objective, refine_hyper
from .selection import CRITERIA, SweepResults, material_correlation, physical_reading, read_sweep, summarize
from .sweep import PreparedPair, SweepTable, field_metrics, mask_labels, prepare_pairs, run_grid, sweep_columns
from .comparison import compare_sweeps, pair_figure
from .workflow import ParameterSweep

__all__ = [
    "CRITERIA",
    "OBJECTIVES",
    "ParameterSweep",
    "PreparedPair",
    "SweepResults",
    "SweepTable",
    "compare_sweeps",
    "field_metrics",
    "mask_labels",
    "material_correlation",
    "pair_figure",
    "pair_objective",
    "physical_reading",
    "prepare_pairs",
    "read_sweep",
    "refine_hyper",
    "run_grid",
    "summarize",
    "sweep_columns",
]
