"""The REFINE objective on one batch, as a pure function of the transform, the victim and the remap."""

from collections.abc import Callable
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


class RefineTerms(NamedTuple):
    """The terms of :func:`refine_objective` (scalars) and the transformed batch they were computed on.

    Attributes:
        loss: ``utility + contrastive_weight * contrastive``.
        utility: The utility loss of ``M(f(T(x)))`` against the pseudo-labels.
        contrastive: The supervised contrastive loss of the flattened, L2-normalised ``T(x)``.
        transformed: ``T(x)``, ``[B, C, H, W]``.
    """

    loss: Tensor
    utility: Tensor
    contrastive: Tensor
    transformed: Tensor


def refine_objective(
    images: Tensor,
    pseudo_labels: Tensor,
    transform: Callable[[Tensor], Tensor],
    victim: Callable[[Tensor], Tensor],
    remap: Callable[[Tensor], Tensor],
    utility_loss: Callable[[Tensor, Tensor], Tensor],
    contrastive_loss: Callable[[Tensor, Tensor], Tensor],
    contrastive_weight: float,
) -> RefineTerms:
    """REFINE's loss of the transform ``T`` on a batch of unlabeled images (the pseudo-labels given).

    The utility loss asks the defended classifier ``remap(victim(T(x)))`` to predict each image's pseudo-label (the
    victim's class of the untransformed image); the contrastive loss groups the flattened, L2-normalised ``T(x)`` by
    pseudo-label. Both :class:`~refine_pl.RefineLitModule` and the adaptive attack that plays the defender
    (:class:`~refine_pl.attacks.RefineInTheLoop`) train their transform with it. Runs in the caller's precision
    (under autocast the features are normalised in float32; both losses compute in float32).

    Args:
        images: ``[B, C, H, W]`` images in [0, 1] that ``T`` transforms.
        pseudo_labels: ``[B]`` long, the victim's predictions (of the images or of their un-augmented originals).
        transform: ``T``, images to images of the same shape.
        victim: ``f``, images to ``[B, K]`` logits.
        remap: ``M``, ``[B, K]`` victim logits to ``[B, K]`` defended logits.
        utility_loss: ``(defended logits [B, K], pseudo-labels [B]) -> scalar`` (e.g. :class:`UtilityLoss`).
        contrastive_loss: ``(features [B, D], pseudo-labels [B]) -> scalar`` (e.g. :class:`SupConLoss`).
        contrastive_weight: Weight of the contrastive loss in ``loss``.
    """
    transformed = transform(images)
    utility = utility_loss(remap(victim(transformed)), pseudo_labels)
    features = F.normalize(transformed.flatten(1).float(), dim=1)
    contrastive = contrastive_loss(features, pseudo_labels)
    return RefineTerms(utility + contrastive_weight * contrastive, utility, contrastive, transformed)
