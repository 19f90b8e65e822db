"""The suspect model as a job uses it: its weights file read safely, checked against the data, frozen.

:func:`load_victim` reads the file once (:func:`~refine_pl.weights.read_weights_file`), builds the network from the
file's record, the architecture registry, the user's builder or the torch.export program, checks that it takes the
data's images, and returns the classifier with its :class:`VictimRecord`.
"""

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from refine_pl.architectures import build_architecture, import_builder, is_import_path
from refine_pl.archives import PT2_ARCH, ExportedNet
from refine_pl.attacks import Attack, attack_from_spec
from refine_pl.classifier import NormalizedClassifier, check_normalisation
from refine_pl.errors import ConfigError, cli_flag, first_sentence
from refine_pl.state_dicts import describe_key_mismatch, fitting_state_dict
from refine_pl.weights import WeightsFile, read_weights_file


@dataclass(frozen=True)
class VictimRecord:
    """What a job knows about its victim besides the weights: where they came from and what they were trained for.

    Attributes:
        path: The weights file, as given.
        sha256: Hex digest of the file's bytes; a REFINE checkpoint stores it instead of a copy of the victim,
            so a resumed or tested run can tell that it reads the same model.
        arch: Architecture: a registered or torchvision name, the import path the user gave, or
            :data:`~refine_pl.archives.PT2_ARCH` for a torch.export archive.
        attack: The attack record (spec and state) a refine-pl victim checkpoint carries; None for other files.
    """

    path: str
    sha256: str
    arch: str
    attack: dict[str, Any] | None = None

    def build_attack(self) -> Attack | None:
        """The attack the victim was trained with, rebuilt from the record alone, or None when it records none."""
        return None if self.attack is None else attack_from_spec(self.attack)


class LoadedVictim(NamedTuple):
    """What :func:`load_victim` returns: the frozen classifier and its record, from one read of the file."""

    classifier: NormalizedClassifier
    record: VictimRecord


def _check_agrees(path: Path, hparams: dict[str, Any], key: str, data_value: int) -> None:
    recorded = hparams.get(key)
    if recorded is not None and (type(recorded) is not int or recorded != data_value):
        raise ConfigError(
            f"Victim checkpoint {path} was trained with {key}={recorded} but the data has {key}={data_value}: "
            "use the dataset the victim was trained on, or a victim trained on this dataset."
        )


def check_victim_accepts(
    net: nn.Module, in_channels: int, image_size: int, arch: str, num_classes: int | None = None
) -> None:
    """Runs ``net`` on zero images of the data's shape (eval mode, no gradients), to refuse a misfit network early.

    A victim that cannot take the data's images then stops the job with one line instead of failing deep inside
    the first training step (VGG-16 at 28 px: 121 lines of traceback in Lightning's sanity check). A network from a
    torch.export archive also runs on a batch of 2, since its program may have been exported for one batch size.

    Args:
        net: The victim network (on normalised images), in any mode; its mode is restored.
        in_channels: Channels of the data.
        image_size: Image side of the data.
        arch: Architecture of the network, for the message.
        num_classes: Classes of the data, which must be the width of the logits (None: not checked).

    Raises:
        ConfigError: The forward pass fails or does not give ``[batch, num_classes]`` logits.
    """
    parameter = next(net.parameters(), None)
    was_training = net.training
    net.eval()
    flag = cli_flag("model", "victim_arch")
    try:
        for batch in (1, 2) if isinstance(net, ExportedNet) else (1,):
            image = torch.zeros(batch, in_channels, image_size, image_size)
            if parameter is not None:
                image = image.to(parameter)
            try:
                with torch.no_grad():
                    logits = net(image)
            except Exception as error:  # a too-small input fails in whichever layer shrinks it to nothing, as any type
                fix = (
                    f"export it for {in_channels}-channel {image_size}x{image_size} images with a dynamic batch "
                    "(dynamic_shapes=({0: torch.export.Dim('batch')},))"
                    if isinstance(net, ExportedNet)
                    else (
                        "use data of the image size this network was built for "
                        f"({cli_flag('data', 'source', 'image_size')} of a folder source) or another architecture "
                        f"({flag})"
                    )
                )
                in_batch = " in a batch of 2" if batch == 2 else ""
                raise ConfigError(
                    f"Victim architecture {arch!r} cannot take {in_channels}-channel {image_size}x{image_size} images"
                    f"{in_batch} ({first_sentence(error)}): {fix}."
                ) from error
            if not isinstance(logits, Tensor) or logits.ndim != 2 or len(logits) != batch:
                shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ConfigError(
                    f"Victim architecture {arch!r} gives {shape} for {batch} {image_size}x{image_size} image(s) "
                    f"instead of [{batch}, num_classes] logits: use another architecture ({flag})."
                )
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ConfigError(
                    f"Victim {arch!r} gives {logits.shape[1]} class scores but the data has {num_classes} classes: set "
                    f"{cli_flag('data', 'source', 'num_classes')} (or use the dataset the victim was trained for)."
                )
        if isinstance(net, ExportedNet):
            _check_frozen_program(net, in_channels, image_size, parameter)
    finally:
        net.train(was_training)


def _check_frozen_program(net: ExportedNet, in_channels: int, image_size: int, like: Tensor | None) -> None:
    """Refuses an exported program that changes its state or its answers when it runs.

    An exported graph fixes train / eval behaviour at export time, so one exported in training mode updates its
    batch-norm statistics on every call (it would not stay the frozen victim) and drops units at random.
    """
    images = torch.rand(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if like is not None:
        images = images.to(like)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    with torch.no_grad():
        first, second = net(images), net(images)
    changed = [name for name, value in net.state_dict().items() if not torch.equal(value, before[name])]
    if changed or not torch.equal(first, second):
        what = f"changes {', '.join(changed[:3])}" if changed else "gives different logits for the same images"
        raise ConfigError(
            f"The exported victim {what} when it runs: it was exported in training mode; export the classifier "
            "after model.eval()."
        )


def _victim_network(path: Path, weights: WeightsFile, arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """The network of ``arch`` with the file's weights loaded strictly (a torch.export archive brings its own)."""
    if weights.program is not None:
        return weights.program
    if is_import_path(arch):
        net = import_builder(arch)(num_classes, in_channels)
    else:
        net = build_architecture(arch, num_classes, in_channels)
    state_dict = fitting_state_dict(net.state_dict(), weights.state_dict)
    problem = describe_key_mismatch(net.state_dict(), state_dict)
    if problem is None:
        try:
            net.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            problem = " ".join(str(error).split())
    if problem is not None:
        raise ConfigError(
            f"The weights in {path} do not fit architecture {arch!r} built for {num_classes} classes and "
            f"{in_channels} input channels (the data's): {problem}. Check {cli_flag('model', 'victim_arch')} "
            "and the dataset."
        )
    return net


def _same_normalisation(first: tuple[Any, Any], second: tuple[Any, Any]) -> bool:
    """Whether two ``(mean, std)`` pairs hold the same numbers (up to float32 rounding)."""
    return all(
        len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7) for x, y in zip(a, b, strict=True))
        for a, b in zip(first, second, strict=True)
    )


def load_victim(
    path: str | Path,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    arch: str | None = None,
) -> LoadedVictim:
    """Builds the victim classifier and loads its weights safely, checking that it fits the data.

    Architecture and normalisation come from the checkpoint when it records them (a refine-pl victim),
    otherwise from ``arch`` and the data's ``mean`` / ``std``; a torch.export archive brings its own network. The
    file is read once; what it records besides the weights (the attack of a refine-pl victim, the file's digest)
    comes back with the classifier.

    ``arch`` may be an import path (``package.module:function``, see
    :func:`~refine_pl.architectures.import_builder`): the user's own code, imported because the user named it. A
    name read from the file is never imported, so a checkpoint that records an import path is refused unless
    ``arch`` repeats it.

    Args:
        path: Weights file (see :func:`read_weights_file`).
        num_classes: Classes of the data.
        in_channels: Channels of the data.
        image_size: Image side of the data.
        mean: Normalisation mean of the data, used when the checkpoint records none.
        std: Normalisation std of the data, used when the checkpoint records none.
        arch: Architecture: a registered or torchvision name, or an import path; required for plain state_dict
            and safetensors files, refused for a torch.export archive.

    Returns:
        The frozen classifier (eval mode, no gradients) and its :class:`VictimRecord`.

    Raises:
        ConfigError: Missing, damaged or unsafe file (see :func:`read_weights_file`), unknown or missing
            architecture, weights that do not fit the data's classes, channels or image size, a recorded
            normalisation without one value per channel, or a network that cannot take the data's image size.
    """
    path = Path(path)
    weights = read_weights_file(path)
    hparams = weights.hparams
    flag = cli_flag("model", "victim_arch")
    recorded_arch = hparams.get("arch")
    if weights.program is not None:
        if arch is not None:
            raise ConfigError(f"{path} is a torch.export archive, which holds its own network: drop {flag}.")
        recorded_arch = PT2_ARCH
    if recorded_arch is not None and not isinstance(recorded_arch, str):
        raise ConfigError(f"{path} records architecture {recorded_arch!r}, not a name: it is damaged; get it again.")
    if arch is not None and recorded_arch is not None and arch != recorded_arch:
        raise ConfigError(f"{flag} is {arch!r} but {path} records architecture {recorded_arch!r}; drop the flag.")
    if arch is None and recorded_arch is not None and is_import_path(recorded_arch):
        raise ConfigError(
            f"{path} records the import path {recorded_arch!r} as its architecture; refine-pl never imports code named "
            f"by a file: pass {flag} {recorded_arch} if you trust that code."
        )
    arch = arch or recorded_arch
    if arch is None:
        raise ConfigError(
            f"{path} holds bare weights without an architecture name: pass {flag} (a refine-pl or torchvision "
            "architecture name, or package.module:function for your own network)."
        )
    _check_agrees(path, hparams, "num_classes", num_classes)
    _check_agrees(path, hparams, "in_channels", in_channels)
    _check_agrees(path, hparams, "image_size", image_size)
    recorded_mean, recorded_std = hparams.get("mean"), hparams.get("std")
    if recorded_mean is not None or recorded_std is not None:
        data_normalisation = (tuple(mean), tuple(std))
        mean = mean if recorded_mean is None else recorded_mean
        std = std if recorded_std is None else recorded_std
        check_normalisation(mean, std, in_channels, f"Victim checkpoint {path}")
        if not _same_normalisation(data_normalisation, (mean, std)):
            warnings.warn(
                f"Victim checkpoint {path} records the normalisation it was trained with (mean {list(mean)}, std "
                f"{list(std)}), which is used; the data's (mean {list(data_normalisation[0])}, std "
                f"{list(data_normalisation[1])}) is not.",
                stacklevel=2,
            )
    net = _victim_network(path, weights, arch, num_classes, in_channels)
    check_victim_accepts(net, in_channels, image_size, arch, num_classes)
    classifier = NormalizedClassifier(net, mean, std, arch=arch)
    classifier.requires_grad_(False)
    record = VictimRecord(path=str(path), sha256=weights.sha256, arch=arch, attack=weights.attack_spec)
    return LoadedVictim(classifier.eval(), record)
