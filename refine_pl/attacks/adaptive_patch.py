"""Adaptive-Patch (Qi et al., 2023): several faint patch triggers, conservatism samples, stronger triggers at test."""

from dataclasses import dataclass

import torch
from torch import Tensor

from refine_pl.attacks.badnets import BadNets, Corner
from refine_pl.attacks.base import Attack, draw_cover_indices, require_indices, sample_generator
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError

MAX_TRIGGERS = 16
"""Most trigger locations Adaptive-Patch takes (the paper uses 4): each costs two image-sized tensors per batch."""


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class AdaptivePatch(Attack):
    """Patch triggers blended at low opacity, each training sample carrying one of them.

    There is one trigger per entry of ``locations``: a ``patch_size`` square of uniform noise drawn from
    ``seed``, in that corner. A poisoned training sample gets one trigger (drawn from ``(seed, index)``)
    blended at its entry of ``train_alphas`` and the target label; a conservatism (cover) sample gets a
    trigger the same way but keeps its true label, which keeps the poisoned samples' features close to the
    clean ones (the attack's point: no latent separation). At test only the triggers listed in
    ``test_triggers`` are stamped, together, at opacity ``test_alpha``: a trigger combination the victim
    never saw whole.

    Args:
        target_label: The class the trigger should force.
        poison_rate: Fraction of the training set that is poisoned.
        seed: Seed of the patterns, of the choice of samples and of each sample's trigger.
        conservatism_rate: Fraction of the training set that carries a trigger but keeps its label.
        patch_size: Side of each square patch in pixels.
        margin: Pixels between each patch and the image border.
        locations: Corner of each trigger.
        train_alphas: Opacity of each trigger in the training set.
        test_triggers: Indices (into ``locations``) of the triggers stamped at test.
        test_alpha: Opacity of the test triggers.
    """

    name = "adaptive_patch"

    poison_rate: float = 0.05
    conservatism_rate: float = 0.05
    patch_size: int = 4
    margin: int = 1
    locations: list[Corner] | None = None
    train_alphas: list[float] | None = None
    test_triggers: list[int] | None = None
    test_alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.locations = list(self.locations or ["top_left", "top_right", "bottom_left", "bottom_right"])
        self.train_alphas = list(self.train_alphas or [0.5, 0.2, 0.5, 0.3])
        self.test_triggers = list(self.test_triggers if self.test_triggers is not None else [0, 3])
        if not 1 <= len(self.locations) <= MAX_TRIGGERS:
            raise ConfigError(f"Adaptive-Patch takes 1 to {MAX_TRIGGERS} trigger locations, got {len(self.locations)}.")
        if len(self.train_alphas) != len(self.locations) or not all(0 < alpha <= 1 for alpha in self.train_alphas):
            raise ConfigError(
                "Adaptive-Patch needs one train alpha in (0, 1] per location, got "
                f"{self.train_alphas} for {self.locations}."
            )
        if (
            not self.test_triggers
            or len(set(self.test_triggers)) != len(self.test_triggers)
            or not all(0 <= i < len(self.locations) for i in self.test_triggers)
        ):
            raise ConfigError(
                f"Adaptive-Patch test_triggers {self.test_triggers} must index the {len(self.locations)} locations, "
                "each at most once."
            )
        if not 0 <= self.conservatism_rate < 1 or not 0 < self.test_alpha <= 1:
            raise ConfigError(
                f"Adaptive-Patch needs conservatism_rate in [0, 1) and test_alpha in (0, 1], got "
                f"{self.conservatism_rate}, {self.test_alpha}."
            )

    def triggers(self, channels: int, height: int, width: int) -> list[tuple[Tensor, Tensor]]:
        """``(pattern [C, H, W], mask [1, H, W])`` of every trigger, in the order of ``locations``."""
        generator = torch.Generator().manual_seed(self.seed)
        triggers = []
        for location in self.locations:
            placement = BadNets(patch_size=self.patch_size, location=location, margin=self.margin)
            _, mask = placement.trigger(channels, height, width)
            triggers.append((torch.rand(channels, height, width, generator=generator) * mask, mask))
        return triggers

    @staticmethod
    def _blend(images: Tensor, pattern: Tensor, mask: Tensor, alpha: float) -> Tensor:
        return images + alpha * mask.to(images) * (pattern.to(images) - images)

    def trigger_of(self, index: int) -> int:
        """Which trigger the training sample at ``index`` carries."""
        return int(torch.randint(len(self.locations), (1,), generator=sample_generator(self.seed, index)))

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        triggers = self.triggers(*images.shape[1:])
        for i in self.test_triggers:
            images = self._blend(images, *triggers[i], self.test_alpha)
        return images

    def apply_training(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        indices = require_indices(self, images, indices)
        triggers = self.triggers(*images.shape[1:])
        poisoned = []
        for image, index in zip(images, indices.tolist(), strict=True):
            chosen = self.trigger_of(index)
            poisoned.append(self._blend(image, *triggers[chosen], self.train_alphas[chosen]))
        return torch.stack(poisoned)

    apply_cover = apply_training

    def select_cover_indices(self, labels: Tensor, poison_indices: Tensor) -> Tensor:
        """``round(conservatism_rate * N)`` samples of any class that are not poisoned."""
        return draw_cover_indices(self, len(labels), poison_indices, round(self.conservatism_rate * len(labels)))
