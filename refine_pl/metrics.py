"""Benign accuracy (BA) and attack success rate (ASR) as torchmetrics metrics.

Each metric is a thin :class:`torchmetrics.Metric` that sums the counts of a pure function, so the counts
are reduced across processes by torchmetrics (sum) and the ratio is taken once, at compute time.
"""

import torch
from torch import Tensor
from torchmetrics import Metric


def benign_accuracy_counts(preds: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Counts of correct predictions and of samples.

    Args:
        preds: ``[N]`` predicted classes.
        labels: ``[N]`` true classes.

    Returns:
        ``(correct, total)`` as long scalars.
    """
    return (preds == labels).sum(), torch.tensor(labels.numel(), device=labels.device)


def attack_success_counts(preds: Tensor, labels: Tensor, target_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Counts of poisoned samples classified as the attack's target, over samples not of the target class.

    Args:
        preds: ``[N]`` predicted classes on poisoned images.
        labels: ``[N]`` true classes of the images before poisoning.
        target_labels: ``[N]`` the class the attack wants for each image.

    Returns:
        ``(hits, total)`` as long scalars; samples whose true class is already the target are not counted.
    """
    counted = labels != target_labels
    return (preds[counted] == target_labels[counted]).sum(), counted.sum()


class BenignAccuracy(Metric):
    """Fraction of clean test images classified correctly."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor) -> None:
        correct, total = benign_accuracy_counts(preds, labels)
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp_min(1)


class AttackSuccessRate(Metric):
    """Fraction of poisoned non-target-class test images classified as the attack's target."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor, target_labels: Tensor) -> None:
        hits, total = attack_success_counts(preds, labels, target_labels)
        self.hits += hits
        self.total += total

    def compute(self) -> Tensor:
        return self.hits.float() / self.total.clamp_min(1)


CLEAN_LOADER = 0
"""Index of the clean loader among a datamodule's validation / test loaders: ``(image, label)`` batches."""
POISONED_LOADER = 1
"""Index of the poisoned loader: ``(poisoned image, true label, target label)`` batches."""


class BackdoorMetrics(torch.nn.Module):
    """BA on the clean loader and ASR on the poisoned loader, for one classifier in one stage."""

    def __init__(self) -> None:
        super().__init__()
        self.ba = BenignAccuracy()
        self.asr = AttackSuccessRate()

    def update(self, preds: Tensor, batch: tuple[Tensor, ...], dataloader_idx: int) -> Metric:
        """Updates the metric of the loader ``dataloader_idx`` and returns it (for logging)."""
        if dataloader_idx == CLEAN_LOADER:
            self.ba.update(preds, batch[1])
            return self.ba
        self.asr.update(preds, batch[1], batch[2])
        return self.asr
