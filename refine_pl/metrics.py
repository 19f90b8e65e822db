"""Benign accuracy (BA), attack success rate (ASR), any-class ASR, robust accuracy (RA) and defense effectiveness (DER).

Each metric is a thin :class:`torchmetrics.Metric` that sums the counts of a pure function, so the counts
are reduced across processes by torchmetrics (sum) and the ratios are taken once, at compute time.
"""

import torch
from torch import Tensor
from torchmetrics import Metric

from refine_pl.metric_names import ANY_CLASS_ASR, ASR, BA, RA


def check_class_vectors(**vectors: Tensor) -> None:
    """Checks that every tensor is a ``[N]`` vector of class indices, all of the same ``N``.

    A ``[N, 1]`` tensor compared with a ``[N]`` one would broadcast to ``[N, N]`` and give a wrong count
    silently, and logits passed instead of classes would be compared as numbers.

    Raises:
        ValueError: A tensor is not one-dimensional, not of an integer dtype, or the lengths differ.
    """
    for name, vector in vectors.items():
        if vector.ndim != 1 or vector.dtype.is_floating_point or vector.dtype.is_complex:
            raise ValueError(f"{name} must be a [N] tensor of class indices, got {vector.dtype} {tuple(vector.shape)}")
    lengths = {name: len(vector) for name, vector in vectors.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"class vectors of different lengths: {lengths}")


def benign_accuracy_counts(preds: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Counts of correct predictions and of samples.

    Args:
        preds: ``[N]`` predicted classes.
        labels: ``[N]`` true classes.

    Returns:
        ``(correct, total)`` as long scalars.
    """
    check_class_vectors(preds=preds, labels=labels)
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
    check_class_vectors(preds=preds, labels=labels, target_labels=target_labels)
    counted = labels != target_labels
    return (preds[counted] == target_labels[counted]).sum(), counted.sum()


def any_class_attack_counts(preds: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per class ``c``: how many triggered images of another true class are classified as ``c``, of how many.

    The counts of the any-class ASR (:class:`AnyClassAttackSuccessRate`): a defense that leaves the trigger working
    but sends its images to some fixed class other than the target (REFINE's remap moves every class) scores ASR 0
    and a high any-class ASR. Images of unknown class (a negative label, such as a folder of triggered images
    carries) are not counted: whether their true class is ``c`` cannot be told.

    Args:
        preds: ``[N]`` predicted classes on triggered images, in ``[0, num_classes)``.
        labels: ``[N]`` true classes of the images before the trigger (negative: unknown).
        num_classes: Number of classes.

    Returns:
        ``(hits [num_classes], total [num_classes])`` long vectors: ``hits[c]`` images whose true class is not ``c``
        classified as ``c``, ``total[c]`` images whose true class is known and not ``c``.

    Raises:
        ValueError: A prediction outside ``[0, num_classes)``.
    """
    check_class_vectors(preds=preds, labels=labels)
    if len(preds) and (int(preds.min()) < 0 or int(preds.max()) >= num_classes):
        raise ValueError(f"predictions must be classes in [0, {num_classes}), got {preds.min()}..{preds.max()}")
    known = labels >= 0
    preds, labels = preds[known], labels[known]
    predicted = torch.bincount(preds, minlength=num_classes)
    of_own_class = torch.bincount(preds[preds == labels], minlength=num_classes)
    of_class = torch.bincount(labels, minlength=num_classes)[:num_classes]
    return predicted - of_own_class, len(labels) - of_class


def robust_accuracy_counts(preds: Tensor, labels: Tensor, target_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Counts of poisoned samples classified as their true class, over samples not of the target class.

    The robust accuracy of BackdoorBench: how many poisoned images a defense gives back their own class, not
    only takes away from the target (a defense that maps every poisoned image to some third class has ASR 0
    and RA 0).

    Args:
        preds: ``[N]`` predicted classes on poisoned images.
        labels: ``[N]`` true classes of the images before poisoning.
        target_labels: ``[N]`` the class the attack wants for each image.

    Returns:
        ``(correct, total)`` as long scalars; samples whose true class is the target are not counted (as for ASR),
        nor are samples of unknown class (a negative label, such as a folder of triggered images carries): their RA
        cannot be measured, and over no counted sample the rate is NaN (not measured), never 0.
    """
    check_class_vectors(preds=preds, labels=labels, target_labels=target_labels)
    counted = (labels != target_labels) & (labels >= 0)
    return (preds[counted] == labels[counted]).sum(), counted.sum()


def defense_effectiveness_rating(
    undefended_ba: Tensor, undefended_asr: Tensor, defended_ba: Tensor, defended_asr: Tensor
) -> Tensor:
    """BackdoorBench's DER: ``(max(0, dASR) - max(0, dBA) + 1) / 2``, in [0, 1].

    ``dASR = undefended ASR - defended ASR`` is what the defense takes off the attack and ``dBA = undefended BA -
    defended BA`` what it costs in accuracy: the signs of Zhu et al. (FT-SAM, ICCV 2023), who introduced DER, and
    of ``defense_effectiveness_rate_simplied`` in BackdoorBench's ``utils/metric.py``, which its result plots
    use. 1: the whole ASR removed at no cost; 0.5: nothing removed and nothing lost; 0: nothing removed and all
    accuracy lost. A gain in BA or a rise in ASR counts as 0. NaN when a rate is NaN (not measured).

    Args:
        undefended_ba: BA of the model without the defense (scalar, in [0, 1]).
        undefended_asr: ASR of the model without the defense.
        defended_ba: BA with the defense.
        defended_asr: ASR with the defense.

    Returns:
        The rating as a float scalar tensor.
    """
    asr_drop = (torch.as_tensor(undefended_asr, dtype=torch.float64) - defended_asr).clamp(min=0)
    ba_drop = (torch.as_tensor(undefended_ba, dtype=torch.float64) - defended_ba).clamp(min=0)
    return ((asr_drop - ba_drop + 1) / 2).float()


class CountRatio(Metric):
    """``hits / total`` over every sample updated so far, both counts summed across processes.

    NaN while no sample has been counted: a rate over nothing is not 0 (an ASR of 0 would read as a perfect
    defense).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _count(self, hits: Tensor, total: Tensor) -> None:
        self.hits += hits
        self.total += total

    def compute(self) -> Tensor:
        if self.total == 0:
            return torch.tensor(float("nan"))
        return self.hits.float() / self.total


class BenignAccuracy(CountRatio):
    """Fraction of clean test images classified correctly."""

    higher_is_better = True

    def update(self, preds: Tensor, labels: Tensor) -> None:
        """Counts a batch: ``preds`` and ``labels`` are ``[N]`` class indices."""
        self._count(*benign_accuracy_counts(preds, labels))


class AttackSuccessRate(CountRatio):
    """Fraction of poisoned non-target-class test images classified as the attack's target."""

    higher_is_better = False

    def update(self, preds: Tensor, labels: Tensor, target_labels: Tensor) -> None:
        """Counts a batch: predictions on poisoned images, their true labels and the attack's targets, all ``[N]``."""
        self._count(*attack_success_counts(preds, labels, target_labels))


class RobustAccuracy(CountRatio):
    """Fraction of poisoned non-target-class test images classified as their true class."""

    higher_is_better = True

    def update(self, preds: Tensor, labels: Tensor, target_labels: Tensor) -> None:
        """Counts a batch: predictions on poisoned images, their true labels and the attack's targets, all ``[N]``."""
        self._count(*robust_accuracy_counts(preds, labels, target_labels))


class AnyClassAttackSuccessRate(Metric):
    """The largest share of triggered test images that any one class receives, among those not of that class.

    ``max_c hits[c] / total[c]`` over the counts of :func:`any_class_attack_counts`, summed across processes; at
    least the ASR (the target is one of the classes), and what an attacker finds by querying a deployed model
    whose trigger still works but lands elsewhere. NaN while no image of known class has been counted.

    Args:
        num_classes: Number of classes.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("hits", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor) -> None:
        """Counts a batch: predictions on triggered images and their true classes, both ``[N]``."""
        hits, total = any_class_attack_counts(preds, labels, self.num_classes)
        self.hits += hits
        self.total += total

    def per_class(self) -> Tensor:
        """``[num_classes]`` share of the other classes' triggered images each class receives (NaN: none counted)."""
        return torch.where(self.total > 0, self.hits.double() / self.total.clamp(min=1), float("nan"))

    def compute(self) -> Tensor:
        shares = self.per_class()
        if bool(shares.isnan().all()):
            return torch.tensor(float("nan"))
        return shares.nan_to_num(-1.0).max().float()


class Agreement(CountRatio):
    """Fraction of images on which two classifiers give the same class (no label is read)."""

    higher_is_better = True

    def update(self, preds: Tensor, reference_preds: Tensor) -> None:
        """Counts a batch: the classes two classifiers predict on the same images, both ``[N]``."""
        check_class_vectors(preds=preds, reference_preds=reference_preds)
        self._count((preds == reference_preds).sum(), torch.tensor(preds.numel(), device=preds.device))


def _ratio(hits: Tensor, total: Tensor) -> Tensor:
    """``hits / total`` as a float, NaN when ``total`` is 0."""
    return hits.double() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class DefenseEffectivenessRating(Metric):
    """DER (:func:`defense_effectiveness_rating`) of a defended classifier against the undefended one.

    Both classifiers are measured on the same batches: the BA counts of each on clean batches, the ASR counts
    of each on poisoned ones. The eight counts are summed across processes and the rates taken at compute time,
    so several processes give the DER of one process that saw every image.
    """

    full_state_update = False
    higher_is_better = True
    _RATES = ("undefended_ba", "undefended_asr", "defended_ba", "defended_asr")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for rate in self._RATES:
            self.add_state(f"{rate}_hits", default=torch.tensor(0), dist_reduce_fx="sum")
            self.add_state(f"{rate}_total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self, preds: Tensor, undefended_preds: Tensor, labels: Tensor, target_labels: Tensor | None = None
    ) -> None:
        """Counts a batch: a clean one without ``target_labels``, a poisoned one with them.

        Args:
            preds: ``[N]`` classes the defended classifier predicts.
            undefended_preds: ``[N]`` classes the undefended classifier predicts on the same images.
            labels: ``[N]`` true classes (before poisoning).
            target_labels: ``[N]`` the attack's target of each poisoned image; None for clean images.
        """
        if target_labels is None:
            counts = {
                "defended_ba": benign_accuracy_counts(preds, labels),
                "undefended_ba": benign_accuracy_counts(undefended_preds, labels),
            }
        else:
            counts = {
                "defended_asr": attack_success_counts(preds, labels, target_labels),
                "undefended_asr": attack_success_counts(undefended_preds, labels, target_labels),
            }
        for rate, (hits, total) in counts.items():
            setattr(self, f"{rate}_hits", getattr(self, f"{rate}_hits") + hits)
            setattr(self, f"{rate}_total", getattr(self, f"{rate}_total") + total)

    def compute(self) -> Tensor:
        rates = {rate: _ratio(getattr(self, f"{rate}_hits"), getattr(self, f"{rate}_total")) for rate in self._RATES}
        return defense_effectiveness_rating(**rates)


CLEAN_LOADER = 0
"""Index of the clean loader among a datamodule's validation / test loaders: ``(image, label)`` batches."""
POISONED_LOADER = 1
"""Index of the poisoned loader: ``(poisoned image, true label, target label)`` batches."""


class BackdoorMetrics(torch.nn.Module):
    """BA on the clean loader, ASR, any-class ASR and RA on the poisoned loader, for one classifier in one stage.

    Args:
        num_classes: Number of classes (the any-class ASR counts per class).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.ba = BenignAccuracy()
        self.asr = AttackSuccessRate()
        self.any_class_asr = AnyClassAttackSuccessRate(num_classes)
        self.ra = RobustAccuracy()

    def update(self, preds: Tensor, batch: tuple[Tensor, ...], dataloader_idx: int) -> dict[str, Metric]:
        """Updates the metrics of the loader ``dataloader_idx`` and returns them by name (for logging)."""
        if dataloader_idx == CLEAN_LOADER:
            self.ba.update(preds, batch[1])
            return {BA: self.ba}
        self.asr.update(preds, batch[1], batch[2])
        self.any_class_asr.update(preds, batch[1])
        self.ra.update(preds, batch[1], batch[2])
        return {ASR: self.asr, ANY_CLASS_ASR: self.any_class_asr, RA: self.ra}
