"""The grid a trained network reads, when it differs from the grid a pair is registered on.

A model is trained on images resampled to its voxel size ``pixdim`` and centre padded/cropped to its
``spatial_size`` (``data.transforms.registration_transforms``; both recorded on its card). A pair may be registered
on a finer grid (e.g. the images' own, for the instance optimisation): :class:`NetworkGrid` brings the images onto
the model's grid the same way (a Gaussian anti-aliasing pre-filter along every coarsened axis,
:func:`~.spatial.antialias`, trilinear resampling to ``pixdim`` with corner voxels aligned, then the centred pad
or crop with zero = air; the simulator renders its training images on the coarse grid after the same pre-filter) and the network's DDF back (the inverse crop/pad, trilinear resampling, and each channel
``j`` rescaled from network voxels to registration voxels along axis ``j``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .spatial import antialias, resize_field

__all__ = ["NetworkGrid"]

logger = logging.getLogger("elastic_hypermorph_bundle")


class NetworkGrid:
    """The model's input grid: ``spatial_size`` voxels after resampling to ``pixdim`` mm (``None``: no resampling).

    Args:
        spatial_size: the network's input size per axis (the card's ``spatial_size``).
        pixdim: the voxel size (mm) images were resampled to in training, or ``None``.
        data_pixdim: without ``pixdim``, the voxel size (mm) of the training images themselves (the card's
            ``data_pixdim``), which images are resampled to instead: the network sees every image at the resolution
            it was trained at (a finer scan of the same anatomy is not reduced to its central crop). ``None``:
            images are read at their own voxel size.

    Raises:
        ValueError: when ``spatial_size``, ``pixdim`` or ``data_pixdim`` do not hold 3 positive values.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        pixdim: Sequence[float] | None = None,
        data_pixdim: Sequence[float] | None = None,
    ) -> None:
        if spatial_size is None or len(spatial_size) != 3 or min(spatial_size) < 1:
            raise ValueError(f"spatial_size must hold 3 positive sizes, got {spatial_size}.")
        for name, value in (("pixdim", pixdim), ("data_pixdim", data_pixdim)):
            if value is not None and (len(value) != 3 or min(value) <= 0):
                raise ValueError(f"{name} must hold 3 positive voxel sizes (mm) or be None, got {value}.")
        self.spatial_size = tuple(int(n) for n in spatial_size)
        self.pixdim = None if pixdim is None else tuple(float(p) for p in pixdim)
        self.data_pixdim = None if data_pixdim is None else tuple(float(p) for p in data_pixdim)
        #: the voxel size images are resampled to for the network (None: their own)
        self.target_pixdim = self.pixdim or self.data_pixdim
        self._warned: set = set()

    def resampled_shape(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, ...]:
        """The registration grid's shape after resampling to ``pixdim`` (before the pad/crop)."""
        if self.target_pixdim is None:
            return tuple(int(n) for n in shape)
        return tuple(max(2, int(round((n - 1) * s / p)) + 1) for n, s, p in zip(shape, spacing, self.target_pixdim))

    def matches(self, shape: Sequence[int], spacing: Sequence[float]) -> bool:
        """Whether a pair on this grid is already on the network's grid (nothing to convert)."""
        return tuple(shape) == self.spatial_size and self.resampled_shape(shape, spacing) == tuple(shape)

    def _pad_crop(self, tensor: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
        """Centred pad (zeros) or crop of the spatial axes to ``target``, as MONAI's ``ResizeWithPadOrCrop``."""
        for axis, (n, m) in enumerate(zip(tensor.shape[2:], target)):
            dim = axis + 2
            if m > n:
                before = (m - n) // 2
                pad = [0, 0] * (tensor.ndim - 2)
                pad[2 * (tensor.ndim - 1 - dim)] = before
                pad[2 * (tensor.ndim - 1 - dim) + 1] = m - n - before
                tensor = F.pad(tensor, pad)
            elif m < n:
                start = n // 2 - m // 2
                tensor = tensor.narrow(dim, start, m)
        return tensor

    def cropped(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, ...]:
        """Voxels per axis of the (resampled) registration grid that the centred crop to ``spatial_size`` removes:
        image content the network never sees (0 on every axis when the image fits)."""
        return tuple(max(0, r - m) for r, m in zip(self.resampled_shape(shape, spacing), self.spatial_size))

    def _warn_crop(self, shape: Sequence[int], spacing: Sequence[float]) -> None:
        """Say, once per image shape, what the network does not see: a model whose card has no ``pixdim`` reads
        images at their own voxel size, so an image larger than ``spatial_size`` (e.g. a finer scan of the same
        anatomy) reaches it as its central crop, and the field outside that crop is the crop's border value."""
        cropped = self.cropped(shape, spacing)
        key = (tuple(shape), tuple(float(s) for s in spacing))
        if max(cropped) <= 1 or key in self._warned:  # one voxel: the rounding of a resampled edge
            return
        self._warned.add(key)
        seen = "x".join(str(min(r, m)) for r, m in zip(self.resampled_shape(shape, spacing), self.spatial_size))
        if self.target_pixdim is None:
            why = (
                "the model card's pixdim is null and it records no data_pixdim, so images are not resampled; "
                "register images with the voxel size of the training data, or train with --pixdim so that any "
                "voxel size is resampled to it"
            )
        else:
            why = f"at the trained {list(self.target_pixdim)} mm voxels the image is larger than the trained spatial_size"
        logger.warning(
            "the network sees only the central %s voxels of this %s image (%s voxels cropped along x, y, z; its "
            "field there repeats the border values, the instance optimisation refines it): %s.",
            seen, "x".join(str(n) for n in shape), ", ".join(str(c) for c in cropped), why,
        )

    def to_network(self, images: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
        """Images ``(B, C, *shape)`` on the registration grid (voxel size ``spacing``) on the network's grid; a
        crop is named in a warning (:meth:`cropped`). Downsampling is anti-aliased: without the pre-filter, vessels
        and noise finer than the network's voxels alias into it, unlike anything the network was trained on."""
        self._warn_crop(images.shape[2:], spacing)
        resampled = self.resampled_shape(images.shape[2:], spacing)
        if resampled != tuple(images.shape[2:]):
            # the voxel size actually reached (the resampled grid's corners stay the registration grid's)
            target = [(n - 1) * s / max(1, r - 1) for n, s, r in zip(images.shape[2:], spacing, resampled)]
            images = antialias(images, spacing, target)
            images = F.interpolate(images, size=resampled, mode="trilinear", align_corners=True)
        return self._pad_crop(images, self.spatial_size)

    def from_network(self, ddf: torch.Tensor, shape: Sequence[int], spacing: Sequence[float]) -> torch.Tensor:
        """A DDF ``(B, 3, *spatial_size)`` in network voxels as a DDF ``(B, 3, *shape)`` in registration voxels."""
        resampled = self.resampled_shape(shape, spacing)
        # the inverse of the pad/crop: crop what was padded, pad (border values) what was cropped
        ddf = self._unpad_uncrop(ddf, resampled)
        return resize_field(ddf, shape)

    def _unpad_uncrop(self, ddf: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
        for axis, (m, n) in enumerate(zip(self.spatial_size, target)):
            dim = axis + 2
            if m > n:  # padded by (m - n) // 2 before: take the image's part back
                ddf = ddf.narrow(dim, (m - n) // 2, n)
            elif m < n:  # cropped from n // 2 - m // 2: extend with the edge values
                before = n // 2 - m // 2
                pad = [0, 0] * 3
                pad[2 * (2 - axis)] = before
                pad[2 * (2 - axis) + 1] = n - m - before
                ddf = F.pad(ddf, pad, mode="replicate")
        return ddf
