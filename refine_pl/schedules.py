"""Learning-rate schedules that torch does not have in one class (a YAML config names one class)."""

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from refine_pl.errors import ConfigError


class WarmupCosineLR(LambdaLR):
    """A few epochs at a reduced rate, then a cosine decay to 0 at epoch ``T_max``; stepped once per epoch.

    The rate is ``warmup_factor`` times the optimizer's in the first epoch, rising linearly to the full rate at
    epoch ``warmup_epochs``, from where it follows half a cosine down to 0 at ``T_max`` (and stays there; torch's
    ``CosineAnnealingLR`` would climb again after ``T_max``). The first epoch of that cosine runs at the full rate.

    Without ``T_max`` the decay ends with the training: a LightningModule of refine-pl sets it to the trainer's
    ``max_epochs`` (:meth:`end_with_training`), so a config types the length once and ``--trainer.max_epochs``
    alone changes it. A run resumed with another length is refused (:meth:`load_state_dict`). A stopping rule can
    end the decay sooner (:meth:`cool_down`).

    Args:
        optimizer: The optimizer whose rates are scaled.
        T_max: Epoch at which the rate reaches 0; None: the trainer's ``max_epochs``.
        warmup_epochs: Epochs before the full rate (0: the cosine from the first epoch).
        warmup_factor: Share of the full rate in the first epoch, in (0, 1].
        last_epoch: Index of the last epoch when resuming (torch's convention; -1 to start).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        T_max: int | None = None,  # noqa: N803 (torch's name for it)
        warmup_epochs: int = 1,
        warmup_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_epochs < 0 or not 0 < warmup_factor <= 1:
            raise ConfigError(
                f"WarmupCosineLR needs warmup_epochs >= 0 and warmup_factor in (0, 1], got warmup_epochs="
                f"{warmup_epochs}, warmup_factor={warmup_factor}."
            )
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        self.cooldown: tuple[int, int, float] | None = None  # (first epoch, epochs, factor it starts from)
        self.T_max: int | None = None
        if T_max is not None:
            self._set_length(T_max, "T_max")
        super().__init__(optimizer, self.factor, last_epoch)

    def _set_length(self, epochs: int, source: str) -> None:
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(
                f"WarmupCosineLR decays to 0 at {source}={epochs}, which must be a positive epoch count: set "
                "--trainer.max_epochs, or T_max (--model.init_args.scheduler.init_args.T_max) when training is "
                "counted in steps."
            )
        self.T_max = epochs

    def end_with_training(self, max_epochs: int | None) -> None:
        """Sets ``T_max`` to the trainer's ``max_epochs`` if no ``T_max`` was given (else changes nothing)."""
        if self.T_max is None:
            self._set_length(max_epochs, "the trainer's max_epochs")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a checkpoint's schedule, which must end where this one does.

        Raises:
            ConfigError: The checkpoint's cosine ends at another epoch than this one's ``T_max`` (e.g. a finished
                run resumed with a higher ``--trainer.max_epochs``: its extra epochs would run at rate 0, and a
                lower one would stop before the decay ends).
        """
        length = self.T_max
        if length is not None and state_dict.get("T_max") not in (None, length):
            raise ConfigError(
                f"The run's learning rate decays to 0 at epoch {state_dict['T_max']}, and resuming it with {length} "
                f"epochs would not lengthen or shorten that schedule: resume with --trainer.max_epochs "
                f"{state_dict['T_max']}, or train {length} epochs as a new run (--fresh true or another "
                "--trainer.default_root_dir)."
            )
        super().load_state_dict(state_dict)

    def cool_down(self, epochs: int) -> None:
        """Ends the decay sooner: the rate falls along half a cosine over the next ``epochs`` epochs, then stays at 0.

        The cooldown starts from the rate the schedule gives the epoch that trains next (:attr:`last_epoch`, whose
        rate the optimizer holds and is now lowered) and reaches 0 one epoch after its last (its last epoch still
        trains, at a small rate); the training is meant to end with it.
        """
        first = self.last_epoch
        self.cooldown = (first, epochs, self._scheduled_factor(first))
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * self.factor(first)

    def factor(self, epoch: int) -> float:
        """The share of the full rate in ``epoch`` (0-based), the cooldown's when one was started (:meth:`cool_down`).

        A training no longer than the warmup (``T_max <= warmup_epochs``, e.g. one epoch) is warmup only.
        """
        if self.cooldown is not None and epoch >= self.cooldown[0]:
            first, epochs, start = self.cooldown
            progress = min(1.0, (epoch - first + 1) / (epochs + 1))
            return start * 0.5 * (1 + math.cos(math.pi * progress))
        return self._scheduled_factor(epoch)

    def _scheduled_factor(self, epoch: int) -> float:
        if self.T_max is not None and epoch >= self.T_max:
            return 0.0
        if epoch < self.warmup_epochs:
            return self.warmup_factor + (1 - self.warmup_factor) * epoch / self.warmup_epochs
        if epoch == self.warmup_epochs:
            return 1.0
        if self.T_max is None:
            raise ConfigError(
                "WarmupCosineLR has no T_max: outside a refine-pl LightningModule (which sets it to the trainer's "
                "max_epochs) pass T_max."
            )
        progress = min(1.0, (epoch - self.warmup_epochs) / (self.T_max - self.warmup_epochs))
        return 0.5 * (1 + math.cos(math.pi * progress))
