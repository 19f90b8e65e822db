"""What the LightningModules share: optimizer, the backdoor metrics, the precision and layout of the training step."""

import contextlib
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from refine_pl.errors import ConfigError, cli_flag, first_sentence
from refine_pl.internals import native_bf16
from refine_pl.metric_names import AGREEMENT, ASR, BA, DER, ClassifierRow
from refine_pl.metrics import CLEAN_LOADER, POISONED_LOADER, Agreement, BackdoorMetrics, DefenseEffectivenessRating
from refine_pl.schedules import WarmupCosineLR

STAGES = ("val", "test")


class BackdoorLitModule(LightningModule):
    """Base of :class:`~refine_pl.VictimLitModule` and of every defense (:class:`~refine_pl.DefendedLitModule`).

    Validation and test batches come from two loaders, clean (:data:`~refine_pl.metrics.CLEAN_LOADER`) and
    poisoned; every classifier of :meth:`evaluated_classifiers` is measured on both, and its BA / ASR / any-class ASR
    / RA are logged under the keys of its row of :mod:`refine_pl.metric_names` (``<stage>/<prefix><rate>``). With an
    ``undefended_row``, the first classifier's DER against that one is logged too (when there is a poisoned
    loader: DER needs ASR). The optimizer is built from the parameters of
    :meth:`trainable_parameters`, the scheduler (stepped every epoch) from the optimizer.

    With an ``undefended_row``, validation also measures the label-free agreement of the first classifier with the
    undefended one on the clean images (``val/agreement``, in the progress bar; :attr:`label_free_estimate` after
    each validation). Clean images without a label (``label < 0``: a held-out share of unlabeled training images)
    count towards the agreement only.

    The training step runs under :meth:`training_autocast` and, with ``channels_last``, on images and networks in
    channels-last memory layout (:meth:`training_layout`; subclasses convert their networks). Validation and test
    run in the trainer's precision (float32 by default), as an exported classifier does.

    Args:
        num_classes: Number of classes of the classifiers.
        optimizer: Builds the optimizer from the trainable parameters (or parameter groups).
        scheduler: Builds the learning-rate scheduler from the optimizer; None for a constant rate.
        classifier_rows: The row (log keys) of each evaluated classifier, in the order of
            :meth:`evaluated_classifiers`; the first is shown in the progress bar.
        bf16: Train under bfloat16 autocast. None: where the hardware computes bf16 natively (x86 CPUs with
            AVX512-BF16 or AMX, NVIDIA GPUs from Ampere on) and the trainer runs in ``32-true`` precision; False:
            in the trainer's precision.
        channels_last: Train in channels-last memory layout (the same arithmetic in another order: results differ
            by float rounding only; faster convolutions on CPUs and tensor-core GPUs).
        undefended_row: The row of the classifier without a defense, which the DER of the first classifier is
            taken against (None: no DER).
    """

    trains: ClassVar[bool] = True
    """False for a module with nothing to train (a training-free defense): the CLI then tests it without
    ``--ckpt_path`` and refuses ``fit``."""

    def __init__(
        self,
        num_classes: int,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
        classifier_rows: tuple[ClassifierRow, ...],
        bf16: bool | None = None,
        channels_last: bool = True,
        undefended_row: ClassifierRow | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.classifier_rows = classifier_rows
        self.bf16 = bf16
        self.channels_last = channels_last
        self.undefended_row = undefended_row
        self.metrics = nn.ModuleDict(
            {f"{stage}_{row.key}": BackdoorMetrics(num_classes) for stage in STAGES for row in classifier_rows}
        )
        self.der_metrics = nn.ModuleDict(
            {stage: DefenseEffectivenessRating() for stage in STAGES} if undefended_row is not None else {}
        )
        self._evaluated_images = {stage: [0, 0] for stage in STAGES}  # this process's (clean, poisoned) images
        self.agreement = Agreement() if undefended_row is not None else None
        self.label_free_estimate: dict[str, Any] | None = None
        """The last validation's agreement (``agreement``, ``held_out_images``, ``epoch``: epochs trained), or None."""

    def uses_bf16(self) -> bool:
        """Whether the training step runs under bfloat16 autocast (see ``bf16``)."""
        if self.bf16 is not None:
            return self.bf16
        precision = self._trainer.precision if self._trainer is not None else "32-true"
        return precision == "32-true" and native_bf16(self.device)

    def training_autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on the module's device when :meth:`uses_bf16`, else a context that does nothing."""
        if self.uses_bf16():
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def training_layout(self, images: Tensor) -> Tensor:
        """``images`` ``[B, C, H, W]`` in the memory layout of the training step (channels-last when asked)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def evaluated_classifiers(self) -> tuple[nn.Module, ...]:
        """The classifiers measured in validation and test, one per entry of ``classifier_rows``."""
        raise NotImplementedError

    def trainable_parameters(self) -> Iterable[Tensor] | list[dict[str, Any]]:
        """What the optimizer trains: parameters, or parameter groups with their own settings."""
        raise NotImplementedError

    def _evaluate(self, stage: str, batch: tuple[Tensor, ...], dataloader_idx: int) -> None:
        classifiers = zip(self.classifier_rows, self.evaluated_classifiers(), strict=True)
        preds = {row: classifier(batch[0]).argmax(1) for row, classifier in classifiers}
        clean = dataloader_idx == CLEAN_LOADER
        if stage == "val" and clean and self.agreement is not None:
            self.agreement.update(preds[self.classifier_rows[0]], preds[self.undefended_row])
        if clean and bool((batch[1] < 0).any()):  # held-out unlabeled images: nothing else to measure on them
            return
        self._evaluated_images[stage][dataloader_idx] += len(batch[0])
        for row, predicted in preds.items():
            for rate, metric in self.metrics[f"{stage}_{row.key}"].update(predicted, batch, dataloader_idx).items():
                show = row == self.classifier_rows[0] and rate in (BA, ASR)
                self.log(row.logged(stage, rate), metric, prog_bar=show, add_dataloader_idx=False)
        if stage in self.der_metrics:
            first, der = self.classifier_rows[0], self.der_metrics[stage]
            der.update(preds[first], preds[self.undefended_row], *batch[1:])
            if dataloader_idx == POISONED_LOADER:  # logged once, where its last counts (ASR) come in
                self.log(first.logged(stage, DER), der, add_dataloader_idx=False)

    def _start_evaluation(self, stage: str) -> None:
        self._evaluated_images[stage] = [0, 0]
        # Lightning resets a logged metric after the epoch; a DER never logged (no poisoned loader) is reset here.
        if stage in self.der_metrics:
            self.der_metrics[stage].reset()

    def evaluated_images(self, stage: str) -> tuple[int, int]:
        """The clean and the poisoned images the last ``stage`` pass measured, summed over every process.

        A collective in a multi-process run: every process must call it.
        """
        counts = torch.tensor(self._evaluated_images[stage], device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        clean, poisoned = (int(count) for count in counts)
        return clean, poisoned

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")
        if self.agreement is not None:
            self.agreement.reset()

    def on_validation_epoch_end(self) -> None:
        if self.agreement is None or self.trainer.sanity_checking:
            return
        with self.agreement.sync_context():  # the counts of every process
            agreed, held_out = int(self.agreement.hits), int(self.agreement.total)
        if held_out == 0:
            return
        self.log(self.classifier_rows[0].logged("val", AGREEMENT), agreed / held_out, prog_bar=True)
        self.label_free_estimate = {
            AGREEMENT: round(agreed / held_out, 6),
            "held_out_images": held_out,
            "epoch": self.current_epoch + 1,
        }

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer_factory(self.trainable_parameters())
        except ValueError as error:  # torch's optimizers check their settings (lr >= 0, betas in [0, 1), ...)
            raise ConfigError(
                f"The optimizer refuses its settings ({first_sentence(error)}): fix them in "
                f"{cli_flag('model', 'optimizer')}."
            ) from error
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR):  # without T_max the decay ends with the training
            scheduler.end_with_training(self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
