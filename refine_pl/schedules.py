"""Learning-rate schedules that torch does not have in one class (a YAML config names one class)."""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from refine_pl.errors import ConfigError


class WarmupCosineLR(LambdaLR):
    """A few epochs at a reduced rate, then a cosine decay to 0 at epoch ``T_max``; stepped once per epoch.

    The rate is ``warmup_factor`` times the optimizer's in the first epoch, rising linearly to the full rate at
    epoch ``warmup_epochs``, from where it follows half a cosine down to 0 at ``T_max`` (and stays there).

    Args:
        optimizer: The optimizer whose rates are scaled.
        T_max: Epoch at which the rate reaches 0 (the training length).
        warmup_epochs: Epochs before the full rate.
        warmup_factor: Share of the full rate in the first epoch, in (0, 1].
        last_epoch: Index of the last epoch when resuming (torch's convention; -1 to start).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        T_max: int,  # noqa: N803 (torch's name for it)
        warmup_epochs: int = 1,
        warmup_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if not 0 <= warmup_epochs < T_max or not 0 < warmup_factor <= 1:
            raise ConfigError(
                f"WarmupCosineLR needs 0 <= warmup_epochs < T_max and warmup_factor in (0, 1], got warmup_epochs="
                f"{warmup_epochs}, T_max={T_max}, warmup_factor={warmup_factor}."
            )
        self.T_max = T_max
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, epoch: int) -> float:
        """The share of the full rate in ``epoch`` (0-based)."""
        if epoch < self.warmup_epochs:
            return self.warmup_factor + (1 - self.warmup_factor) * epoch / self.warmup_epochs
        progress = min(1.0, (epoch - self.warmup_epochs) / (self.T_max - self.warmup_epochs))
        return 0.5 * (1 + math.cos(math.pi * progress))
