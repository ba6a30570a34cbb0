"""Write a simulated breathing lung CT dataset in the Learn2Reg 2021+ layout.

Example::

    python scripts/make_synthetic.py --output_dir data/synthetic --num_pairs 6 --spatial_size "[64,64,64]" --seed 0
    # breath-hold realism, a third of the pairs on a real chest CT as the exhale anatomy
    python scripts/make_synthetic.py --output_dir data/realistic --num_pairs 6 --spatial_size "[48,48,52]" \
        --preset realistic --real_ct ../shared/data/real_ct/chest_ct_cropped.nii.gz --real_ct_fraction 0.33
    # baseline / follow-up pairs on a real CT: the follow-up in another position, on another grid
    python scripts/make_synthetic.py --output_dir data/followup --num_pairs 2 --preset followup \
        --real_ct ../shared/data/real_ct/lidc_idri_0002.nii.gz --real_ct_fraction 1

Every keyword of :func:`elastic_hypermorph_bundle.simulation.dataset.make_synthetic_dataset` is an option
(``--preview``, ``--overwrite``, ``--real_ct PATH`` with ``--real_ct_fraction F``; PATH a CT, a list
``'["a.nii.gz","b.nii.gz"]'`` (quoted names) or a folder of CTs, taken in turn) and so is every keyword option of
:func:`~elastic_hypermorph_bundle.simulation.generator.simulate_pair` (``--spacing "[5.25,3.75,5.6875]"``,
``--noise_std 20``, ``--poisson_range "[0.3,0.45]"``, ``--mu_range``, ``--max_displacement_range``,
``--rib_weight_range``, ``--padding_fraction``) including the realism options: ``--preset realistic``,
``--mass_conservation``, ``--sliding 0.8``, ``--noise_std_range "[10,40]"``, ``--blur_range "[0,1.5]"``,
``--intensity_shift_range "[-20,20]"``, ``--volume_change_range "[0.12,0.22]"``, ``--fixed_field_of_view``, and
``--pleural_load_range "[0.5,2]"`` (draw the pleural load instead of the volume change, so the motion's
compressibility follows the drawn material: data on which the sweep can recover it).
An unknown option is refused with the list of valid ones.
"""

import logging
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, so that no install is needed
from elastic_hypermorph_bundle.simulation.dataset import make_synthetic_dataset

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(make_synthetic_dataset)
