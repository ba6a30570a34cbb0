"""The ``reduction`` every loss of the package takes (MONAI's convention), checked and applied in one place."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["ReducedLoss"]


class ReducedLoss(_Loss):
    """A loss whose ``reduction`` is checked when it is made and applied by :meth:`reduce`.

    Args:
        reduction: ``"mean"`` or ``"sum"`` over every axis of the loss's values, or ``"none"`` (them as they are),
            a :class:`~monai.utils.LossReduction` or its value.

    Raises:
        ValueError: another reduction.
    """

    def __init__(self, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        if reduction not in list(LossReduction):
            raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')
        super().__init__(reduction=LossReduction(reduction).value)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """``values.mean()``, ``values.sum()`` or ``values``, as ``reduction`` says."""
        if self.reduction == LossReduction.MEAN.value:
            return values.mean()
        if self.reduction == LossReduction.SUM.value:
            return values.sum()
        return values
