"""Write a simulated breathing lung CT dataset in the Learn2Reg 2021+ layout.

Example::

    python scripts/make_synthetic.py --output_dir data/synthetic --num_pairs 6 --spatial_size "[64,64,64]" --seed 0

Every keyword of :func:`elastic_hypermorph_bundle.simulation.generator.make_synthetic_dataset` is an option
(``--spacing "[5.25,3.75,5.6875]"``, ``--noise_std 20``, ``--poisson_range "[0.3,0.45]"``, ``--mu_range``,
``--max_displacement_range``, ``--preview``, ``--overwrite``).
"""

import logging
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, so that no install is needed
from elastic_hypermorph_bundle.simulation.generator import make_synthetic_dataset

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(make_synthetic_dataset)
