"""Victim architectures by name: small builder functions registered with a decorator, with their native size.

A name is looked up in refine-pl's own registry first, then among torchvision's classification models
(``torchvision.models.list_models(module=torchvision.models)``: 80 in torchvision 0.29, from ``alexnet`` to
``wide_resnet101_2``), which are built by ``torchvision.models.get_model`` without pretrained weights. Either
lookup runs only code installed with refine-pl or torchvision, so a name read from a file is safe to resolve.
A user's own builder given by import path (:func:`import_builder`) runs the user's code, so it is only ever
taken from the command line, never from a file.
"""

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from refine_pl.errors import ConfigError, cli_flag, first_sentence
from refine_pl.registry import Registry

Builder = Callable[[int, int], nn.Module]
"""``builder(num_classes, in_channels) -> network`` taking images already normalised."""


@dataclass(frozen=True)
class Architecture:
    """A registered architecture.

    Attributes:
        name: Registry name (``--model.init_args.arch``, ``victim_arch``).
        builder: Builds the network for a class and channel count.
        native_size: Image side the architecture is designed for (its stem and pooling assume it); others
            may work, a too small one fails when the victim is loaded.
    """

    name: str
    builder: Builder
    native_size: int


ARCHITECTURES: Registry[Architecture] = Registry(
    "architecture",
    " and torchvision's classification models (torchvision.models.list_models(module=torchvision.models)); your own "
    f"network is passed by import path ({cli_flag('model', 'victim_arch')} package.module:function).",
)
"""refine-pl's own architectures by name (:func:`architecture` also finds torchvision's)."""


def register_architecture(name: str, native_size: int) -> Callable[[Builder], Builder]:
    """Decorator that registers a builder in :data:`ARCHITECTURES` as ``name``, for ``native_size`` px images."""

    def register(builder: Builder) -> Builder:
        ARCHITECTURES.add(Architecture(name, builder, native_size))
        return builder

    return register


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models (not its detection, segmentation, video or quantized ones)."""
    return list_models(module=torchvision.models)


def _torchvision_architecture(name: str) -> Architecture:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        if in_channels != 3:
            raise ConfigError(
                f"torchvision's {name} takes 3-channel (RGB) images but the data has {in_channels} channel(s): use "
                f"RGB data, or your own builder by import path ({cli_flag('model', 'victim_arch')} "
                "package.module:function)."
            )
        return get_model(name, weights=None, num_classes=num_classes)

    crop_size = getattr(get_model_weights(name).DEFAULT.transforms(), "crop_size", [224])
    return Architecture(name, build, native_size=int(crop_size[0]))


def architecture(name: str) -> Architecture:
    """The architecture called ``name``: refine-pl's own, else torchvision's classification model of that name.

    Raises:
        ConfigError: No such name (the message lists refine-pl's names and says where torchvision's are).
    """
    if name not in ARCHITECTURES and name in torchvision_classifiers():
        return _torchvision_architecture(name)
    return ARCHITECTURES[name]


def build_architecture(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Builds the architecture ``name`` (see :func:`architecture`) for ``num_classes`` classes, ``in_channels``."""
    return architecture(name).builder(num_classes, in_channels)


def is_import_path(name: str) -> bool:
    """Whether ``name`` names a builder by import path (``package.module:function``) rather than by name."""
    return ":" in name


def import_builder(path: str) -> Builder:
    """The user's own network builder at ``path`` (``package.module:attribute``), imported from installed code.

    The attribute is a function or class returning an ``nn.Module`` that takes images already normalised and gives
    ``[B, num_classes]`` logits. It is called with whichever of ``num_classes`` and ``in_channels`` it declares as
    parameters (both when it takes ``**kwargs``), so ``torchvision.models:mobilenet_v3_small`` or a plain
    ``def build(num_classes): ...`` both work. Importing runs the module's code: only call this for a path the user
    gave on the command line or in Python, never for one read from a file.

    Raises:
        ConfigError: The path is malformed, the module cannot be imported, the attribute is missing or not callable.
    """
    module_name, _, attribute = path.partition(":")
    flag = cli_flag("model", "victim_arch")
    if not module_name or not attribute:
        raise ConfigError(f"{flag} {path!r} is not an import path of the form package.module:function.")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{flag} {path!r}: cannot import {module_name!r} ({first_sentence(error)}); install the package, or run "
            "from the folder that holds the module with PYTHONPATH=. set."
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{flag} {path!r}: module {module_name!r} has no attribute {attribute!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{flag} {path!r} is a {type(target).__name__}, not a function or class building a network.")
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def build(num_classes: int, in_channels: int) -> nn.Module:
        given = {"num_classes": num_classes, "in_channels": in_channels}
        net = target(**{k: v for k, v in given.items() if takes_any or k in parameters})
        if not isinstance(net, nn.Module):
            raise ConfigError(f"{flag} {path!r} returned a {type(net).__name__}, not a torch.nn.Module.")
        return net

    return build
