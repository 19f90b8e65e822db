"""The fixed output remapping M of REFINE: a random derangement of the class indices."""

import torch
from torch import Tensor, nn

from refine_pl.errors import ConfigError


def draw_derangement(num_classes: int, generator: torch.Generator) -> Tensor:
    """Draws a uniformly random permutation of ``range(num_classes)`` with no fixed point.

    Args:
        num_classes: Number of classes, at least 2.
        generator: Source of randomness; the same seed gives the same derangement.

    Returns:
        Long tensor ``perm`` of shape ``[num_classes]`` with ``perm[c] != c`` for every ``c``.
    """
    if num_classes < 2:
        raise ConfigError(f"REFINE needs at least 2 classes to remap, got num_classes={num_classes}.")
    identity = torch.arange(num_classes)
    while True:  # rejection sampling: about e draws on average
        perm = torch.randperm(num_classes, generator=generator)
        if not bool((perm == identity).any()):
            return perm


class OutputRemap(nn.Module):
    """Maps the victim's class scores to the defended classifier's class scores.

    Victim class ``c`` becomes defended class ``permutation[c]``. The permutation is a registered buffer:
    it is drawn once from ``seed`` at construction, saved in every ``state_dict`` and checkpoint, and on
    load it is overwritten by the saved value; nothing ever draws it again.

    Args:
        num_classes: Number of classes of the victim.
        seed: Seed of the derangement.
        derange: False keeps every class in place (the identity: REFINE's ablation without the remap).
    """

    permutation: Tensor

    def __init__(self, num_classes: int, seed: int = 0, derange: bool = True) -> None:
        super().__init__()
        if derange:
            permutation = draw_derangement(num_classes, torch.Generator().manual_seed(seed))
        else:
            permutation = torch.arange(num_classes)
        self.register_buffer("permutation", permutation)

    @property
    def num_classes(self) -> int:
        return self.permutation.numel()

    def forward(self, scores: Tensor) -> Tensor:
        """Reorders victim scores ``[B, C]`` so that column ``permutation[c]`` holds victim column ``c``."""
        return scores.index_select(1, torch.argsort(self.permutation))
