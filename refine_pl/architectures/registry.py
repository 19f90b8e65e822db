"""Victim architectures by name: small builder functions registered with a decorator."""

from collections.abc import Callable

from torch import nn

from refine_pl.errors import ConfigError

Builder = Callable[[int, int, int], nn.Module]
"""``builder(num_classes, in_channels, image_size) -> network`` taking images already normalised."""

ARCHITECTURES: dict[str, Builder] = {}


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    """Decorator that makes a builder available as ``name``."""

    def register(builder: Builder) -> Builder:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture name {name!r} is registered twice")
        ARCHITECTURES[name] = builder
        return builder

    return register


def build_architecture(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Builds the registered architecture ``name`` for the given data shape."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"Unknown architecture {name!r}; known architectures: {', '.join(sorted(ARCHITECTURES))}.")
    return ARCHITECTURES[name](num_classes, in_channels, image_size)
