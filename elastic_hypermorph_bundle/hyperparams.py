"""The hyperparameters a model is conditioned on: their names, trained ranges, training-time sampling and checks.

One :class:`HyperSpace` describes the conditioning of one trained model:

* ``regularizer="elastic"``: rows ``[lam, mu]`` (Lamé parameters of the linear elastic regularizer),
* ``regularizer="diffusion"`` or ``"elastic_fixed"``: rows ``[alpha]`` (weight of the regularizer),

the columns of the regularizer's row in the table :data:`~elastic_hypermorph_bundle.losses.regularizers.REGULARIZERS`.

Training draws one row per sample (:meth:`HyperSpace.sample`); inference, evaluation and sweeps ask for a row
(:meth:`HyperSpace.point`) or a grid of rows (:meth:`HyperSpace.grid`), which refuse values outside the trained
ranges unless extrapolation is explicitly allowed: a hypernetwork has seen nothing there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from .losses.regularizers import REGULARIZERS, get_regularizer

__all__ = ["HyperSpace", "REGULARIZERS", "SAMPLINGS"]

logger = logging.getLogger("elastic_hypermorph_bundle")

SAMPLINGS = ("uniform", "log_uniform", "endpoints")


def _as_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair [low, high] of numbers, got {value!r}.") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high <= low:
        raise ValueError(f"{name} must satisfy 0 <= low < high (finite), got [{low}, {high}].")
    return low, high


class HyperSpace:
    """Names, trained ranges and sampling of the hyperparameters one model is conditioned on.

    Args:
        regularizer: a name of the regularizer table: ``"elastic"`` (rows ``[lam, mu]``), ``"diffusion"`` or
            ``"elastic_fixed"`` (rows ``[alpha]``).
        lam_range, mu_range: trained ranges of the Lamé parameters (elastic).
        alpha_range: trained range of the regularization weight (diffusion, elastic_fixed).
        ranges: trained ranges of other hyperparameter names a regularizer of the table may have, by name
            (``lam``, ``mu`` and ``alpha`` take theirs from the arguments above); a name not given is ``[0, 1]``.
        sampling: how training draws each sample's row, independently per dimension:
            ``"uniform"``; ``"log_uniform"`` (uniform in log space between ``max(low, log_floor)`` and ``high``,
            which favours weak regularization); ``"endpoints"`` (HyperMorph's oversampling: with probability
            ``endpoint_prob`` a dimension takes its low or high end, otherwise uniform).
        endpoint_prob: probability of an endpoint draw in ``"endpoints"`` sampling.
        log_floor: lower bound used instead of 0 by ``"log_uniform"`` sampling.
    """

    def __init__(
        self,
        regularizer: str = "elastic",
        lam_range: Sequence[float] = (0.0, 1.0),
        mu_range: Sequence[float] = (0.0, 1.0),
        alpha_range: Sequence[float] = (0.0, 1.0),
        sampling: str = "uniform",
        endpoint_prob: float = 0.2,
        log_floor: float = 1e-4,
        ranges: dict[str, Sequence[float]] | None = None,
    ) -> None:
        row = get_regularizer(regularizer)
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}.")
        if not 0.0 <= endpoint_prob <= 1.0:
            raise ValueError(f"endpoint_prob must be in [0, 1], got {endpoint_prob}.")
        if log_floor <= 0:
            raise ValueError(f"log_floor must be > 0, got {log_floor}.")
        self.regularizer = regularizer
        given = {**(ranges or {}), "lam": lam_range, "mu": mu_range, "alpha": alpha_range}
        self.names: tuple[str, ...] = row.names
        self.ranges = tuple(_as_range(f"{name}_range", given.get(name, (0.0, 1.0))) for name in row.names)
        self.sampling = sampling
        self.endpoint_prob = float(endpoint_prob)
        self.log_floor = float(log_floor)

    @property
    def dims(self) -> int:
        """Number of hyperparameters (columns of a hyper row)."""
        return len(self.names)

    @property
    def low(self) -> torch.Tensor:
        return torch.tensor([r[0] for r in self.ranges])

    @property
    def high(self) -> torch.Tensor:
        return torch.tensor([r[1] for r in self.ranges])

    def to_dict(self) -> dict:
        """JSON-serialisable description (stored next to trained weights)."""
        return {"regularizer": self.regularizer, "names": list(self.names), "ranges": [list(r) for r in self.ranges]}

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Draw ``(batch_size, dims)`` rows, one per sample, according to ``sampling``."""
        u = torch.rand(batch_size, self.dims, generator=generator)
        low, high = self.low, self.high
        if self.sampling == "log_uniform":
            log_low = torch.log(torch.clamp(low, min=self.log_floor))
            rows = torch.exp(log_low + u * (torch.log(high) - log_low))
        else:
            rows = low + u * (high - low)
            if self.sampling == "endpoints":
                pick = torch.rand(batch_size, self.dims, generator=generator)
                at_end = pick < self.endpoint_prob
                ends = torch.where(pick < self.endpoint_prob / 2, low.expand_as(rows), high.expand_as(rows))
                rows = torch.where(at_end, ends, rows)
        return rows.to(device=device, dtype=torch.float32)

    def check(self, rows: torch.Tensor, allow_extrapolation: bool = False, trained: bool = True) -> torch.Tensor:
        """Validate ``(N, dims)`` rows: finite, non-negative and (``trained``: rows a trained network will read)
        inside the trained ranges, else raise (or warn, if ``allow_extrapolation``)."""
        rows = torch.as_tensor(rows, dtype=torch.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dims:
            raise ValueError(f"hyperparameter rows must have shape (N, {self.dims}) for {self.names}, got {tuple(rows.shape)}.")
        if not torch.isfinite(rows).all():
            raise ValueError(f"hyperparameters {self.names} must be finite, got {rows.tolist()}.")
        if (rows < 0).any():
            raise ValueError(f"hyperparameters {self.names} must be >= 0, got {rows.tolist()}.")
        outside = (rows < self.low) | (rows > self.high)
        if trained and outside.any():
            bad = sorted({self.names[j] for j in outside.nonzero()[:, 1].tolist()})
            ranges = ", ".join(f"{n} in [{lo:g}, {hi:g}]" for n, (lo, hi) in zip(self.names, self.ranges))
            message = (
                f"hyperparameter(s) {', '.join(bad)} outside the trained range ({ranges}); "
                "the hypernetwork never saw such values"
            )
            if not allow_extrapolation:
                raise ValueError(message + ". Pass --allow_extrapolation true to use them anyway.")
            logger.warning(message + "; extrapolating as requested.")
        return rows

    def point(
        self,
        lam: float | None = None,
        mu: float | None = None,
        alpha: float | None = None,
        allow_extrapolation: bool = False,
        trained: bool = True,
        **others: float | None,
    ) -> torch.Tensor:
        """One ``(1, dims)`` row from named values (``others``: the values of other names a regularizer may have),
        checked (:meth:`check`; ``trained=False``: no network reads it, so no trained range applies)."""
        given = {**others, "lam": lam, "mu": mu, "alpha": alpha}
        missing = [n for n in self.names if given.get(n) is None]
        if missing:
            raise ValueError(f"the {self.regularizer!r} model needs {', '.join(missing)} (set it with --{missing[0]} VALUE).")
        try:
            row = [[float(given[n]) for n in self.names]]
        except (TypeError, ValueError):
            raise ValueError(f"hyperparameters {self.names} must be numbers, got {[given[n] for n in self.names]}.") from None
        return self.check(torch.tensor(row), allow_extrapolation=allow_extrapolation, trained=trained)

    def grid(
        self, num: int | Sequence[int] = 11, low: Sequence[float] | None = None, high: Sequence[float] | None = None
    ) -> torch.Tensor:
        """Regular grid of rows, ``(prod(num), dims)``, first dimension varying slowest.

        ``low``/``high`` default to the trained range (a zoomed sub-range must lie inside it).
        """
        nums = [int(num)] * self.dims if isinstance(num, (int, float)) else [int(n) for n in num]
        if len(nums) != self.dims or min(nums) < 1:
            raise ValueError(f"grid sizes must be {self.dims} positive integers for {self.names}, got {num!r}.")
        lows = self.low.tolist() if low is None else [float(v) for v in low]
        highs = self.high.tolist() if high is None else [float(v) for v in high]
        if len(lows) != self.dims or len(highs) != self.dims:
            raise ValueError(f"grid bounds must have {self.dims} values for {self.names}.")
        axes = [torch.linspace(lo, hi, n) for lo, hi, n in zip(lows, highs, nums)]
        rows = torch.cartesian_prod(*axes).reshape(-1, self.dims)
        return self.check(rows)
