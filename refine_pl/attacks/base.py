"""The interface every backdoor attack implements, and the seeded sampling helpers attacks share."""

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from refine_pl.errors import ConfigError


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The random generator of one sample: seeded from ``(seed, index)``, so a sample is always poisoned alike.

    ``numpy.random.SeedSequence`` mixes the two numbers, so nearby seeds and indices give unrelated streams.
    """
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def draw_indices(candidates: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` of ``candidates`` drawn without replacement, sorted."""
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values


def draw_cover_indices(attack: "Attack", num_samples: int, poison_indices: Tensor, count: int) -> Tensor:
    """``count`` cover samples of any class outside ``poison_indices``, drawn from the attack's seed, sorted."""
    free = torch.ones(num_samples, dtype=torch.bool)
    free[poison_indices] = False
    candidates = torch.nonzero(free).flatten()
    if count > len(candidates):
        raise ConfigError(
            f"{attack.name} asks for {count} cover samples besides {len(poison_indices)} poisoned ones, but the "
            f"training set has {num_samples} samples; lower poison_rate or the cover share."
        )
    return draw_indices(candidates, count, torch.Generator().manual_seed(attack.seed + 1))


def require_indices(attack: "Attack", images: Tensor, indices: Tensor | None) -> Tensor:
    """The dataset indices of a batch, for attacks with per-sample randomness (which need them)."""
    if indices is None or len(indices) != len(images):
        raise ValueError(
            f"{attack.name} draws per-sample randomness from each image's dataset index: pass indices [B] "
            f"with the {len(images)} images."
        )
    return indices


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The constructor arguments of ``cls``: an attack's settings, the fields of its dataclass, base's first."""
    return dict(inspect.signature(cls).parameters)


@dataclass(eq=False, repr=False, kw_only=True)
class Attack(ABC):
    """A deterministic, seedable backdoor attack on images in [0, 1].

    The same object poisons a victim's training set and builds the poisoned test set, so both always
    carry the same trigger. Its :meth:`spec` (name + constructor arguments, plain values only) and its
    :meth:`state_dict` (what it computed or learned: tensors and plain values) are stored in the victim
    checkpoint by :func:`attack_record`, and :func:`attack_from_spec` rebuilds an identical attack from them.

    Training a victim with an attack:

    1. :meth:`prepare` sees the training set once (e.g. to train a surrogate model);
    2. :meth:`select_poison_indices` picks the samples that get :meth:`apply_training` and
       :meth:`poisoned_label`;
    3. :meth:`select_cover_indices` picks the samples that get :meth:`apply_cover` but keep their true
       label (WaNet's noise samples, Adaptive-Patch's conservatism samples; none by default).

    Attacks that also control the training loop derive from :class:`TrainingControlledAttack`.

    An attack is a dataclass whose fields are its settings, the constructor arguments that :meth:`spec`
    records: a subclass is a ``@dataclass(eq=False, repr=False, kw_only=True)`` too (identity, hashing and
    :meth:`__repr__` stay the base's; settings are passed by name), declares its own settings as fields,
    redeclares a base field to change its default, checks them in ``__post_init__`` after calling
    ``super().__post_init__()``, and creates there what it computes later (caches, networks).

    Args:
        target_label: The class the trigger should force.
        poison_rate: Fraction of the training set that is poisoned.
        seed: Seed of every random choice the attack makes (which samples, per-sample randomness).
    """

    name: ClassVar[str]
    """Registry name, used in specs and checkpoints."""
    training_controlled: ClassVar[bool] = False
    """True when the attacker also controls the victim's training loop (not only its data)."""

    target_label: int = 0
    poison_rate: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_label < 0:
            raise ConfigError(f"target_label must be a class index >= 0, got {self.target_label}.")
        if not 0.0 < self.poison_rate <= 1.0:
            raise ConfigError(f"poison_rate must be in (0, 1], got {self.poison_rate}.")
        if not 0 <= self.seed < 2**63:  # what numpy's SeedSequence and torch's generators both take
            raise ConfigError(f"An attack's seed must be in [0, 2**63), got {self.seed}.")

    @abstractmethod
    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """Poisons a batch of test images: what the attacker does at inference time.

        Args:
            images: ``[B, C, H, W]`` float images in [0, 1].
            indices: ``[B]`` dataset indices of the images, which seed any per-sample randomness so the
                same sample is always poisoned the same way. Attacks without randomness ignore them.

        Returns:
            ``[B, C, H, W]`` poisoned images in [0, 1].
        """

    def apply_training(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """Poisons a batch of training images chosen by :meth:`select_poison_indices` (default: :meth:`apply`)."""
        return self.apply(images, indices)

    def apply_cover(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """Modifies a batch of cover samples chosen by :meth:`select_cover_indices`, which keep their label."""
        raise NotImplementedError(f"{self.name} selects no cover samples, so it has nothing to apply to them.")

    def prepare(self, train_set: Dataset, labels: Tensor, num_classes: int) -> None:  # noqa: B027 (optional hook)
        """Lets the attack compute what it needs from the victim's training set, once, before poisoning it.

        Args:
            train_set: The clean training set; items are ``(float image [C, H, W] in [0, 1], int label)``.
            labels: ``[N]`` its labels.
            num_classes: Number of classes of the data.
        """

    def select_poison_indices(self, labels: Tensor) -> Tensor:
        """Chooses which training samples are poisoned: ``round(poison_rate * N)`` of the non-target ones.

        Args:
            labels: ``[N]`` true labels of the training set.

        Returns:
            Sorted ``[round(poison_rate * N)]`` long tensor of indices into the training set.
        """
        candidates = torch.nonzero(labels != self.target_label).flatten()
        count = round(self.poison_rate * len(labels))
        if count > len(candidates):
            raise ConfigError(
                f"{self.name}: poison_rate={self.poison_rate} asks for {count} poisoned samples but only "
                f"{len(candidates)} training samples are outside the target class {self.target_label}; "
                "lower poison_rate."
            )
        return draw_indices(candidates, count, torch.Generator().manual_seed(self.seed))

    def select_cover_indices(self, labels: Tensor, poison_indices: Tensor) -> Tensor:
        """Chooses the cover samples (modified, label kept), disjoint from ``poison_indices``; none by default."""
        return torch.zeros(0, dtype=torch.long)

    def poisoned_label(self, label: int) -> int:
        """The label a poisoned training sample gets."""
        return self.target_label

    def state_dict(self) -> dict[str, Any]:
        """What the attack computed or learned that rebuilding it needs (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""
        if state:
            raise ConfigError(f"{self.name} keeps no state, but the spec carries some: {sorted(state)}.")

    def pending_files(self) -> list[str]:
        """Paths the attack would still read from disk (a pattern image not read yet).

        None once its state holds what it read; :func:`attack_from_spec` refuses an attack rebuilt from a record
        that still has some.
        """
        return []

    def spec(self) -> dict[str, Any]:
        """Name and constructor arguments, enough for :func:`attack_from_spec` to rebuild this attack."""
        init_args = {setting.name: getattr(self, setting.name) for setting in fields(self)}
        return {"name": self.name, "init_args": init_args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec()["init_args"].items())
        return f"{type(self).__name__}({args})"


class TrainingControlledAttack(Attack):
    """An attack whose author also controls the victim's training loop, not only its data.

    The victim's datamodule then gives clean training batches; :class:`~refine_pl.VictimLitModule` passes
    every batch through :meth:`training_batch`, adds the loss it returns, registers :meth:`networks` as a
    submodule (so they follow the device, are synchronised across processes and saved) and optimises them
    with the parameter groups of :meth:`parameter_groups`. At the start of every training epoch it calls
    :meth:`on_train_epoch_start` with the victim classifier (an attack that trains something through the current
    victim does it there). Networks an attack adds to :meth:`networks` later must be in its :meth:`state_dict`, so
    that a resumed victim gets them back.
    """

    training_controlled: ClassVar[bool] = True

    @abstractmethod
    def networks(self) -> nn.Module:
        """Every network of the attack, trainable or not."""

    @abstractmethod
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the attack's trainable parameters (with their own settings)."""

    def on_train_epoch_start(self, classifier: nn.Module, epoch: int) -> None:
        """Called by the victim at the start of every training epoch, before its first batch (nothing by default).

        Args:
            classifier: The victim classifier being trained (images in [0, 1] to logits), in training mode; an
                attack that uses it leaves its mode, weights and gradients as they were.
            epoch: The epoch about to start, from 0.
        """

    @abstractmethod
    def training_batch(self, images: Tensor, labels: Tensor, classifier: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Turns a clean training batch into the victim's batch.

        Args:
            images: ``[B, C, H, W]`` clean images in [0, 1].
            labels: ``[B]`` their labels.
            classifier: The victim classifier being trained (images in [0, 1] to logits), for attacks whose batch
                or loss depends on it.

        Returns:
            ``(images [B', C, H, W], labels [B'], attack_loss scalar)``: the victim's cross-entropy covers the
            returned images (``B'`` may differ from ``B``) and it adds ``attack_loss`` to it.
        """
