"""LightningModule that trains an ordinary, possibly backdoored, image classifier."""

from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from refine_pl.architectures import build_architecture
from refine_pl.attacks import Attack, TrainingControlledAttack, attack_record, attack_spec_of
from refine_pl.base_module import BackdoorLitModule
from refine_pl.classifier import NormalizedClassifier
from refine_pl.metric_names import DEFENDED
from refine_pl.weights import ATTACK_KEY


class VictimLitModule(BackdoorLitModule):
    """Trains a classifier with cross-entropy on whatever training set the datamodule gives it.

    With a datamodule that poisons its training set this produces a backdoored victim. Validation and
    test report BA on the clean loader and ASR on the poisoned one. Every checkpoint records the
    architecture, data shape and normalisation (hyper-parameters) and, under ``"backdoor_attack"``, the
    spec and state of the datamodule's attack (:func:`~refine_pl.attacks.attack_record`), so a later
    evaluation can rebuild the same poisoned test set.

    A training-controlled attack (:class:`~refine_pl.attacks.TrainingControlledAttack`) of the datamodule
    takes part in training: its networks become the submodule ``attack_networks`` (trained with the
    attack's own parameter groups), every training batch passes through its ``training_batch`` (which sees the
    classifier) and every epoch starts with its ``on_train_epoch_start``. The networks are kept out of the
    checkpoint's ``state_dict``, which holds the classifier only, and live in the attack's record instead.

    Args:
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_channels: Image channels (linked).
        image_size: Image side in pixels (linked).
        mean: Per-channel normalisation mean of the dataset (linked).
        std: Per-channel normalisation std of the dataset (linked).
        arch: Registered architecture name.
        optimizer: Builds the optimizer from the parameters.
        scheduler: Builds the learning-rate scheduler (stepped every epoch) from the optimizer.
        bf16: Train the classifier under bfloat16 autocast. None (default): where the hardware computes bf16
            natively (x86 CPUs with AVX512-BF16 or AMX, NVIDIA GPUs from Ampere on) and the trainer runs in
            ``32-true`` precision; False: in the trainer's precision. A training-controlled attack's own networks
            always run in the trainer's precision.
        channels_last: Keep the classifier, and feed it images, in channels-last memory layout (results differ by
            float rounding only; faster convolutions on CPUs and tensor-core GPUs).
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
        bf16: bool | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__(num_classes, optimizer, scheduler, (DEFENDED,), bf16, channels_last)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = NormalizedClassifier(build_architecture(arch, num_classes, in_channels), mean, std, arch=arch)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.attack_spec: dict[str, Any] | None = None
        self.training_attack: TrainingControlledAttack | None = None

    def _datamodule_attack(self) -> Attack | None:
        return getattr(getattr(self._trainer, "datamodule", None), "attack", None)

    def setup(self, stage: str) -> None:
        attack = self._datamodule_attack()
        if stage == "fit" and isinstance(attack, TrainingControlledAttack):
            self.training_attack = attack
            self.attack_networks = attack.networks()

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, C, H, W]`` in [0, 1]."""
        return self.model(images)

    def on_train_epoch_start(self) -> None:
        if self.training_attack is not None:
            self.training_attack.on_train_epoch_start(self.model, self.current_epoch)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        attack_loss = None
        if self.training_attack is not None:
            images, labels, attack_loss = self.training_attack.training_batch(images, labels, self.model)
            self.log("train/attack_loss", attack_loss)
        with self.training_autocast():
            loss = F.cross_entropy(self(self.training_layout(images)), labels)
        if attack_loss is not None:
            loss = loss + attack_loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def evaluated_classifiers(self) -> tuple[nn.Module, ...]:
        return (self.model,)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": list(self.model.parameters())}]
        if self.training_attack is not None:
            groups.extend(self.training_attack.parameter_groups())
        return groups

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        attack = self._datamodule_attack()
        if attack is not None:
            self.attack_spec = attack_record(attack)
        if self.attack_spec is not None:
            checkpoint[ATTACK_KEY] = self.attack_spec
        # The networks of a training-controlled attack are in the attack's record, not the classifier's weights.
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("attack_networks.")
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.attack_spec = checkpoint.get(ATTACK_KEY)
        attack = self._datamodule_attack()
        record = self.attack_spec
        same_attack = attack is not None and record is not None and attack.spec() == attack_spec_of(record)
        if same_attack and "state" in record:
            attack.load_state_dict(record["state"])
        if self.training_attack is not None:  # resuming: the strict weight loading expects the attack's networks
            networks = self.attack_networks.state_dict()
            checkpoint["state_dict"].update({f"attack_networks.{key}": value for key, value in networks.items()})
