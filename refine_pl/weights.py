"""Reading a suspect model's weights file without ever executing code from it.

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
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from refine_pl.archives import ExportedNet, archive_kind, load_exported_program, refuse_archive
from refine_pl.errors import ConfigError, cli_flag, first_sentence
from refine_pl.internals import archive_records

ATTACK_KEY = "backdoor_attack"
"""Key under which a victim checkpoint stores the spec of the attack it was trained with."""

VICTIM_KEY = "victim"
"""Key under which a defense's checkpoint identifies its victim (the weights file's sha256 and path) instead of
holding a copy of the victim's weights; a file with it is a defense's checkpoint, never a suspect model."""

DEFENDED_TENSORS = ("remap.permutation", "transform.")
"""The remap and the transform's prefix, which every defended classifier file (``defended.safetensors``, written by
:func:`refine_pl.export.export_defended`) holds: such a file is the defended model, never a suspect one."""


@dataclass
class WeightsFile:
    """What a weights file holds.

    Attributes:
        state_dict: The network's weights, keys as the file holds them (matched to a network by
            :func:`~refine_pl.state_dicts.fitting_state_dict`).
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
        remap, transform = DEFENDED_TENSORS
        if remap in tensors and any(name.startswith(transform) for name in tensors):
            raise ConfigError(
                f"{path} is a defended classifier exported by refine-pl (transform, victim and remap), not a suspect "
                f"model: pass {cli_flag('model', 'victim_checkpoint')} the model it was defended from; use this file "
                "with refine-pl-predict or refine_pl.export.load_defended."
            )
        return WeightsFile(state_dict=_checked_state_dict(path, tensors), sha256=sha256)
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
    if isinstance(content.get(VICTIM_KEY), dict):
        victim = content[VICTIM_KEY].get("path")
        raise ConfigError(
            f"{path} is a checkpoint of a refine-pl defense (trained in front of the victim {victim}), not a suspect "
            f"model: pass {cli_flag('model', 'victim_checkpoint')} that victim, and this file with --ckpt_path."
        )
    if isinstance(content.get("state_dict"), dict):  # a Lightning checkpoint
        hparams, attack_spec = content.get("hyper_parameters") or {}, content.get(ATTACK_KEY)
        if not isinstance(hparams, dict) or not (attack_spec is None or isinstance(attack_spec, dict)):
            raise ConfigError(
                f"{path} has a 'hyper_parameters' or {ATTACK_KEY!r} entry that is not a dict: it is not a refine-pl "
                f"victim checkpoint: {_SAVE_ADVICE}."
            )
        return WeightsFile(
            state_dict=_checked_state_dict(path, content["state_dict"]),
            hparams=dict(hparams),
            attack_spec=attack_spec,
            sha256=sha256,
        )
    return WeightsFile(state_dict=_checked_state_dict(path, content), sha256=sha256)
