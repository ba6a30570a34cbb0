"""The networks under test: the hyper-conditioned networks of the bundle and their plain twins, plus one training
step and one inference as zero-argument callables for the timers.

The plain twin of a hyper network is the same module with every :class:`HyperConv` replaced by an ordinary
convolution of the same shape (``nn.Conv3d``, PyTorch default initialisation) and without the hypernetwork:
same layer layout, activations, pooling, upsampling, skip connections and flow head, so the difference in cost is
the hyper-conditioning alone (hypernetwork pass, per-layer weight generation, per-sample grouped convolution).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from monai.networks.layers import Conv
from torch import nn

from elastic_hypermorph_bundle import networks
from elastic_hypermorph_bundle.forward import network_input, training_terms
from elastic_hypermorph_bundle.losses import RegistrationLoss
from elastic_hypermorph_bundle.networks.hyper import HyperConv, HyperRegistrationNet

__all__ = ["NETWORK_NAMES", "PlainConv", "PlainTwin", "build_network", "count_parameters", "training_step", "inference"]

NETWORK_NAMES = ("HyperUNet", "HyperLocalNet")


class PlainConv(nn.Module):
    """Ordinary convolution with the kernel shape of a :class:`HyperConv`; ignores the generated ``weights``."""

    def __init__(self, like: HyperConv):
        super().__init__()
        out_channels, in_channels, *kernel = like.kernel_shape
        self.conv = Conv[Conv.CONV, len(kernel)](in_channels, out_channels, kernel, padding=[k // 2 for k in kernel])

    def forward(self, x: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        return self.conv(x)


def _swap_hyper_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, HyperConv):
            setattr(module, name, PlainConv(child))
        else:
            _swap_hyper_convs(child)


class PlainTwin(nn.Module):
    """Non-hyper twin of a :class:`HyperRegistrationNet`: ``forward(x, hyper=None)`` ignores ``hyper`` and runs the
    backbone (``predict_field``) with plain convolutions, then the same integration as the original."""

    def __init__(self, hyper_net: HyperRegistrationNet):
        super().__init__()
        backbone = copy.deepcopy(hyper_net)
        _swap_hyper_convs(backbone)
        del backbone.hypernetwork
        self.backbone = backbone

    def forward(self, x: torch.Tensor, hyper: torch.Tensor | None = None, return_velocity: bool = False):
        field = self.backbone.predict_field(x, {})
        ddf = field if self.backbone.integrate is None else self.backbone.integrate(field)
        return (ddf, field) if return_velocity else ddf


def build_network(name: str, variant: str, hyper_dims: int = 2, spatial_dims: int = 3, **kwargs) -> nn.Module:
    """``name`` from :data:`NETWORK_NAMES` with default architecture; ``variant`` ``"hyper"`` or ``"plain"``."""
    if name not in NETWORK_NAMES or not hasattr(networks, name):
        raise ValueError(f"network must be one of {NETWORK_NAMES} (and provided by the package), got {name!r}.")
    if variant not in ("hyper", "plain"):
        raise ValueError(f"variant must be 'hyper' or 'plain', got {variant!r}.")
    if variant == "plain":
        # the twin's layout does not depend on the hypernetwork's width; a 1-wide one keeps the transient
        # hyper model tiny, so it does not inflate the twin's measured peak memory
        kwargs = {**kwargs, "hyper_hidden": 1, "hyper_layers": 1}
    net = getattr(networks, name)(spatial_dims=spatial_dims, in_channels=2, hyper_dims=hyper_dims, **kwargs)
    return net if variant == "hyper" else PlainTwin(net)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def random_pair(batch: int, spatial_size: Sequence[int], device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random moving/fixed images ``(B, 1, *spatial)`` (content does not affect the timings)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2 * batch, 1, *[max(2, s // 8) for s in spatial_size], generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=tuple(spatial_size), mode="trilinear", align_corners=False)
    return images[:batch].to(device), images[batch:].to(device)


def training_step(net: nn.Module, batch: int, spatial_size: Sequence[int], device, per_sample_hyper: bool = True,
                  ) -> Callable[[], float]:
    """One training step as a callable: forward, warp, elastic registration loss, backward, Adam update.

    Hyper networks get one ``[lam, mu]`` row per sample (as in HyperMorph training); the plain twin gets the same
    loss with the same rows, so both steps differ only in the network.
    """
    moving, fixed = random_pair(batch, spatial_size, device)
    rows = batch if per_sample_hyper else 1
    hyper = torch.rand(rows, 2, generator=torch.Generator().manual_seed(1)).to(device)
    loss_fn = RegistrationLoss(regularizer="elastic")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    net.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = training_terms(net, loss_fn, moving, fixed, hyper)["loss"]  # the bundle's step: forward, warp, loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def inference(net: nn.Module, batch: int, spatial_size: Sequence[int], device) -> Callable[[], torch.Tensor]:
    """One inference as a callable: ``net(x, hyper)`` under ``torch.inference_mode`` with one ``[lam, mu]`` row
    shared by the batch (the inference use: one hyperparameter value per run)."""
    moving, fixed = random_pair(batch, spatial_size, device)
    x = network_input(moving, fixed)
    hyper = torch.tensor([[0.5, 0.5]], device=device)
    net.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return net(x, hyper)

    return run
