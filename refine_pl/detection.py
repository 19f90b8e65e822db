"""Catching triggered inputs at inference: the victim and the defended classifier disagree; STRIP as the baseline.

A REFINE deployment computes ``M(f(T(x)))`` and can compute the victim ``f(x)`` beside it. On a clean image the two
give the same class (that agreement is what REFINE trains for); on a triggered one the victim gives the attack's
target and the defended classifier does not. :func:`detection_score` turns the two models' logits on the same input
into a score (high: suspect; the KL divergence of the victim's prediction from the defended one),
:func:`label_free_threshold` picks the threshold from benign images alone at a target false-positive rate, and
:func:`calibrate_detector` does both on a defended classifier and a set of held-out benign images.
:func:`strip_entropy` is STRIP (Gao et al., ACSAC 2019) on the victim alone, the baseline. The metrics (AUROC, TPR
at a fixed FPR) are torchmetrics over the scores (:func:`detection_metrics`).
"""

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, BinaryROC

from refine_pl.classifier import DefendedClassifier

SCORE = "kl_victim_defended"
"""Name of :func:`detection_score`'s formula, recorded with every threshold so a later formula cannot reuse it."""

DEFAULT_FPR = 0.01
"""The target false-positive rate on benign images of the threshold refine-pl stores with a defended model."""

DETECTOR = "detector"
"""Key of the detector's calibration in ``report.json`` and in a defended file's description (``detector``)."""

STRIP_REPLICAS = 100
"""STRIP's number of perturbed copies of each input (N = 100 in Gao et al. and their released code)."""


def _check_logits(**logits: Tensor) -> None:
    shapes = {name: tuple(value.shape) for name, value in logits.items()}
    if any(len(shape) != 2 for shape in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"expected logits [N, num_classes] of one shape, got {shapes}")


def detection_score(victim_logits: Tensor, defended_logits: Tensor) -> Tensor:
    """How far the defended classifier's answer is from the victim's on each input (high: suspect), in nats, >= 0.

    The Kullback-Leibler divergence ``KL(p_f || p_D) = sum_c p_f(c) (log p_f(c) - log p_D(c))`` of the victim's
    softmax ``p_f`` from the defended classifier's ``p_D`` (whose classes are the victim's: REFINE trains
    ``M(f(T(x)))`` to give ``f(x)``'s class). A triggered input makes the victim sure of the target and the defended
    classifier put almost no mass there, so the term ``p_f(t) * -log p_D(t)`` is large; on a clean input the two
    distributions agree and the divergence is near 0. Unlike the plain disagreement of the classes it is graded (a
    threshold at 1 % FPR exists) and it also sees a trigger that only shifts the victim's probabilities.

    Chosen on the tuning attacks (``benchmarks/results/detection_tuning.md``, never the table's attacks) over the
    class disagreement, the victim's confidence times the defended rejection of its class, the total variation, the
    Jensen-Shannon divergence and the reverse KL: the highest mean (0.937) and worst (0.842) TPR at 1 % FPR over the
    eight tuning victims, with an AUROC (mean 0.994, worst 0.981) within 0.001 of the best.

    Args:
        victim_logits: ``[N, num_classes]`` logits of the victim ``f`` on the inputs.
        defended_logits: ``[N, num_classes]`` logits of the defended classifier on the same inputs.

    Returns:
        ``[N]`` float32 scores.
    """
    _check_logits(victim_logits=victim_logits, defended_logits=defended_logits)
    log_victim = victim_logits.float().log_softmax(1)
    log_defended = defended_logits.float().log_softmax(1)
    return (log_victim.exp() * (log_victim - log_defended)).sum(1).clamp_(min=0)


def label_free_threshold(benign_scores: Tensor, fpr: float = DEFAULT_FPR) -> float:
    """The threshold above which a score is flagged, chosen on benign scores alone for a false-positive rate ``fpr``.

    The ``k``-th largest benign score with ``k = floor(fpr * (n + 1))``: a new benign input from the same
    distribution then exceeds it with probability at most ``fpr`` (the split-conformal bound: it is the largest of
    ``n + 1`` exchangeable scores with probability ``1 / (n + 1)`` each rank), and within ``fpr`` up to sampling
    error. With fewer than ``1 / fpr - 1`` benign scores no such rank exists and the largest score is taken; its
    false-positive rate is then only bounded by ``1 / (n + 1)``.

    Args:
        benign_scores: ``[n]`` scores of benign inputs (no label is read).
        fpr: Target false-positive rate, in (0, 1).

    Raises:
        ValueError: No score, a score that is not finite, or ``fpr`` outside (0, 1).
    """
    if not 0 < fpr < 1:
        raise ValueError(f"the target false-positive rate must be in (0, 1), got {fpr}")
    scores = benign_scores.detach().flatten().double()
    if scores.numel() == 0 or not bool(torch.isfinite(scores).all()):
        raise ValueError(f"expected finite benign scores, got {scores.numel()} of which some are not finite")
    rank = max(1, math.floor(fpr * (scores.numel() + 1)))
    return float(scores.sort(descending=True).values[rank - 1])


def flag(scores: Tensor, threshold: float) -> Tensor:
    """``[N]`` bool: the scores above the threshold (:func:`label_free_threshold`)."""
    return scores > threshold


def defended_scores(defended: DefendedClassifier, images: Tensor) -> Tensor:
    """:func:`detection_score` of ``images`` ``[B, C, H, W]`` in [0, 1] under a defended classifier and its victim."""
    with torch.no_grad():
        return detection_score(defended.victim(images), defended(images)).cpu()


def calibrate_detector(
    defended: DefendedClassifier, batches: Iterable[Tensor], fpr: float = DEFAULT_FPR
) -> dict[str, Any] | None:
    """The detector's calibration on held-out benign images: threshold, target and measured false-positive rate.

    Args:
        defended: The defended classifier (its victim is ``defended.victim``).
        batches: Batches ``[B, C, H, W]`` of held-out benign images in [0, 1] on the classifier's device (no label).
        fpr: Target false-positive rate.

    Returns:
        ``score`` (:data:`SCORE`), ``threshold``, ``target_fpr``, ``benign_images`` and ``benign_fpr`` (the share of
        those images above the threshold: at most the target by construction; the false-positive rate on new benign
        images is measured on the test images), or None without images.
    """
    scores = [defended_scores(defended, batch) for batch in batches]
    if not scores or not sum(len(s) for s in scores):
        return None
    benign = torch.cat(scores)
    threshold = label_free_threshold(benign, fpr)
    return {
        "score": SCORE,
        "threshold": threshold,
        "target_fpr": fpr,
        "benign_images": len(benign),
        "benign_fpr": round(float(flag(benign, threshold).double().mean()), 6),
    }


def image_batches(dataset: Any, device: torch.device | str = "cpu", batch_size: int = 256) -> Iterable[Tensor]:
    """The images of a dataset whose items start with an image ``[C, H, W]`` in [0, 1], in batches on ``device``.

    Labels, when the items carry them, are dropped: the detector's calibration reads none.
    """
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items]).to(device)


def calibrate_on(defended: DefendedClassifier, dataset: Any, fpr: float = DEFAULT_FPR) -> dict[str, Any] | None:
    """:func:`calibrate_detector` on the images of ``dataset`` (a run's held-out benign set), or None without one."""
    if dataset is None or len(dataset) == 0:
        return None
    device = next(defended.parameters()).device
    was_training = defended.training
    defended.eval()
    try:
        return calibrate_detector(defended, image_batches(dataset, device), fpr)
    finally:
        defended.train(was_training)


def check_calibration(calibration: Any, where: str) -> dict[str, Any] | None:
    """The calibration recorded ``where`` when it is one refine-pl can use, else None (an unknown score, damage).

    A threshold is only meaningful for the score it was chosen for: a file whose ``score`` is not :data:`SCORE`
    gives no flags rather than wrong ones.
    """
    if not isinstance(calibration, dict) or calibration.get("score") != SCORE:
        return None
    threshold, fpr = calibration.get("threshold"), calibration.get("target_fpr")
    numbers = (threshold, fpr)
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) for n in numbers):
        return None
    return dict(calibration)


def superimpose(images: Tensor, benign: Tensor) -> Tensor:
    """STRIP's perturbation: every image plus every benign image, pixel by pixel, clipped to [0, 1].

    The released STRIP code blends with ``cv2.addWeighted(background, 1, overlay, 1, 0)``: both images at weight 1.

    Args:
        images: ``[B, C, H, W]`` inputs in [0, 1].
        benign: ``[N, C, H, W]`` held-out benign images in [0, 1].

    Returns:
        ``[B, N, C, H, W]``.
    """
    return (images[:, None] + benign[None]).clamp_(0, 1)


def prediction_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy in bits of each row's softmax, ``[..., num_classes]`` to ``[...]`` (0 log 0 = 0)."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1) / math.log(2)


def strip_entropy(victim: torch.nn.Module, images: Tensor, benign: Tensor, chunk: int = 500) -> Tensor:
    """STRIP's score of each input: the mean entropy of the victim's predictions on it superimposed with ``benign``.

    Low entropy means the prediction does not change whatever is laid over the input, as with a trigger that
    dominates; STRIP flags the inputs whose entropy is *below* a threshold, so :func:`strip_score` negates it for a
    score where high is suspect.

    Args:
        victim: The suspect classifier on images in [0, 1].
        images: ``[B, C, H, W]`` inputs in [0, 1].
        benign: ``[N, C, H, W]`` held-out benign images (N = :data:`STRIP_REPLICAS` in STRIP).
        chunk: Perturbed images per forward pass (500 ran the small CNN a third faster than 4000 on one CPU thread).

    Returns:
        ``[B]`` float32 entropies (bits).
    """
    per_image = max(1, chunk // len(benign))
    entropies = []
    with torch.no_grad():
        for start in range(0, len(images), per_image):
            perturbed = superimpose(images[start : start + per_image], benign)
            logits = victim(perturbed.flatten(0, 1)).view(*perturbed.shape[:2], -1)
            entropies.append(prediction_entropy(logits).mean(1))
    return torch.cat(entropies).cpu() if entropies else torch.zeros(0)


def strip_score(victim: torch.nn.Module, images: Tensor, benign: Tensor) -> Tensor:
    """``-`` :func:`strip_entropy`: high is suspect, so that STRIP's threshold is chosen like the detector's."""
    return -strip_entropy(victim, images, benign)


def detection_metrics(clean_scores: Tensor, triggered_scores: Tensor, fprs: Iterable[float] = (0.01, 0.05)) -> dict:
    """AUROC of triggered against clean inputs, and the TPR at each false-positive rate of ``fprs``.

    torchmetrics' :class:`~torchmetrics.classification.BinaryAUROC` and :class:`BinaryROC` (exact thresholds): the
    TPR at FPR ``a`` is the largest TPR among the ROC's points with FPR at most ``a``, i.e. of the best threshold a
    defender who knew the clean scores could pick. The label-free threshold is measured separately
    (:func:`rates_at`).

    Args:
        clean_scores: ``[N0]`` scores of clean inputs (negatives).
        triggered_scores: ``[N1]`` scores of triggered inputs (positives).
        fprs: False-positive rates.

    Returns:
        ``auroc`` and ``tpr_at_<100 a>`` (``tpr_at_1``, ``tpr_at_5``) as floats.
    """
    scores = score_ranks(torch.cat([clean_scores, triggered_scores]))
    target = torch.cat([torch.zeros(len(clean_scores)), torch.ones(len(triggered_scores))]).long()
    result = {"auroc": float(BinaryAUROC(thresholds=None)(scores, target))}
    fpr, tpr, _ = BinaryROC(thresholds=None)(scores, target)
    for rate in fprs:
        result[f"tpr_at_{round(rate * 100)}"] = float(tpr[fpr <= rate + 1e-12].max())
    return result


def score_ranks(scores: Tensor) -> Tensor:
    """The scores mapped to [0, 1] by their rank among the distinct values (ties kept): the same ROC.

    torchmetrics' binary metrics take inputs outside [0, 1] for logits and apply a sigmoid, which saturates to 1.0
    above about 37 (float64) and would tie every large divergence; ranks keep the order exactly.
    """
    distinct, inverse = torch.unique(scores.double(), return_inverse=True)
    return inverse.double() / max(1, len(distinct) - 1)


def rates_at(clean_scores: Tensor, triggered_scores: Tensor, threshold: float) -> dict[str, float]:
    """The false-positive rate on clean inputs and the true-positive rate on triggered ones at a fixed threshold."""
    return {
        "fpr": float(flag(clean_scores, threshold).double().mean()),
        "tpr": float(flag(triggered_scores, threshold).double().mean()),
    }
