"""Hypernetwork-conditioned deformable registration with a linear elastic regularizer (MONAI bundle).

Tensor conventions, used by every module of the package (and nowhere restated differently):

* Images and labels are channel-first, ``(B, C, *spatial)``; spatial axes are in NIfTI array order
  (x, y, z as nibabel returns them; MONAI's ``LoadImage`` keeps that order).
* A dense displacement field (DDF) has shape ``(B, D, *spatial)``: channel ``j`` is the displacement along
  spatial axis ``j`` (tensor axis ``j + 2``), in voxels of the fixed image's grid. Registration is backward:
  ``warped(x) = moving(x + u(x))`` (MONAI :class:`~monai.networks.blocks.Warp`), so ``x + u(x)`` is the point of
  the moving image that corresponds to the fixed-image point ``x``. This is also the Learn2Reg convention,
  whose submission files store the same field channel-last, ``(X, Y, Z, 3)``.
* Points are float arrays ``(N, D)`` of 0-based voxel coordinates in array order (x, y, z), as in the
  Learn2Reg CSV files. Target registration error samples ``u`` at the fixed points (linear interpolation),
  compares ``p_fixed + u(p_fixed)`` with the moving points, and scales by the voxel spacing (mm).
* Hyperparameters are ``(B, H)`` tensors, one row per sample: ``[lam, mu]`` (Lamé parameters) for the
  elastic regularizer, ``[alpha]`` for the diffusion and fixed-elastic baselines.
"""

__version__ = "0.5.3"

from .cli import install_clean_errors as _install_clean_errors
from .console import quiet_third_party as _quiet_third_party

# under `python -m monai.bundle run` an error ends with its real cause, once (ELASTIC_HYPERMORPH_DEBUG=1: full traceback)
_install_clean_errors()
# warnings of other packages that say nothing to a bundle user (ELASTIC_HYPERMORPH_DEBUG=1 keeps them)
_quiet_third_party()
