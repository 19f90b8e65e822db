"""Loading a suspect model's weights without ever executing code from the file.

Weights come from a third party, so a file is read either with safetensors or with
``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain containers and refuses
anything else (a class, a function, a ``__reduce__`` payload). A torch.export archive (``.pt2``) brings its own
network and is read by :func:`refine_pl.archives.load_exported_program`, which checks it before torch reads it;
TorchScript archives are refused (see :mod:`refine_pl.archives` for what each format can run when loaded).
"""

import hashlib
import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from refine_pl.architectures import build_architecture, import_builder, is_import_path
from refine_pl.archives import PT2_ARCH, ExportedNet, archive_kind, load_exported_program, refuse_archive
from refine_pl.attacks import Attack, attack_from_spec
from refine_pl.classifier import NormalizedClassifier, check_normalisation
from refine_pl.errors import ConfigError, cli_flag, first_sentence
from refine_pl.internals import archive_records
from refine_pl.state_dicts import describe_key_mismatch, strip_prefixes

ATTACK_KEY = "backdoor_attack"
"""Key under which a victim checkpoint stores the spec of the attack it was trained with."""


@dataclass
class WeightsFile:
    """What a weights file holds.

    Attributes:
        state_dict: The network's weights, key prefixes (``net.``, ``module.``, ``model.``) removed.
        hparams: Hyper-parameters recorded by a refine-pl victim checkpoint (architecture, classes,
            channels, image size, normalisation); empty for a plain ``state_dict`` or safetensors file.
        attack_spec: The attack a refine-pl victim was trained with (spec and state), if any.
        sha256: Hex digest of the file's bytes.
        program: The network of a torch.export archive, weights included (``state_dict`` is then empty).
    """

    state_dict: dict[str, Tensor]
    hparams: dict[str, Any] = field(default_factory=dict)
    attack_spec: dict[str, Any] | None = None
    sha256: str = ""
    program: ExportedNet | None = None


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


_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
"""How a file of ``torch.save(..., _use_new_zipfile_serialization=False)`` starts: pickle protocol 2, then
torch's magic number 0x1950a86a20f9469cfc6c."""

WEIGHTS_FORMATS = {
    "empty": "an empty file (0 bytes)",
    "zip": "a zip archive (the format of torch.save, torch.export.save and torch.jit.save)",
    "torch-legacy": "a torch.save file in the legacy (pre-1.6) format",
    "pickle": "a plain Python pickle, not written by torch.save",
    "safetensors": "a safetensors file",
    "hdf5": "an HDF5 file (Keras / TensorFlow weights?)",
    "gzip": "a gzip-compressed file",
    "other": "of no weights format refine-pl knows",
}
"""What :func:`sniff_weights_format` can say about a file, in words."""

_SAVE_ADVICE = "save the suspect model's weights with torch.save(model.state_dict(), path) or as safetensors"


def sniff_weights_format(data: bytes) -> str:
    """What a weights file is, from its first bytes (a key of :data:`WEIGHTS_FORMATS`), whatever its name."""
    head = data[:16]
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return "zip"
    if head.startswith(_TORCH_LEGACY_MAGIC[: len(head)]) and len(head) >= 4:
        return "torch-legacy"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header; a truncated file still starts so
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    return "other"


def _torch_load(path: Path, data: bytes, kind: str) -> Any:
    """``torch.load(data, weights_only=True)`` with every failure turned into one line saying what the file is."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None and "global" not in str(error).lower() and "reduce" not in str(error).lower():
            raise ConfigError(
                f"{path} is {WEIGHTS_FORMATS[kind]} whose pickled content is damaged "
                f"({first_sentence(error)}): get the file again, or {_SAVE_ADVICE}."
            ) from error
        what = f" ({found.group(1)})" if found else ""
        raise ConfigError(
            f"Refusing to load {path}: it holds Python objects{what} beyond tensors and plain containers, and "
            f"unpickling them could run code from the file. Ask for the weights as a state_dict "
            "(torch.save(model.state_dict(), path)) or as safetensors."
        ) from error
    except Exception as error:  # torch raises many types (RuntimeError, EOFError, KeyError, ...) on damaged files
        raise ConfigError(
            f"{path} is {WEIGHTS_FORMATS[kind]} that cannot be read ({first_sentence(error)}): it is truncated or "
            f"damaged; get the file again, or {_SAVE_ADVICE}."
        ) from error


def _checked_state_dict(path: Path, content: dict) -> dict[str, Tensor]:
    """``content`` when it maps names to dense, real, finite tensors, else a ConfigError that says what it holds."""
    for key, value in content.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            nested = [
                k
                for k, v in content.items()
                if isinstance(v, dict) and v and all(isinstance(t, Tensor) for t in v.values())
            ]
            fix = (
                f"the weights may be under {nested[0]!r}: torch.save(checkpoint[{nested[0]!r}], path)" if nested else ""
            )
            raise ConfigError(
                f"{path} holds {key!r} of type {type(value).__name__}, not a tensor, so it is not a state_dict or a "
                f"refine-pl victim checkpoint: {fix or _SAVE_ADVICE}."
            )
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_complex() or value.is_quantized:
            kind = f"{value.layout} {value.device.type} {value.dtype}".replace("torch.", "")
            raise ConfigError(
                f"{path} holds {key} as a {kind} tensor; victim weights are dense real-valued tensors: {_SAVE_ADVICE}."
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(
                f"{path} holds NaN or infinite values in {key}: the model is broken (e.g. its training diverged) and "
                "would give NaN logits; get a working copy of the weights."
            )
    return content


def read_weights_file(path: str | Path) -> WeightsFile:
    """Reads a refine-pl victim checkpoint, a plain ``state_dict``, a safetensors file or a .pt2 archive, safely.

    The file is opened once: its bytes are hashed and parsed from memory. The format is told by the first
    bytes (:func:`sniff_weights_format`) and, for zip archives, by the records torch's reader lists, not the name:
    safetensors is read with safetensors, torch.save's zip files with ``torch.load(weights_only=True)``,
    torch.export archives with :func:`~refine_pl.archives.load_exported_program`, and nothing else is read at all
    (TorchScript and legacy torch.save files are refused with what to do instead). Every floating tensor must be
    finite.

    Raises:
        ConfigError: The file is missing, empty, truncated or damaged, of another format, holds Python objects
            that would need unpickling or code that loading would run, or holds something other than finite
            tensors by name.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{path} is a directory: pass {cli_flag('model', 'victim_checkpoint')} the weights file itself."
        )
    if not path.is_file():
        raise ConfigError(
            f"Victim weights not found at {path}: pass {cli_flag('model', 'victim_checkpoint')} with the path of the "
            "suspect model (a refine-pl victim .ckpt, a state_dict saved with torch.save, or a .safetensors file)."
        )
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    kind = sniff_weights_format(data)
    if kind == "safetensors":
        try:
            tensors = load_safetensors(data)
        except Exception as error:  # safetensors raises its own error types for a damaged header or data
            raise ConfigError(
                f"{path} is a safetensors file that cannot be read ({first_sentence(error)}): it is truncated or "
                "damaged; get the file again."
            ) from error
        return WeightsFile(state_dict=strip_prefixes(_checked_state_dict(path, tensors)), sha256=sha256)
    if kind == "torch-legacy":
        # torch's legacy loader allocates every storage at the size the pickle declares before it compares that
        # size with the data (a 400-byte file can ask for gigabytes); the zip format checks first.
        raise ConfigError(
            f"Refusing to read {path}: it is {WEIGHTS_FORMATS[kind]}, whose loader trusts the sizes the file "
            "declares. Convert it once with a current torch, which writes the zip format: "
            "torch.save(torch.load(path, weights_only=True), new_path)."
        )
    if kind != "zip":
        raise ConfigError(
            f"Refusing to read {path}: it is {WEIGHTS_FORMATS[kind]}; refine-pl reads torch.save files and "
            f"safetensors only (and never unpickles other files): {_SAVE_ADVICE}."
        )
    records = archive_records(data)
    archive = "zip" if records is None else archive_kind(records)
    if archive in ("torchscript", "pt2-legacy"):
        raise refuse_archive(path, archive)
    if archive == "pt2":
        program = load_exported_program(path, data, records)
        _checked_state_dict(path, dict(program.state_dict()))
        return WeightsFile(state_dict={}, sha256=sha256, program=program)
    content = _torch_load(path, data, kind)
    if not isinstance(content, dict):
        raise ConfigError(f"{path} holds a {type(content).__name__}, not a state_dict or a checkpoint.")
    if isinstance(content.get("state_dict"), dict):  # a Lightning checkpoint
        hparams, attack_spec = content.get("hyper_parameters") or {}, content.get(ATTACK_KEY)
        if not isinstance(hparams, dict) or not (attack_spec is None or isinstance(attack_spec, dict)):
            raise ConfigError(
                f"{path} has a 'hyper_parameters' or {ATTACK_KEY!r} entry that is not a dict: it is not a refine-pl "
                f"victim checkpoint: {_SAVE_ADVICE}."
            )
        return WeightsFile(
            state_dict=strip_prefixes(_checked_state_dict(path, content["state_dict"])),
            hparams=dict(hparams),
            attack_spec=attack_spec,
            sha256=sha256,
        )
    return WeightsFile(state_dict=strip_prefixes(_checked_state_dict(path, content)), sha256=sha256)


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
                    else f"use data of a larger image size or another architecture ({flag})"
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
    problem = describe_key_mismatch(net.state_dict(), weights.state_dict)
    if problem is None:
        try:
            net.load_state_dict(weights.state_dict, strict=True)
        except RuntimeError as error:
            problem = " ".join(str(error).split())
    if problem is not None:
        raise ConfigError(
            f"The weights in {path} do not fit architecture {arch!r} built for {num_classes} classes and "
            f"{in_channels} input channels (the data's): {problem}. Check {cli_flag('model', 'victim_arch')} "
            "and the dataset."
        )
    return net


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
        mean = mean if recorded_mean is None else recorded_mean
        std = std if recorded_std is None else recorded_std
        check_normalisation(mean, std, in_channels, f"Victim checkpoint {path}")
    net = _victim_network(path, weights, arch, num_classes, in_channels)
    check_victim_accepts(net, in_channels, image_size, arch, num_classes)
    classifier = NormalizedClassifier(net, mean, std, arch=arch)
    classifier.requires_grad_(False)
    record = VictimRecord(path=str(path), sha256=weights.sha256, arch=arch, attack=weights.attack_spec)
    return LoadedVictim(classifier.eval(), record)
