"""Registration peers: elastix B-spline (itk-elastix), SimpleITK demons and ConvexAdam (``convexAdam``), returning
DDFs in the package convention.

Both toolkits return a displacement field on the fixed image grid that maps a fixed-image physical point ``p`` to
the moving-image physical point ``p + d(p)`` (ITK's transform direction: fixed -> moving, i.e. the backward warp
that resamples the moving image onto the fixed grid), in mm, components in physical x, y, z order. With
``numpy <-> ITK`` conversion the index order is reversed: an ITK image of index size ``(X, Y, Z)`` is the numpy
array ``(Z, Y, X)``. We build every ITK image from the package's ``(X, Y, Z)`` array transposed, with identity
direction and zero origin, so ITK index axis ``k`` is array axis ``k`` and physical axis ``k``. The field array
from ITK, ``(Z, Y, X, 3)``, is therefore transposed back to ``(X, Y, Z, 3)`` and divided by the spacing per
component to give the package DDF ``(3, X, Y, Z)`` in voxels (:func:`itk_field_to_ddf`).

ConvexAdam (Siebert, Hansen, Heinrich, MICCAI 2021 / IEEE TMI 2024) works on torch tensors in the array's own axis
order ``(H, W, D)`` = our ``(X, Y, Z)``: its Adam stage samples the moving features at
``grid0 + (disp / scale).flip(-1)`` with ``grid_sample`` (whose coordinate order is the reverse of the tensor's), so
channel ``j`` of its field is the displacement along array axis ``j`` in voxels, backward (moving sampled at
``x + u(x)``), ignoring the voxel spacing; it returns ``(H, W, D, 3)``. :func:`convex_adam_field_to_ddf` only moves the
channel axis first (checked on a known shift in ``tests/test_benchmark.py``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import numpy as np

__all__ = [
    "elastix_available", "itk_field_to_ddf", "elastix_lung_parameters", "elastix_register", "demons_register",
    "convex_adam_available", "convex_adam_field_to_ddf", "convex_adam_register",
]


def elastix_available() -> bool:
    try:
        import itk

        return hasattr(itk, "elastix_registration_method")
    except ImportError:
        return False


def itk_field_to_ddf(field_zyx: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Convert an ITK/SimpleITK displacement field array ``(Z, Y, X, 3)`` (mm, physical xyz components, identity
    direction) to the package DDF ``(3, X, Y, Z)`` in voxels along array axes x, y, z."""
    field_zyx = np.asarray(field_zyx, dtype=np.float64)
    if field_zyx.ndim != 4 or field_zyx.shape[-1] != 3:
        raise ValueError(f"expected an ITK displacement field array (Z, Y, X, 3), got shape {field_zyx.shape}.")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or (spacing <= 0).any():
        raise ValueError(f"spacing must hold 3 positive voxel sizes (x, y, z) in mm, got {spacing.tolist()}.")
    field_xyz = field_zyx.transpose(2, 1, 0, 3) / spacing
    return np.ascontiguousarray(np.moveaxis(field_xyz, -1, 0)).astype(np.float32)


def _itk_image(volume_xyz: np.ndarray, spacing: Sequence[float]):
    import itk

    image = itk.image_from_array(np.ascontiguousarray(np.asarray(volume_xyz, dtype=np.float32).T))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([0.0, 0.0, 0.0])
    return image


#: the image pyramids of :func:`elastix_lung_parameters`' two B-spline stages (Par0011-like)
LUNG_PYRAMIDS = ((8, 4, 2, 1), (2, 1))


def elastix_lung_parameters(iterations: int = 250, bending_weight: float = 0.05, samples: int = 2000,
                            final_grid_voxels: float = 3.0, affine_stage: bool = False, pyramids=LUNG_PYRAMIDS):
    """Parameter maps for intra-patient lung CT after the elastix model zoo's Par0011 (Staring et al., EMPIRE10):
    two B-spline stages, each normalized correlation + bending energy penalty at a relative weight of
    ``bending_weight`` (Par0011's 0.05: relative to the similarity's gradient, not an absolute weight, whose scale
    would depend on the images), adaptive stochastic gradient descent on ``samples`` random coordinates renewed
    every iteration, ``iterations`` per resolution, linear interpolation while optimising:

    1. a coarse-to-fine stage: 4 resolutions (image pyramid 8, 4, 2, 1), control-point spacing 8, 4, 2, 1 times
       ``2 * final_grid_voxels``, which gives the capture range of a 15-30 mm breath-hold motion;
    2. a fine stage composed on it: 2 resolutions (pyramid 2, 1), spacing 2 then 1 times ``final_grid_voxels``.

    Par0011's 10 mm then 5 mm final grids are about 6 then 3 voxels at the Learn2Reg lung resolution
    (1.75 x 1.25 x 1.75 mm); the grid is set in voxels so that a benchmark on a down-sampled grid keeps the same
    number of voxels per control point. Par0011 runs 5 resolutions per stage and 1000-2000 iterations per level;
    with these fewer levels and 150 iterations per level a full-size pair (192 x 192 x 208) took 452 s on 2 cores
    shared with other jobs (load 6-7): keypoint TRE 1.47 mm on the held-out breath-hold pair of benchmark 5b,
    where the former set-up (2 resolutions at 6 and 3 voxels, an absolute bending weight: no coarse levels to
    capture a 15-30 mm motion) gave 6.92 mm in 422 s at 500 iterations.

    ``affine_stage``: an affine stage first (elastix's default affine map, 3 resolutions, normalized correlation,
    ``iterations`` on random samples), as for a follow-up scan in another position. ``pyramids``: the B-spline
    stages' image pyramids, the last stage's grid ``final_grid_voxels``, each earlier stage's twice as coarse (e.g.
    ``((2, 1),)``: one 2-resolution stage, for a quick check of the runner, not for a figure)."""
    import itk

    parameters = itk.ParameterObject.New()
    if affine_stage:
        affine = parameters.GetDefaultParameterMap("affine", 3)
        for key, value in {"Metric": ["AdvancedNormalizedCorrelation"], "ImageSampler": ["RandomCoordinate"],
                           "NumberOfSpatialSamples": [str(samples)], "NewSamplesEveryIteration": ["true"],
                           "MaximumNumberOfIterations": [str(iterations)], "WriteResultImage": ["false"],
                           "AutomaticTransformInitialization": ["true"],
                           "AutomaticTransformInitializationMethod": ["CenterOfGravity"]}.items():
            affine[key] = value
        parameters.AddParameterMap(affine)
    for index, pyramid in enumerate(pyramids):
        grid = float(final_grid_voxels) * 2.0 ** (len(pyramids) - 1 - index)
        parameter_map = parameters.GetDefaultParameterMap("bspline", len(pyramid))
        del parameter_map["FinalGridSpacingInPhysicalUnits"]
        settings = {
            "Registration": ["MultiMetricMultiResolutionRegistration"],
            "FixedImagePyramid": ["FixedRecursiveImagePyramid"],
            "MovingImagePyramid": ["MovingRecursiveImagePyramid"],
            "Metric": ["AdvancedNormalizedCorrelation", "TransformBendingEnergyPenalty"],
            "UseRelativeWeights": ["true"],
            "Metric0RelativeWeight": ["1.0"],
            "Metric1RelativeWeight": [str(bending_weight)],
            "NumberOfResolutions": [str(len(pyramid))],
            "ImagePyramidSchedule": [str(level) for level in pyramid for _ in range(3)],
            "FinalGridSpacingInVoxels": [str(grid)] * 3,
            "GridSpacingSchedule": [str(float(level)) for level in pyramid],
            "HowToCombineTransforms": ["Compose"],
            "ImageSampler": ["RandomCoordinate"],
            "NumberOfSpatialSamples": [str(samples)],
            "NewSamplesEveryIteration": ["true"],
            "MaximumNumberOfIterations": [str(iterations)],
            "Optimizer": ["AdaptiveStochasticGradientDescent"],
            "AutomaticParameterEstimation": ["true"],
            "UseAdaptiveStepSizes": ["true"],
            "BSplineInterpolationOrder": ["1"],
            "FinalBSplineInterpolationOrder": ["3"],
            "WriteResultImage": ["false"],
        }
        for key, value in settings.items():
            parameter_map[key] = value
        parameters.AddParameterMap(parameter_map)
    return parameters


def _transformix_field(moving_image, transform_parameters) -> np.ndarray:
    """Deformation field of ``transform_parameters`` on the fixed grid, ``(Z, Y, X, 3)`` mm (transformix)."""
    import itk

    with tempfile.TemporaryDirectory() as scratch:  # transformix writes its files there, not into the cwd
        transformix = itk.TransformixFilter.New(moving_image)
        transformix.SetTransformParameterObject(transform_parameters)
        transformix.SetComputeDeformationField(True)
        transformix.SetOutputDirectory(scratch)
        transformix.SetLogToConsole(False)
        transformix.UpdateLargestPossibleRegion()
        return np.array(itk.array_from_image(transformix.GetOutputDeformationField()))


def elastix_register(fixed: np.ndarray, moving: np.ndarray, spacing: Sequence[float], parameters=None,
                     threads: int | None = None) -> np.ndarray:
    """Register ``moving`` to ``fixed`` (``(X, Y, Z)`` arrays on one grid of ``spacing`` mm) with elastix; return
    the DDF ``(3, X, Y, Z)`` in voxels, package convention (``warped(x) = moving(x + u(x))``)."""
    import itk

    fixed_image, moving_image = _itk_image(fixed, spacing), _itk_image(moving, spacing)
    parameters = elastix_lung_parameters() if parameters is None else parameters
    method = itk.ElastixRegistrationMethod.New(fixed_image, moving_image)
    method.SetParameterObject(parameters)
    method.SetLogToConsole(False)
    if threads:
        method.SetNumberOfThreads(int(threads))
    method.UpdateLargestPossibleRegion()
    return itk_field_to_ddf(_transformix_field(moving_image, method.GetTransformParameterObject()), spacing)


def demons_register(fixed: np.ndarray, moving: np.ndarray, spacing: Sequence[float], iterations: Sequence[int] = (
        100, 50), smoothing_sigma: float = 1.5) -> np.ndarray:
    """SimpleITK fast symmetric forces demons, coarse to fine (one level per entry of ``iterations``, halving the
    resolution per level), displacement field smoothed with ``smoothing_sigma`` voxels; returns the DDF
    ``(3, X, Y, Z)`` in voxels, package convention."""
    import SimpleITK as sitk

    def image(volume):
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume, dtype=np.float32).T))
        img.SetSpacing([float(s) for s in spacing])
        return img

    fixed_image, moving_image = image(fixed), image(moving)
    moving_image = sitk.HistogramMatching(moving_image, fixed_image, 256, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetStandardDeviations(smoothing_sigma)
    field = None
    levels = len(iterations)
    for level, count in enumerate(iterations):
        shrink = 2 ** (levels - 1 - level)
        fixed_level = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed_image, 0.5 * shrink * min(spacing)), [shrink] * 3) \
            if shrink > 1 else fixed_image
        moving_level = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving_image, 0.5 * shrink * min(spacing)), [shrink] * 3) \
            if shrink > 1 else moving_image
        if field is not None:
            field = sitk.Resample(field, fixed_level, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
        demons.SetNumberOfIterations(int(count))
        field = demons.Execute(fixed_level, moving_level) if field is None else demons.Execute(
            fixed_level, moving_level, field)
    field = sitk.Resample(field, fixed_image, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    return itk_field_to_ddf(sitk.GetArrayFromImage(field), spacing)


def convex_adam_available() -> bool:
    try:
        from convexAdam.convex_adam_MIND import convex_adam_pt  # noqa: F401

        return True
    except ImportError:
        return False


def convex_adam_field_to_ddf(field_xyz: np.ndarray) -> np.ndarray:
    """Convert ConvexAdam's displacement ``(X, Y, Z, 3)`` (voxels, channel ``j`` along array axis ``j``, backward)
    to the package DDF ``(3, X, Y, Z)`` float32 (module docstring)."""
    field_xyz = np.asarray(field_xyz)
    if field_xyz.ndim != 4 or field_xyz.shape[-1] != 3:
        raise ValueError(f"expected a ConvexAdam displacement array (X, Y, Z, 3), got shape {field_xyz.shape}.")
    return np.ascontiguousarray(np.moveaxis(field_xyz, -1, 0)).astype(np.float32)


def convex_adam_register(fixed: np.ndarray, moving: np.ndarray, device: str = "cpu", **options) -> np.ndarray:
    """Register ``moving`` to ``fixed`` (``(X, Y, Z)`` arrays, e.g. HU) with ConvexAdam's ``convex_adam_pt``
    (MIND-SSC features, coupled convex discrete search, Adam instance optimisation on a half-resolution grid);
    ``options`` go to ``convex_adam_pt`` (its defaults otherwise: ``grid_sp=6, disp_hw=4, selected_niter=80,
    lambda_weight=1.25, grid_sp_adam=2, ic=True``). float32 on CPU (its float16 default is GPU-only). Returns the
    DDF ``(3, X, Y, Z)`` in voxels, package convention."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    field = convex_adam_pt(torch.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32)),
                           torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32)),
                           dtype=dtype, device=device, **options)
    return convex_adam_field_to_ddf(field)
