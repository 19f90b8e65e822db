"""LightningModule that trains an ordinary, possibly backdoored, image classifier."""

from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from refine_pl.architectures import build_architecture
from refine_pl.classifier import NormalizedClassifier
from refine_pl.metrics import CLEAN_LOADER, BackdoorMetrics
from refine_pl.weights import ATTACK_KEY


class VictimLitModule(LightningModule):
    """Trains a classifier with cross-entropy on whatever training set the datamodule gives it.

    With a datamodule that poisons its training set this produces a backdoored victim. Validation and
    test report BA on the clean loader and ASR on the poisoned one. Every checkpoint records the
    architecture, data shape and normalisation (hyper-parameters) and, under ``"backdoor_attack"``, the
    spec of the datamodule's attack, so a later evaluation can rebuild the same poisoned test set.

    Args:
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_channels: Image channels (linked).
        image_size: Image side in pixels (linked).
        mean: Per-channel normalisation mean of the dataset (linked).
        std: Per-channel normalisation std of the dataset (linked).
        arch: Registered architecture name.
        optimizer: Builds the optimizer from the parameters.
        scheduler: Builds the learning-rate scheduler (stepped every epoch) from the optimizer.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        arch: str = "small_cnn",
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = NormalizedClassifier(build_architecture(arch, num_classes, in_channels, image_size), mean, std)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.metrics = torch.nn.ModuleDict({stage: BackdoorMetrics() for stage in ("val", "test")})
        self.attack_spec: dict[str, Any] | None = None

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, C, H, W]`` in [0, 1]."""
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, stage: str, batch: tuple[Tensor, ...], dataloader_idx: int) -> None:
        metric = self.metrics[stage].update(self(batch[0]).argmax(1), batch, dataloader_idx)
        name = "ba" if dataloader_idx == CLEAN_LOADER else "asr"
        self.log(f"{stage}/{name}", metric, prog_bar=True, add_dataloader_idx=False)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        attack = getattr(getattr(self.trainer, "datamodule", None), "attack", None)
        if attack is not None:
            self.attack_spec = attack.spec()
        if self.attack_spec is not None:
            checkpoint[ATTACK_KEY] = self.attack_spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.attack_spec = checkpoint.get(ATTACK_KEY)
