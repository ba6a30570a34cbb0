"""Hyper-conditioned registration networks (HyperMorph) and warping helpers."""

from .hyper import (
    ConditionalInstanceNormConv,
    HyperConv,
    HyperNetwork,
    HyperRegistrationNet,
    flow_head,
    hyper_conv,
)
from .localnet import HyperLocalNet
from .unet import HyperUNet
from .warp import warp_cuts, warp_image, warp_label

__all__ = [
    "ConditionalInstanceNormConv",
    "HyperConv",
    "HyperLocalNet",
    "HyperNetwork",
    "HyperRegistrationNet",
    "HyperUNet",
    "flow_head",
    "hyper_conv",
    "warp_cuts",
    "warp_image",
    "warp_label",
]
