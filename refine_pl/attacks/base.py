"""The interface every backdoor attack implements, and the registry of attacks by name."""

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from refine_pl.errors import ConfigError


class Attack(ABC):
    """A deterministic, seedable backdoor attack on images in [0, 1].

    The same object poisons a victim's training set and builds the poisoned test set, so both always
    carry the same trigger. Its :meth:`spec` (name + constructor arguments, plain values only) is stored
    in the victim checkpoint and :func:`attack_from_spec` rebuilds an identical attack from it.

    Subclasses keep every constructor argument as an attribute of the same name, which is what
    :meth:`spec` records.

    Args:
        target_label: The class the trigger should force.
        poison_rate: Fraction of the training set that is poisoned.
        seed: Seed of every random choice the attack makes (which samples, per-sample randomness).
    """

    name: ClassVar[str]
    """Registry name, used in specs and checkpoints."""
    training_controlled: ClassVar[bool] = False
    """True when the attacker also controls the victim's training loop (not only its data)."""

    def __init__(self, target_label: int = 0, poison_rate: float = 0.1, seed: int = 0) -> None:
        if target_label < 0:
            raise ConfigError(f"target_label must be a class index >= 0, got {target_label}.")
        if not 0.0 < poison_rate <= 1.0:
            raise ConfigError(f"poison_rate must be in (0, 1], got {poison_rate}.")
        self.target_label = target_label
        self.poison_rate = poison_rate
        self.seed = seed

    @abstractmethod
    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """Poisons a batch of images.

        Args:
            images: ``[B, C, H, W]`` float images in [0, 1].
            indices: ``[B]`` dataset indices of the images, which seed any per-sample randomness so the
                same sample is always poisoned the same way. Attacks without randomness ignore them.

        Returns:
            ``[B, C, H, W]`` poisoned images in [0, 1].
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
        generator = torch.Generator().manual_seed(self.seed)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        return chosen.sort().values

    def poisoned_label(self, label: int) -> int:
        """The label a poisoned training sample gets."""
        return self.target_label

    def spec(self) -> dict[str, Any]:
        """Name and constructor arguments, enough for :func:`attack_from_spec` to rebuild this attack."""
        parameters = inspect.signature(type(self).__init__).parameters
        init_args = {key: getattr(self, key) for key in parameters if key != "self"}
        return {"name": self.name, "init_args": init_args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec()["init_args"].items())
        return f"{type(self).__name__}({args})"


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator that makes an attack available by its ``name``."""
    if cls.name in ATTACKS:
        raise ValueError(f"attack name {cls.name!r} is registered twice")
    ATTACKS[cls.name] = cls
    return cls


def attack_class(name: str) -> type[Attack]:
    """The attack class registered as ``name``."""
    if name not in ATTACKS:
        raise ConfigError(f"Unknown attack {name!r}; known attacks: {', '.join(sorted(ATTACKS))}.")
    return ATTACKS[name]


def attack_from_spec(spec: dict[str, Any]) -> Attack:
    """Rebuilds an attack from :meth:`Attack.spec` output (for example read from a victim checkpoint)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"An attack spec must be a dict with a 'name' key, got {spec!r}.")
    cls = attack_class(spec["name"])
    try:
        return cls(**spec.get("init_args", {}))
    except TypeError as error:
        raise ConfigError(f"Attack spec {spec!r} does not fit {cls.__name__}: {error}.") from error
