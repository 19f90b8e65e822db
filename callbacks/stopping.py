"""The label-free stopping rule: stop training the defense once its agreement with the victim stops improving."""

from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from refine_pl.errors import ConfigError, cli_flag
from refine_pl.metric_names import AGREEMENT, DEFENDED


class LabelFreeStopping(EarlyStopping):
    """Stops a fit when the label-free agreement (``val/agreement``) has stopped improving; ``max_epochs`` bounds it.

    The agreement is the share of held-out unlabeled images (``data.val_fraction`` of the training images, never
    trained on) on which the defended classifier gives the victim's class: it estimates the defended BA relative to
    the victim's without a single label (:class:`~refine_pl.metrics.Agreement`). From ``min_epochs`` on, a fit whose
    agreement has not risen by ``min_delta`` over its best for ``patience`` validations in a row ends there, and
    says so. Validate every epoch (``trainer.check_val_every_n_epoch: 1``) for the rule to act on every epoch. The
    callback's state (best agreement, validations without improvement) is in every checkpoint, so a resumed fit
    stops where an uninterrupted one would.

    Args:
        patience: Validations without an improvement of ``min_delta`` before the fit stops.
        min_delta: The rise of the agreement over its best that counts as an improvement.
        min_epochs: Epochs trained before the rule can stop the fit (the first epochs' agreement says little).
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.001, min_epochs: int = 5) -> None:
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
        if trainer.current_epoch + 1 < self.min_epochs:
            return
        super()._run_early_stopping_check(trainer)
        if trainer.should_stop and self.stopped_epoch == trainer.current_epoch:
            rank_zero_info(
                f"Stopped after epoch {trainer.current_epoch + 1} of at most {trainer.max_epochs}: the label-free "
                f"agreement has not risen by {self.min_delta} over its best ({float(self.best_score):.4f}) in "
                f"{self.wait_count} validations."
            )
