"""The label-free stopping rule: stop training the defense once its agreement with the victim stops improving."""

from typing import Any

from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from refine_pl.errors import ConfigError, cli_flag
from refine_pl.metric_names import AGREEMENT, DEFENDED
from refine_pl.schedules import WarmupCosineLR


class LabelFreeStopping(EarlyStopping):
    """Ends a fit when the label-free agreement (``val/agreement``) has stopped rising; ``max_epochs`` bounds it.

    The agreement is the share of held-out unlabeled images (``data.val_fraction`` of the training images, never
    trained on) on which the defended classifier gives the victim's class: it estimates the defended BA relative to
    the victim's without a single label (:class:`~refine_pl.metrics.Agreement`). From ``min_epochs`` on, once the
    agreement has not risen over its best for ``patience`` validations in a row, the rule ends the fit. A rise
    counts when it is larger than ``min_delta`` and than one held-out image (on 80 held-out images, a rise of one
    image, 0.0125, is noise). With :class:`~refine_pl.schedules.WarmupCosineLR` the fit does not stop at once, in
    the middle of its decay: the rate falls to 0 over the next ``cooldown_epochs`` epochs
    (:meth:`~refine_pl.schedules.WarmupCosineLR.cool_down`), and the fit stops after them (a transform left at a
    high rate is not the one its agreement promised); with another scheduler it stops at once. Validate every epoch
    (``trainer.check_val_every_n_epoch: 1``) for the rule to act on every epoch. Its state (best agreement,
    validations without a rise, the cooldown) is in every checkpoint, so a resumed fit stops where an uninterrupted
    one would.

    Args:
        patience: Validations without a rise before the cooldown (or the stop) begins.
        min_delta: The smallest rise of the agreement over its best that counts.
        min_epochs: Epochs trained before the rule can act. The agreement levels off before BA and ASR do: earlier
            stops cost quality on the tuning victims and users' models (docs/method.md), hence 20 by default.
        cooldown_epochs: Epochs over which the rate decays to 0 before the fit stops (0: stop at once).
    """

    def __init__(
        self, patience: int = 5, min_delta: float = 0.001, min_epochs: int = 20, cooldown_epochs: int = 3
    ) -> None:
        if type(cooldown_epochs) is not int or cooldown_epochs < 0:
            raise ConfigError(f"LabelFreeStopping's cooldown_epochs must be an integer >= 0, got {cooldown_epochs!r}.")
        for name, value in (("patience", patience), ("min_epochs", min_epochs)):
            if type(value) is not int or value < 1:
                raise ConfigError(
                    f"LabelFreeStopping's {name} must be an integer >= 1, got {value!r} (set in "
                    f"{cli_flag('trainer', 'callbacks')})."
                )
        if not isinstance(min_delta, (int, float)) or not 0 <= min_delta < 1:
            raise ConfigError(
                f"LabelFreeStopping's min_delta is a rise of a share and must be in [0, 1), got {min_delta!r}."
            )
        super().__init__(
            monitor=DEFENDED.logged("val", AGREEMENT),
            mode="max",
            patience=patience,
            min_delta=min_delta,
            strict=False,
            check_on_train_epoch_end=False,
        )
        self.min_epochs = min_epochs
        self.smallest_rise = min_delta
        self.cooldown_epochs = cooldown_epochs
        self.last_epoch: int | None = None  # 0-based epoch after which the fit stops, once the cooldown has begun
        self._warned = False

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        if self.monitor not in trainer.callback_metrics:
            if not self._warned:
                rank_zero_warn(
                    "No label-free agreement was measured (no held-out images: the datamodule's val_fraction is 0, "
                    "or the training set has one image), so the fit runs to max_epochs: set "
                    f"{cli_flag('data', 'val_fraction')} to hold out a share of the images."
                )
                self._warned = True
            return
        epoch = trainer.current_epoch
        if self.last_epoch is not None:  # cooling down
            trainer.should_stop = trainer.should_stop or epoch >= self.last_epoch
            return
        if epoch + 1 < self.min_epochs:
            return
        estimate = getattr(trainer.lightning_module, "label_free_estimate", None) or {}
        self.min_delta = max(self.smallest_rise, 1 / estimate.get("held_out_images", 1e9))
        super()._run_early_stopping_check(trainer)
        if not (trainer.should_stop and self.stopped_epoch == epoch):
            return
        reason = (
            f"the label-free agreement has not risen over its best ({float(self.best_score):.4f}) in "
            f"{self.wait_count} validations"
        )
        schedule = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        remaining = trainer.max_epochs - 1 - epoch
        if isinstance(schedule, WarmupCosineLR) and 0 < self.cooldown_epochs < remaining:
            trainer.should_stop = False  # not yet: first the rate decays to 0
            self.last_epoch = epoch + self.cooldown_epochs
            schedule.cool_down(self.cooldown_epochs)
            rank_zero_info(
                f"After epoch {epoch + 1} of at most {trainer.max_epochs}, {reason}: the learning rate decays to 0 "
                f"over {self.cooldown_epochs} more epochs, then training stops."
            )
        else:
            rank_zero_info(f"Stopped after epoch {epoch + 1} of at most {trainer.max_epochs}: {reason}.")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        last_epoch = state.pop("last_epoch", None)
        self.last_epoch = last_epoch if isinstance(last_epoch, int) else None
        super().load_state_dict(state)
