"""Learn2Reg data: dataset discovery and splits (learn2reg), MONAI transforms (transforms), grid geometry (grids),
file helpers (io).

The simulated breathing pairs are in :mod:`elastic_hypermorph_bundle.simulation`."""

from .io import (
    Learn2RegDataError,
    Learn2RegFileNotFoundError,
    check_voxels,
    read_nifti_grid,
    read_points,
    volume_grid,
    write_points,
)
from .learn2reg import (
    PAPER_SPLIT_WEIGHTS,
    SPLITS,
    Learn2RegDataset,
    discover_pairs,
    load_pairs,
    read_split,
    save_split,
    split_pairs,
    split_sizes,
    validate_pairs,
)
from .transforms import (
    EnsureFinited,
    HounsfieldOffsetd,
    LoadPointsd,
    MapPointsToGridd,
    ResampleToFixedd,
    ddf_to_original_grid,
    detect_hu_offset,
    map_points,
    registration_transforms,
)
