"""Hypernetwork building blocks (HyperMorph, Hoopes et al., IPMI 2021 / MELBA 2022).

A hypernetwork maps the regularization hyperparameters ``hyper`` (``(B, H)``: ``[lam, mu]`` or ``[alpha]``) to an
embedding ``e`` (``(B, E)``); every convolution of the registration network then takes its kernel and bias from a
per-layer linear map of ``e``. Each sample of a batch may carry its own hyperparameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF
from monai.networks.layers import Conv
from torch import nn

__all__ = [
    "hyper_conv", "flow_head", "HyperNetwork", "HyperConv", "ConditionalInstanceNormConv", "HyperRegistrationNet",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# basis kernels per layer of the networks' rank-limited kernel map (see HyperConv); None would be HyperMorph's full map
DEFAULT_HYPER_RANK = 4


def hyper_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Convolve with a kernel shared by the batch or with one kernel per sample ("same" padding, stride 1).

    Args:
        x: input ``(B, C_in, *spatial)``.
        weight: odd-sized kernel ``(C_out, C_in, *kernel)`` shared by the batch, or per-sample kernels
            ``(B, C_out, C_in, *kernel)``.
        bias: ``(C_out,)`` or ``(B, C_out)`` accordingly.

    Returns:
        ``(B, C_out, *spatial)``. A shared kernel is one ordinary convolution. Per-sample kernels fold the batch into
        the channels, ``(1, B * C_in, *spatial)``, and convolve with ``groups=B``, which applies sample ``b``'s
        kernel to sample ``b`` only, in a single call. (The two cases are told apart by ``weight.ndim``, which stays
        a Python int under ``torch.jit.trace``.)
    """
    conv = _CONV[x.ndim - 2]
    per_sample = weight.ndim == x.ndim + 1
    padding = [k // 2 for k in weight.shape[-(x.ndim - 2):]]
    if not torch.jit.is_tracing():  # traced shape comparisons only emit TracerWarnings; eager calls validate
        kernel_in = weight.shape[2 if per_sample else 1]
        if kernel_in != x.shape[1]:
            raise ValueError(f"x has {x.shape[1]} channels but the kernel expects {kernel_in}.")
        if per_sample and weight.shape[0] != x.shape[0]:
            raise ValueError(f"got per-sample kernels for batch {weight.shape[0]}, but x has batch {x.shape[0]}.")
    if not per_sample:
        return conv(x, weight, bias, padding=padding)
    batch, in_channels = x.shape[:2]
    out_channels = weight.shape[1]
    out = conv(
        x.reshape(1, batch * in_channels, *x.shape[2:]),
        weight.reshape(batch * out_channels, in_channels, *weight.shape[3:]),
        bias.reshape(batch * out_channels),
        padding=padding,
        groups=batch,
    )
    return out.reshape(batch, out_channels, *out.shape[2:])


def flow_head(spatial_dims: int, in_channels: int) -> nn.Module:
    """Plain 3x3(x3) convolution to ``spatial_dims`` channels with weights ~ N(0, 1e-5^2) and zero bias
    (VoxelMorph's flow layer), so an untrained network predicts a near-identity transform."""
    head = Conv[Conv.CONV, spatial_dims](in_channels, spatial_dims, kernel_size=3, padding=1)
    nn.init.normal_(head.weight, 0.0, 1e-5)
    nn.init.zeros_(head.bias)
    return head


class HyperNetwork(nn.Module):
    """MLP from hyperparameters ``(B, hyper_dims)`` to an embedding ``(B, hidden)``: ``num_layers`` dense layers,
    each followed by ReLU (HyperMorph's hypernetwork).

    Dense layers use He (fan-in, ReLU) initialisation and zero bias, so the embedding keeps the mean square of the
    input instead of shrinking layer by layer (PyTorch's default ``nn.Linear`` init divides the mean square by ~6 per
    layer, leaving a tiny, nearly hyperparameter-independent embedding after 6 layers).
    """

    def __init__(self, hyper_dims: int, hidden: int = 128, num_layers: int = 6):
        super().__init__()
        if hyper_dims < 1 or hidden < 1 or num_layers < 1:
            raise ValueError(
                f"hyper_dims, hidden and num_layers must be >= 1, got {hyper_dims}, {hidden}, {num_layers}."
            )
        layers: list[nn.Module] = []
        for i in range(num_layers):
            dense = nn.Linear(hyper_dims if i == 0 else hidden, hidden)
            nn.init.kaiming_normal_(dense.weight, nonlinearity="relu")
            nn.init.zeros_(dense.bias)
            layers += [dense, nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.hyper_dims = hyper_dims
        self.hidden = hidden

    def forward(self, hyper: torch.Tensor) -> torch.Tensor:
        return self.layers(hyper)


def _he_std(in_channels: int, kernel_size: int, spatial_dims: int) -> float:
    """He-normal std for LeakyReLU(0.2) at fan-in ``in_channels * kernel_size ** spatial_dims``."""
    return math.sqrt(2.0 / (1.0 + 0.2**2)) / math.sqrt(in_channels * kernel_size**spatial_dims)


class _ConditionedConv(nn.Module):
    """What the layers a hypernetwork conditions share: the checked layout (``spatial_dims`` 1, 2 or 3, an odd
    ``kernel_size`` for "same" padding, a ``rank`` of ``None``, 0 or a positive int), the kernel shape
    ``(C_out, C_in, *kernel)`` and the embedding gain ``g = 1 / E``; each layer makes its parameters in
    :meth:`_build`, at its He-normal std for LeakyReLU(0.2)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        embedding_dims: int,
        kernel_size: int = 3,
        hyper_init_scale: float = 0.1,
        rank: int | None = None,
    ):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}.")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be None, 0 (full map) or a positive int, got {rank!r}.")
        self.kernel_shape = (out_channels, in_channels) + (kernel_size,) * spatial_dims
        self.embedding_gain = 1.0 / embedding_dims
        self._build(embedding_dims, hyper_init_scale, _he_std(in_channels, kernel_size, spatial_dims), rank or None)

    def _build(self, embedding_dims: int, hyper_init_scale: float, he_std: float, rank: int | None) -> None:
        raise NotImplementedError


class HyperConv(_ConditionedConv):
    """Convolution whose kernel and bias are a linear function of the hypernetwork embedding ``e`` (``(B, E)``), one
    ``(K, b)`` per sample, ``p = [vec(K), b]`` with ``N = C_out C_in k^D + C_out`` entries. Two maps:

    * full (``rank=None`` or ``0``, HyperMorph's map): ``p = c + g A e``, ``A`` of shape ``(N, E)``,
      ``g = 1 / E``; ``N (E + 1)`` parameters;
    * rank-limited (``rank = R >= 1``): ``p = c + h U (g V e)``, a base ``c`` plus a combination of ``R`` learned
      basis kernels (the columns of ``U``, ``(N, R)``) whose coefficients ``g V e`` are a linear map of the
      embedding (``V``: ``(R, E)``), ``h = 1 / R``; ``N (R + 1) + R E`` parameters. Every generated kernel lies in
      the ``R``-dimensional affine family ``c + span(U)``; the layer then costs about ``R + 1`` plain convolutions'
      parameters instead of ``E + 1``.

    Parametrisation (an equalised learning rate for the hyperparameter-dependent part): Adam moves every entry of a
    parameter by about the learning rate per step, whatever the gradient's scale, and those moves add up coherently
    over a sum. The constant gains keep the generated kernels moving about as fast as an ordinary convolution kernel
    (``c``): with ``e >= 0``, a full map's first step moves ``p_i`` by ``lr (1 + g sum_k e_k)``, about ``lr`` (without
    ``g``, ``~E`` times faster: ~10% of the kernel scale per step at ``E = 128`` and lr ``1e-4``, and training
    diverges); a rank-limited map moves ``p_i`` by ``lr (1 + h sum_r |z_r|)`` from ``c`` and ``U``, with
    ``z = g V e``, plus a term ``h sum_r U_ir dz_r`` that is small because ``U`` is (``|dz_r| <= lr mean(e)``).

    Initialisation (so that an untrained model behaves like a normally initialised CNN):
    ``c``'s kernel part is He-normal for LeakyReLU(0.2), std ``s_He = g_He / sqrt(C_in k^D)`` with
    ``g_He = sqrt(2 / (1 + 0.2^2))``, and its bias part is zero. Full map: ``A`` is normal with std
    ``hyper_init_scale * s_He * sqrt(E)``. Rank-limited: ``V`` is normal with std ``sqrt(E)`` (coefficients of unit
    variance for an embedding of unit mean square) and ``U`` normal with std ``hyper_init_scale * s_He * sqrt(R)``.
    Either way the hyperparameter-dependent part starts at ``hyper_init_scale`` (10%) of the He kernel scale: the
    generated kernels start at conv scale, differ between hyperparameters, and gradients reach the hypernetwork
    from the first step (a zero map would block them).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels, out_channels: channel counts.
        embedding_dims: ``E``, the hypernetwork's output size.
        kernel_size: odd kernel size ("same" padding).
        hyper_init_scale: relative scale of the hyperparameter-dependent part at initialisation.
        rank: ``R``, the number of basis kernels of a rank-limited map; ``None`` or ``0`` for the full map.
    """

    def _build(self, embedding_dims: int, hyper_init_scale: float, he_std: float, rank: int | None) -> None:
        self.rank = rank
        kernel_numel = math.prod(self.kernel_shape)
        numel = kernel_numel + self.kernel_shape[0]
        if self.rank is None:
            self.embedding_weight = nn.Parameter(
                torch.randn(numel, embedding_dims) * (hyper_init_scale * he_std * embedding_dims**0.5)
            )
        else:
            self.basis_gain = 1.0 / self.rank
            self.coefficient_weight = nn.Parameter(torch.randn(self.rank, embedding_dims) * embedding_dims**0.5)
            self.basis = nn.Parameter(torch.randn(numel, self.rank) * (hyper_init_scale * he_std * self.rank**0.5))
        base = torch.zeros(numel)
        base[:kernel_numel].normal_(0.0, he_std)
        self.base = nn.Parameter(base)

    def coefficients(self, embedding: torch.Tensor) -> torch.Tensor:
        """The basis coefficients ``z = g V e`` ``(B, R)`` of a rank-limited map."""
        if self.rank is None:
            raise ValueError("coefficients exist only for a rank-limited map (rank >= 1); this layer has the full map.")
        return F.linear(embedding * self.embedding_gain, self.coefficient_weight)

    def generate(self, embedding: torch.Tensor, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernels ``(B, C_out, C_in, *kernel)`` and biases ``(B, C_out)`` from embeddings ``(B, E)``; with
        ``shared=True`` (``B == 1``) the batch axis is dropped, giving one kernel for the whole batch."""
        if self.rank is None:
            params = F.linear(embedding * self.embedding_gain, self.embedding_weight, self.base)
        else:
            params = F.linear(self.coefficients(embedding) * self.basis_gain, self.basis, self.base)
        kernel_numel = params.shape[1] - self.kernel_shape[0]
        weight = params[:, :kernel_numel].reshape(params.shape[0], *self.kernel_shape)
        bias = params[:, kernel_numel:]
        return (weight[0], bias[0]) if shared else (weight, bias)

    def forward(self, x: torch.Tensor, weights: dict) -> torch.Tensor:
        """Apply this layer's entry of ``weights`` (from :meth:`HyperRegistrationNet.generate_weights`) to ``x``."""
        weight, bias = weights[self]
        return hyper_conv(x, weight, bias)


class ConditionalInstanceNormConv(_ConditionedConv):
    """Ordinary convolution followed by conditional instance normalisation (CIN, as in conditional LapIRN, Mok &
    Chung, MICCAI 2021): ``y = IN(conv(x)) (1 + g Γ e) + g Β e``, the per-channel scale and shift (``(B, C_out)``)
    linear maps of the hypernetwork embedding ``e`` (``Γ, Β``: ``(C_out, E)``, gain ``g = 1 / E`` as in
    :class:`HyperConv`), instance norm without affine parameters (per sample and channel, so rows with different
    hyperparameters do not mix). A cheaper alternative to generated kernels: the kernel is shared by every
    hyperparameter value, only ``2 C_out`` numbers per layer depend on it; ``C_out C_in k^D + 2 C_out E`` parameters.

    Same interface as :class:`HyperConv` (``generate``, ``forward(x, weights)``). Init: He-normal kernel (LeakyReLU
    0.2) and no conv bias (the norm removes it), ``Γ, Β`` normal with std ``hyper_init_scale * sqrt(E)`` (a 10% hyperparameter-dependent scale
    and shift for an embedding of unit mean square). Arguments as :class:`HyperConv`'s, without a rank (the
    kernel is not generated).
    """

    def _build(self, embedding_dims: int, hyper_init_scale: float, he_std: float, rank: int | None) -> None:
        if rank is not None:
            raise ValueError(f"rank applies to generated kernels only, not to conditional instance norm, got {rank}.")
        self.weight = nn.Parameter(torch.randn(self.kernel_shape) * he_std)
        self.embedding_weight = nn.Parameter(
            torch.randn(2 * self.kernel_shape[0], embedding_dims) * (hyper_init_scale * embedding_dims**0.5)
        )

    def generate(self, embedding: torch.Tensor, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales ``1 + g Γ e`` and shifts ``g Β e``, ``(B, C_out)`` each (``(C_out,)`` with ``shared=True``)."""
        scale, shift = F.linear(embedding * self.embedding_gain, self.embedding_weight).chunk(2, dim=1)
        scale = scale + 1.0
        return (scale[0], shift[0]) if shared else (scale, shift)

    def forward(self, x: torch.Tensor, weights: dict) -> torch.Tensor:
        scale, shift = weights[self]
        y = F.instance_norm(hyper_conv(x, self.weight, None))  # no conv bias: the norm would remove it
        shape = (-1, y.shape[1]) + (1,) * (y.ndim - 2)  # (B or 1, C_out, 1, ...)
        return y * scale.reshape(shape) + shift.reshape(shape)


_CONDITIONED = (HyperConv, ConditionalInstanceNormConv)
CONDITIONINGS = ("kernel", "instance_norm")


class HyperRegistrationNet(nn.Module):
    """Shared part of the hyper-conditioned registration networks: hypernetwork, hyperparameter validation,
    weight generation, optional scaling-and-squaring integration. Subclasses build their backbone from
    :meth:`conditioned_conv` layers, set ``self.size_divisor`` and implement :meth:`predict_field`. Arguments are
    keyword-only.

    Conditioning (arguments shared by the subclasses):

    * ``hyper_rank``: ``R`` basis kernels per layer (:class:`HyperConv` rank-limited map), ``None`` or ``0`` for
      HyperMorph's full map from the embedding to every kernel entry.
    * ``conditioning``: ``"kernel"`` (generated kernels, the method) or ``"instance_norm"`` (shared kernels with
      hyperparameter-dependent instance-norm scale and shift, :class:`ConditionalInstanceNormConv`; a cheaper
      alternative, in conditional LapIRN's style).

    ``forward(x, hyper=None, weights=None, return_velocity=False)``:

    * ``x``: ``cat([moving, fixed], dim=1)``, ``(B, in_channels, *spatial)``, every spatial size divisible by
      ``size_divisor``.
    * ``hyper``: ``(B, hyper_dims)`` (one row per sample) or ``(1, hyper_dims)`` (shared by the batch; one ordinary
      convolution per layer). ``None`` uses ``default_hyper``, giving the single tensor in/out form needed by
      ``torch.jit.trace`` and MONAI's ``verify_net_in_out``. The hypernetwork sees ``hyper / hyper_scale``.
    * ``weights``: the result of :meth:`generate_weights`, reused instead of ``hyper`` (sweeps: one hypernetwork pass
      per hyperparameter value for any number of images).
    * Returns the DDF ``(B, spatial_dims, *spatial)`` in voxels (see the package conventions). With
      ``return_velocity=True`` returns ``(ddf, field)`` where ``field`` is the raw head output: the stationary velocity
      field in diffeomorphic mode (``ddf`` is its scaling-and-squaring integral, MONAI ``DVF2DDF``), and the DDF
      itself (the same tensor) otherwise, so training code can regularize "the predicted field" uniformly.

    Args:
        spatial_dims, in_channels: 2 or 3; channels of ``x`` (2: moving, fixed).
        hyper_dims: number of hyperparameters (2 for ``[lam, mu]``, 1 for ``[alpha]``).
        hyper_hidden, hyper_layers: width and depth of the :class:`HyperNetwork`.
        hyper_rank: basis kernels per layer of the rank-limited kernel map (:class:`HyperConv`); ``None`` or ``0``
            for HyperMorph's full map.
        conditioning: ``"kernel"`` (generated kernels) or ``"instance_norm"`` (conditional instance norm, see
            :class:`ConditionalInstanceNormConv`).
        diffeomorphic: predict a stationary velocity field, integrated by scaling and squaring.
        integration_steps: scaling-and-squaring steps.
        default_hyper: hyperparameters used when ``hyper`` is None; default ``0.5 * hyper_scale``. Not saved in
            the state dict (it is the configuration's inference default).
        hyper_scale: the upper ends of the trained hyperparameter ranges (one positive value per dimension; default
            1): the hypernetwork sees ``hyper / hyper_scale``, in [0, 1] on the trained ranges, so its embedding and
            the generated kernels keep their scale whatever the units of ``hyper``. Saved in the state dict (the
            weights were trained for it); checkpoints without it load with 1.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        hyper_dims: int,
        hyper_hidden: int = 128,
        hyper_layers: int = 6,
        hyper_rank: int | None = None,
        conditioning: str = "kernel",
        diffeomorphic: bool = False,
        integration_steps: int = 7,
        default_hyper: Sequence[float] | torch.Tensor | None = None,
        hyper_scale: Sequence[float] | torch.Tensor | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}.")
        if hyper_rank is not None and (isinstance(hyper_rank, bool) or not isinstance(hyper_rank, int) or hyper_rank < 0):
            raise ValueError(f"hyper_rank must be None, 0 (full map) or a positive int, got {hyper_rank!r}.")
        if conditioning == "instance_norm" and hyper_rank:
            raise ValueError("hyper_rank applies to generated kernels (conditioning='kernel'), not to 'instance_norm'.")
        self.hyper_rank = hyper_rank or None
        self.conditioning = conditioning
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.hyper_dims = hyper_dims
        self.size_divisor = 1
        self.hypernetwork = HyperNetwork(hyper_dims, hyper_hidden, hyper_layers)
        self.integrate = DVF2DDF(num_steps=integration_steps) if diffeomorphic else None
        scale = torch.ones(hyper_dims) if hyper_scale is None else torch.as_tensor(hyper_scale, dtype=torch.float)
        if scale.numel() != hyper_dims or not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"hyper_scale must hold {hyper_dims} finite positive values, got {scale.tolist()}.")
        # saved with the weights: they were trained on hyper / hyper_scale, so it is part of the learned function
        self.register_buffer("hyper_scale", scale.reshape(1, hyper_dims))
        # the middle of [0, hyper_scale] per dimension; pass the training range's midpoint for other ranges
        default = 0.5 * self.hyper_scale if default_hyper is None else torch.as_tensor(default_hyper).float()
        default = self._check_hyper(default.reshape(1, -1), batch=1)
        # not saved with the weights: it is the configuration's inference default, not a trained property
        self.register_buffer("default_hyper", default, persistent=False)

    def conditioned_conv(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
        """The backbone's hyper-conditioned convolution: a :class:`HyperConv` with this network's ``hyper_rank``, or a
        :class:`ConditionalInstanceNormConv` for ``conditioning="instance_norm"``."""
        if self.conditioning == "instance_norm":
            return ConditionalInstanceNormConv(
                self.spatial_dims, in_channels, out_channels, self.hypernetwork.hidden, kernel_size
            )
        return HyperConv(
            self.spatial_dims, in_channels, out_channels, self.hypernetwork.hidden, kernel_size, rank=self.hyper_rank
        )

    @property
    def diffeomorphic(self) -> bool:
        return self.integrate is not None

    def _check_hyper(self, hyper: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        if not isinstance(hyper, torch.Tensor):
            raise ValueError(f"hyper must be a tensor of shape (B, {self.hyper_dims}), got {type(hyper).__name__}.")
        if hyper.ndim != 2 or hyper.shape[1] != self.hyper_dims:
            raise ValueError(f"hyper must have shape (B, {self.hyper_dims}), got {tuple(hyper.shape)}.")
        if batch is not None and hyper.shape[0] not in (1, batch):
            raise ValueError(
                f"hyper has batch {hyper.shape[0]}, x has batch {batch}: hyper batch must be 1 or {batch}."
            )
        if hyper.device.type == "cpu" and not torch.isfinite(hyper).all():  # on a GPU: a sync per call
            raise ValueError(f"hyper must be finite, got {hyper.tolist()}.")
        return hyper

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, *{self.spatial_dims} spatial sizes) (moving and fixed "
                f"stacked as channels), got {tuple(x.shape)}."
            )
        bad = [int(s) for s in x.shape[2:] if s % self.size_divisor]
        if bad:
            raise ValueError(
                f"spatial size {tuple(int(s) for s in x.shape[2:])} must be divisible by {self.size_divisor} "
                f"(2 ** number of poolings); {bad} is not."
            )

    def _generate(self, hyper: torch.Tensor, shared: bool) -> dict:
        embedding = self.hypernetwork(hyper.to(self.hyper_scale) / self.hyper_scale)
        return {layer: layer.generate(embedding, shared) for layer in self.modules() if isinstance(layer, _CONDITIONED)}

    def generate_weights(self, hyper: torch.Tensor) -> dict:
        """Run the hypernetwork and every layer's linear map once for ``hyper`` ``(B, hyper_dims)``; the returned
        (opaque) structure is passed back as ``net(x, weights=...)``. Valid only for this module instance."""
        return self._generate(self._check_hyper(hyper), shared=hyper.shape[0] == 1)

    def predict_field(self, x: torch.Tensor, weights: dict) -> torch.Tensor:
        """Backbone and head: ``(B, in_channels, *spatial)`` -> ``(B, spatial_dims, *spatial)``."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        hyper: torch.Tensor | None = None,
        weights: dict | None = None,
        return_velocity: bool = False,
    ):
        if not torch.jit.is_tracing():  # traced shape comparisons only emit TracerWarnings; eager calls validate
            self._check_input(x)
        if weights is not None:
            if hyper is not None:
                raise ValueError("pass either hyper or weights (from generate_weights), not both.")
        elif hyper is None:
            weights = self._generate(self.default_hyper, shared=True)  # validated at construction
        else:
            weights = self._generate(self._check_hyper(hyper, batch=x.shape[0]), shared=hyper.shape[0] == 1)
        field = self.predict_field(x, weights)
        ddf = field if self.integrate is None else self.integrate(field)
        return (ddf, field) if return_velocity else ddf
