"""Label-consistent backdoor (Turner et al., 2019): adversarially perturbed target-class images with a trigger."""

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from refine_pl.architectures import build_architecture
from refine_pl.attacks.badnets import BadNets
from refine_pl.attacks.base import Attack, draw_indices, require_indices
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class LabelConsistent(Attack):
    """Poisons only images of the target class, which keep their (correct) label.

    A clean label would let the victim learn the target class from its content and ignore the trigger, so
    each poisoned image is first made hard to classify: :meth:`prepare` trains a clean surrogate model
    (``surrogate_arch``, ``surrogate_epochs`` epochs of Adam on the clean training set; adversarially, against
    one-step attacks of radius ``surrogate_epsilon`` with a random start, when that is above 0) and runs an
    untargeted L-infinity PGD attack (``pgd_steps`` steps of size ``pgd_step_size``, radius ``epsilon``,
    random start) against it on every poisoned image. The perturbations are rounded to whole 8-bit steps
    inside the epsilon ball; then the trigger, a ``trigger_size`` checkerboard in each of the four
    corners, is blended in at opacity ``trigger_amplitude``. At test the trigger alone is stamped on the clean
    image, at full amplitude: a victim that learned the faint training trigger responds the more to the full one.

    The perturbations are the attack's state (int16, in units of 1/255, with the indices they belong to),
    so a victim checkpoint holds everything needed to rebuild its poisoned training set.

    Args:
        target_label: The class the trigger should force, and the only class that is poisoned.
        poison_rate: Fraction of the whole training set that is poisoned (at most the target class's share).
        seed: Seed of the choice of samples, of the surrogate's training and of the PGD random start.
        epsilon: L-infinity radius of the adversarial perturbation (images in [0, 1]).
        pgd_steps: PGD iterations.
        pgd_step_size: PGD step; None for ``2.5 * epsilon / pgd_steps``.
        surrogate_arch: Registered architecture of the clean surrogate model.
        surrogate_epochs: Training epochs of the surrogate.
        surrogate_epsilon: L-infinity radius of the surrogate's adversarial training (0: standard training).
        trigger_size: Side of each corner checkerboard in pixels.
        trigger_amplitude: Opacity of the trigger on the poisoned training images, in (0, 1].
    """

    name = "lc"

    poison_rate: float = 0.08
    epsilon: float = 16 / 255
    pgd_steps: int = 20
    pgd_step_size: float | None = None
    surrogate_arch: str = "small_cnn"
    surrogate_epochs: int = 5
    surrogate_epsilon: float = 0.0
    trigger_size: int = 3
    trigger_amplitude: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.epsilon <= 1 or self.pgd_steps < 1 or self.surrogate_epochs < 1 or self.trigger_size < 1:
            raise ConfigError(
                "LC needs 0 < epsilon <= 1, pgd_steps >= 1, surrogate_epochs >= 1 and trigger_size >= 1, got "
                f"{self.epsilon}, {self.pgd_steps}, {self.surrogate_epochs}, {self.trigger_size}."
            )
        if not 0 < self.trigger_amplitude <= 1:
            raise ConfigError(f"LC needs trigger_amplitude in (0, 1], got {self.trigger_amplitude}.")
        if not 0 <= self.surrogate_epsilon < 1:
            raise ConfigError(
                f"LC needs surrogate_epsilon in [0, 1) (0: standard training), got {self.surrogate_epsilon}."
            )
        self._rows: dict[int, int] = {}  # training-set index -> row of self._perturbations
        self._poison_indices: Tensor | None = None
        self._perturbations: Tensor | None = None  # int16 [P, C, H, W], units of 1/255

    def select_poison_indices(self, labels: Tensor) -> Tensor:
        """``round(poison_rate * N)`` samples of the target class."""
        candidates = torch.nonzero(labels == self.target_label).flatten()
        count = round(self.poison_rate * len(labels))
        if count > len(candidates):
            raise ConfigError(
                f"lc poisons only target-class samples: poison_rate={self.poison_rate} asks for {count} but class "
                f"{self.target_label} has {len(candidates)}; lower poison_rate to at most "
                f"{len(candidates) / len(labels):.3f}."
            )
        return draw_indices(candidates, count, torch.Generator().manual_seed(self.seed))

    def trigger(self, channels: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """``(pattern [C, H, W], mask [1, H, W])``: a checkerboard in each corner."""
        parts = [
            BadNets(patch_size=self.trigger_size, location=corner, pattern="checkerboard").trigger(
                channels, height, width
            )
            for corner in CORNERS
        ]
        return torch.stack([p for p, _ in parts]).amax(0), torch.stack([m for _, m in parts]).amax(0)

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        return self._stamp(images, 1.0)

    def _stamp(self, images: Tensor, amplitude: float) -> Tensor:
        pattern, mask = self.trigger(*images.shape[1:])
        mask = mask.to(images) * amplitude
        return images * (1 - mask) + pattern.to(images) * mask

    def apply_training(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        indices = require_indices(self, images, indices)
        missing = [int(i) for i in indices if int(i) not in self._rows]
        if self._perturbations is None or missing:
            raise ConfigError(
                f"lc has no adversarial perturbation for training samples {missing[:5]}: the victim datamodule "
                "computes them (Attack.prepare) before poisoning, or they come from the victim checkpoint."
            )
        if self._perturbations.shape[1:] != images.shape[1:]:
            raise ConfigError(
                f"lc perturbations of shape {list(self._perturbations.shape[1:])} do not fit images of shape "
                f"{list(images.shape[1:])}: the victim checkpoint belongs to other data."
            )
        rows = torch.tensor([self._rows[int(i)] for i in indices])
        perturbed = (images + self._perturbations[rows].to(images) / 255.0).clamp(0, 1)
        return self._stamp(perturbed, self.trigger_amplitude)

    def prepare(self, train_set: Dataset, labels: Tensor, num_classes: int) -> None:
        """Trains the clean surrogate and computes the PGD perturbation of every poisoned sample."""
        indices = self.select_poison_indices(labels)
        images = torch.stack([train_set[int(i)][0] for i in indices])
        surrogate = self.train_surrogate(train_set, num_classes)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            chunks = zip(images.split(256), labels[indices].split(256), strict=True)
            adversarial = torch.cat([self._pgd(surrogate, chunk, chunk_labels) for chunk, chunk_labels in chunks])
        limit = math.floor(self.epsilon * 255 + 1e-6)  # rounding to 8 bits must not leave the epsilon ball
        perturbations = ((adversarial * 255).round() - (images * 255).round()).clamp(-limit, limit)
        self.load_state_dict({"poison_indices": indices, "perturbations": perturbations.to(torch.int16)})

    def train_surrogate(self, train_set: Dataset, num_classes: int) -> nn.Module:
        """The clean model the perturbations are computed against, trained from ``seed`` (frozen, eval mode)."""
        channels = train_set[0][0].shape[0]
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = build_architecture(self.surrogate_arch, num_classes, channels)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            loader = DataLoader(train_set, batch_size=128, shuffle=True)
            model.train()
            for _ in range(self.surrogate_epochs):
                for batch_images, batch_labels in loader:
                    if self.surrogate_epsilon > 0:
                        batch_images = self._fgsm(model, batch_images, batch_labels)
                    optimizer.zero_grad()
                    F.cross_entropy(model(batch_images), batch_labels).backward()
                    optimizer.step()
        return model.eval().requires_grad_(False)

    def _fgsm(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        radius = self.surrogate_epsilon
        delta = ((torch.rand_like(images) * 2 - 1) * radius).requires_grad_(True)
        loss = F.cross_entropy(model((images + delta).clamp(0, 1)), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + 1.25 * radius * grad.sign()).clamp(-radius, radius)
        return (images + delta).clamp(0, 1)

    def _pgd(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        step = self.pgd_step_size if self.pgd_step_size is not None else 2.5 * self.epsilon / self.pgd_steps
        delta = (torch.rand_like(images) * 2 - 1) * self.epsilon
        for _ in range(self.pgd_steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((images + delta).clamp(0, 1)), labels)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + step * grad.sign()).clamp(-self.epsilon, self.epsilon)
        return (images + delta).clamp(0, 1)

    def state_dict(self) -> dict[str, Any]:
        if self._perturbations is None:
            return {}
        return {"poison_indices": self._poison_indices, "perturbations": self._perturbations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        indices, perturbations = state.get("poison_indices"), state.get("perturbations")
        if (
            set(state) != {"poison_indices", "perturbations"}
            or not isinstance(indices, Tensor)
            or not isinstance(perturbations, Tensor)
            or indices.ndim != 1
            or perturbations.ndim != 4
            or indices.is_floating_point()
            or perturbations.is_floating_point()
            or len(indices) != len(perturbations)
        ):
            raise ConfigError(
                "lc state needs integer poison_indices [P] and perturbations [P, C, H, W] (units of 1/255), got "
                f"{ {key: getattr(value, 'shape', type(value).__name__) for key, value in state.items()} }."
            )
        self._poison_indices = indices.long()
        self._perturbations = perturbations.to(torch.int16)
        self._rows = {int(index): row for row, index in enumerate(self._poison_indices)}
