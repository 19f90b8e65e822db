"""LightningModule that trains REFINE's input transformation in front of a frozen victim."""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from refine_pl.distributed import gather_no_grad, use_global_batch_norm
from refine_pl.errors import ConfigError
from refine_pl.losses import SupConLoss, UtilityLoss
from refine_pl.metrics import CLEAN_LOADER, BackdoorMetrics
from refine_pl.remap import OutputRemap
from refine_pl.transform import UNet
from refine_pl.weights import load_victim


def reference_sgd(params: Any) -> torch.optim.Optimizer:
    """The REFINE reference optimizer: SGD, lr 0.01, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


class RefineLitModule(LightningModule):
    """The defended classifier ``M(f(T(x)))`` and the training of ``T``.

    ``f`` is the victim, loaded safely from ``victim_checkpoint`` and frozen (its weights never change
    and it always runs in eval mode). ``T`` is the trainable transform. ``M`` is an :class:`OutputRemap`
    whose derangement is a buffer, drawn once from ``remap_seed`` and afterwards only restored from
    checkpoints. Training batches are images only: the pseudo-label of each image is the victim's
    prediction on it, so no label of the benign set can reach the loss.

    Validation and test log BA / ASR of the defended classifier (``ba``, ``asr``) and of the victim
    alone (``victim_ba``, ``victim_asr``) on the same images.

    In a multi-process run the contrastive loss covers the global batch, the transform's batch norm uses the
    global batch's statistics (``global_batch_norm``) and the remap is checked to be the same on every process
    at the start of fitting, validation and testing; the transform's gradients are then those of one process
    with the whole batch. Under mixed precision ``T`` and ``f`` run in 16 bits and the losses in float32.

    Args:
        victim_checkpoint: Weights of the suspect model (refine-pl victim .ckpt, state_dict or safetensors).
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_channels: Image channels (linked).
        image_size: Image side in pixels (linked).
        mean: Normalisation mean the victim expects, used when its checkpoint records none (linked).
        std: Normalisation std the victim expects, used when its checkpoint records none (linked).
        victim_arch: Architecture of bare weights files; a refine-pl victim checkpoint records its own.
        transform: Builds ``T`` from the channel count, e.g. ``UNet`` with its width set in the config.
        remap_seed: Seed of the output derangement.
        global_batch_norm: In a multi-process run, make the transform's batch-norm layers normalise with the
            statistics of the global batch, so that training matches one process with the whole batch
            (false: per-process statistics, as plain DDP does).
        contrastive_weight: Weight of the supervised contrastive loss (0.1 in the reference).
        temperature: Temperature of the supervised contrastive loss (0.07 in the reference).
        optimizer: Builds the optimizer from the transform's parameters (the only trainable ones).
        scheduler: Builds the learning-rate scheduler (stepped every epoch) from the optimizer.
    """

    def __init__(
        self,
        victim_checkpoint: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        victim_arch: str | None = None,
        transform: Callable[[int], nn.Module] = UNet,
        remap_seed: int = 0,
        global_batch_norm: bool = True,
        contrastive_weight: float = 0.1,
        temperature: float = 0.07,
        optimizer: OptimizerCallable = reference_sgd,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["transform", "optimizer", "scheduler"])
        self.victim = load_victim(victim_checkpoint, num_classes, in_channels, image_size, mean, std, victim_arch)
        self.transform = transform(in_channels)
        self.remap = OutputRemap(num_classes, seed=remap_seed)
        self.utility_loss = UtilityLoss()
        self.contrastive_loss = SupConLoss(temperature=temperature)
        self.contrastive_weight = contrastive_weight
        self.global_batch_norm = global_batch_norm
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.metrics = nn.ModuleDict(
            {f"{stage}_{model}": BackdoorMetrics() for stage in ("val", "test") for model in ("defended", "victim")}
        )

    def setup(self, stage: str) -> None:
        if self.global_batch_norm and self.trainer.world_size > 1:
            self.transform = use_global_batch_norm(self.transform, self.trainer.strategy.root_device.type)

    def _check_remap_is_shared(self) -> None:
        """Stops a multi-process run whose processes hold different remaps (e.g. different checkpoints)."""
        permutations = gather_no_grad(self.remap.permutation[None])
        if not bool((permutations == permutations[0]).all()):
            raise ConfigError(
                f"The output remap differs between processes ({permutations.tolist()}): every process must "
                "load the same checkpoint and use the same remap_seed."
            )

    def on_fit_start(self) -> None:
        self._check_remap_is_shared()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != TrainerFn.FITTING:  # during fit, on_fit_start has checked the fixed buffer
            self._check_remap_is_shared()

    def on_test_start(self) -> None:
        self._check_remap_is_shared()

    def train(self, mode: bool = True) -> "RefineLitModule":
        """Switches the transform's mode; the victim stays in eval mode so its BN statistics never move."""
        super().train(mode)
        self.victim.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Defended logits ``[B, num_classes]`` for images ``[B, C, H, W]`` in [0, 1]."""
        return self.remap(self.victim(self.transform(images)))

    def refine_loss(self, images: Tensor) -> dict[str, Tensor]:
        """The REFINE losses on a batch of unlabeled images ``[B, C, H, W]``.

        Returns:
            ``{"loss", "utility", "contrastive"}`` scalars, ``loss = utility + weight * contrastive``.
        """
        with torch.no_grad():
            pseudo_labels = self.victim(images).argmax(1)
        transformed = self.transform(images)
        utility = self.utility_loss(self.remap(self.victim(transformed)), pseudo_labels)
        features = F.normalize(transformed.flatten(1).float(), dim=1)
        contrastive = self.contrastive_loss(features, pseudo_labels)
        return {
            "loss": utility + self.contrastive_weight * contrastive,
            "utility": utility,
            "contrastive": contrastive,
        }

    def training_step(self, images: Tensor, batch_idx: int) -> Tensor:
        losses = self.refine_loss(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", sync_dist=True)
        return losses["loss"]

    def _evaluate(self, stage: str, batch: tuple[Tensor, ...], dataloader_idx: int) -> None:
        images = batch[0]
        suffix = "ba" if dataloader_idx == CLEAN_LOADER else "asr"
        for model, logits, prefix in (
            ("defended", self(images), ""),
            ("victim", self.victim(images), "victim_"),
        ):
            metric = self.metrics[f"{stage}_{model}"].update(logits.argmax(1), batch, dataloader_idx)
            self.log(f"{stage}/{prefix}{suffix}", metric, prog_bar=not prefix, add_dataloader_idx=False)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.transform.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
