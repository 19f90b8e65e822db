"""Checkpoints that always let a run resume, and always describe the weights it ended with."""

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from refine_pl.errors import ConfigError


class RunCheckpoint(ModelCheckpoint):
    """Writes ``epoch=E-step=S.ckpt`` and ``last.ckpt`` at the end of every training epoch and of the fit.

    Lightning's ``ModelCheckpoint`` saves when validation runs; with validation every few epochs a run
    killed in between loses those epochs, and a fit that ends between two validations leaves ``last.ckpt``
    with older weights than the ones it ended with (a later test would report and export the stale model).
    This callback saves at the end of every training epoch, every ``every_n_train_steps`` optimizer steps
    when set (for long epochs), and when fitting ends for any other reason (``max_steps``, ``max_time``),
    so ``last.ckpt`` always holds the newest state. The newest epoch / step file is kept beside it: if a
    kill leaves ``last.ckpt`` behind it, resuming with ``--ckpt_path last`` takes the newer file.

    ``last.ckpt`` is overwritten in place (never ``last-v1.ckpt``), also after the run folder has moved. A fit
    resumed from a finished run's checkpoint trains nothing and writes nothing.

    Args:
        every_n_train_steps: Also save every this many optimizer steps (0: at epoch ends only).
        dirpath: Folder of the checkpoints (default: ``checkpoints/`` in the run folder).
    """

    def __init__(self, every_n_train_steps: int = 0, dirpath: str | None = None) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(f"every_n_train_steps must be >= 0 (0: at epoch ends only), got {every_n_train_steps}.")
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_on_train_epoch_end=True,
            every_n_epochs=1,
            enable_version_counter=False,
        )
        self.step_interval = every_n_train_steps
        self._first_step = 0

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        self._first_step = trainer.global_step

    def _save_now(self, trainer: "pl.Trainer") -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        due = self.step_interval and trainer.global_step % self.step_interval == 0
        if due and not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step > self._first_step and not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer)


def require_trained_weights(trainer: "pl.Trainer", output: str) -> None:
    """Refuses to write ``output`` about a model that was neither restored from a checkpoint nor fitted here.

    A model with nothing to train (``trains`` False: a training-free defense) is what it is without either.

    Raises:
        ConfigError: The trainer tests weights that were never trained (no ``ckpt_path``, no training step).
    """
    trains = getattr(trainer.lightning_module, "trains", True)
    if trains and trainer.ckpt_path is None and trainer.global_step == 0:
        raise ConfigError(
            f"Refusing to write {output} for untrained weights: test a trained model (train.py test --ckpt_path last, "
            "or trainer.test(..., ckpt_path=...) / after trainer.fit)."
        )
