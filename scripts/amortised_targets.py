"""Build the cache of amortised optimisation's targets (``--amortised_targets`` of ``configs/train.json``): the
instance optimisation's field of each training pair at a few (lam, mu) on the network's grid.

Example (the release recipe's grid, 32 training pairs at the default 10 grid points; about 3 s per pair and point on
a shared 2-core CPU)::

    python scripts/amortised_targets.py --dataset_dir release_work/data --output release_work/targets.npz \
        --spatial_size "[48,48,64]" --pixdim "[7.0,5.0,7.0]" --max_pairs 32

Every keyword of :func:`elastic_hypermorph_bundle.workflow.amortised.build_targets` is an option (``--grid
'[[0,0],[1,1]]'``, ``--seed``, ``--split_file``, ``--steps``); the split is training's for the same ``--seed``.
"""

import logging
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, so that no install is needed
from elastic_hypermorph_bundle.workflow.amortised import build_targets

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(build_targets)
