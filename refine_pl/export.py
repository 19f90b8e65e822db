"""The defended classifier ``M(f(T(x)))`` as one safetensors file, and loading it back without Lightning.

After REFINE the defended classifier is what a user deploys. :func:`export_defended` writes the weights of
the transform, the frozen victim and the remap permutation to a ``.safetensors`` file, with what is needed
to rebuild the modules (victim architecture, data shape, normalisation, U-Net size) as JSON in the file's
metadata. :func:`load_defended` rebuilds the classifier from the registry and loads the weights; no code
is ever read from the file (safetensors holds tensors and strings only).
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from refine_pl.architectures import ARCHITECTURES, build_architecture
from refine_pl.classifier import DefendedClassifier, NormalizedClassifier, check_normalisation
from refine_pl.errors import ConfigError
from refine_pl.remap import OutputRemap
from refine_pl.transform import UNet
from refine_pl.weights import check_victim_accepts, describe_key_mismatch

FORMAT = "refine-pl-defended-classifier/1"
"""Value of the ``format`` metadata key, versioned so that a later layout can still read this one."""

DESCRIPTION_BOUNDS = {
    "num_classes": (2, 100_000),  # ImageNet-21k, the largest common label set, has 21,841 classes
    "in_channels": (1, 64),  # RGB, grayscale, RGB-D and multispectral images stay far below 64 bands
    "image_size": (1, 4096),
}
"""Inclusive bounds of the integer metadata: a file outside them is refused before any module is built, since
the modules' size follows from these numbers (a 5 MB file claiming 1e9 classes would ask for a terabyte)."""

TRANSFORM_BOUNDS = {"base_width": (1, 1024), "depth": (1, 8)}
"""Inclusive bounds of the U-Net's recorded size (the reference uses width 64, depth 4)."""


def _description(defended: DefendedClassifier, image_size: int) -> dict[str, Any]:
    transform, victim = defended.transform, defended.victim
    if not isinstance(transform, UNet):
        raise ConfigError(
            f"Export rebuilds the transform from its size, which it knows for refine_pl.transform.UNet only; this "
            f"run's transform is {type(transform).__name__}: save the LightningModule's checkpoint instead."
        )
    if victim.arch is None:
        raise ConfigError(
            "Export needs the victim's registered architecture name, and this victim was not built from the "
            "registry: load it with refine_pl.weights.load_victim."
        )
    if bool((defended.remap.permutation == torch.arange(defended.remap.num_classes)).any()):
        raise ConfigError(
            "Export writes REFINE's defended classifier, whose remap moves every class; this run's remap leaves "
            "classes in place (the no-remap ablation): remove ExportDefendedClassifier from its callbacks."
        )
    return {
        "format": FORMAT,
        "victim_arch": victim.arch,
        "num_classes": defended.remap.num_classes,
        "in_channels": transform.in_channels,
        "image_size": image_size,
        "mean": victim.mean.flatten().tolist(),
        "std": victim.std.flatten().tolist(),
        "transform": {"base_width": transform.base_width, "depth": transform.depth},
    }


def export_defended(defended: DefendedClassifier, image_size: int, path: str | Path) -> Path:
    """Writes the defended classifier to ``path`` (a ``.safetensors`` file) and returns the path.

    Args:
        defended: The defended classifier: a trained :class:`~refine_pl.transform.UNet`, the frozen victim as
            :func:`~refine_pl.weights.load_victim` builds it, and the remap the transform was trained with.
        image_size: Image side of the data the victim was built for.
        path: Output file.

    Raises:
        ConfigError: The transform is not a UNet, the victim does not record its architecture, or the remap is not a
            derangement (what :func:`load_defended` accepts).
    """
    description = _description(defended, image_size)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in defended.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"refine_pl": json.dumps(description)})
    return path


def _open(path: Path) -> Any:
    """``safe_open`` on ``path`` (reads the header only), with the errors a user can act on."""
    if not path.is_file():
        raise ConfigError(f"No defended classifier at {path}: export one with a REFINE run (defended.safetensors).")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own error types for a malformed header
        raise ConfigError(f"{path} is not a safetensors file ({error}).") from error


def _recorded_description(path: Path, file: Any) -> dict[str, Any]:
    try:
        description = json.loads((file.metadata() or {}).get("refine_pl", "{}"))
    except ValueError as error:
        raise ConfigError(
            f"{path} has damaged refine-pl metadata (not JSON: {error}): export the model again."
        ) from error
    found = description.get("format") if isinstance(description, dict) else None
    if found != FORMAT:
        raise ConfigError(
            f"{path} is not a refine-pl defended classifier (format {found!r}, expected {FORMAT!r}); a victim's "
            "weights load with --model.init_args.victim_checkpoint instead."
        )
    check_description(path, description)
    return description


def _check_int(path: Path, key: str, value: Any, bounds: tuple[int, int]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not bounds[0] <= value <= bounds[1]:
        raise ConfigError(
            f"{path} records {key}={value!r}, which is not an integer in [{bounds[0]}, {bounds[1]}]: the file is "
            "damaged or was not written by refine-pl's export; export the model again."
        )


def check_description(path: Path, description: dict[str, Any]) -> None:
    """Checks the metadata of a defended classifier file before anything is built from it.

    Schema (exactly the keys :func:`export_defended` writes), types, the bounds of
    :data:`DESCRIPTION_BOUNDS` and :data:`TRANSFORM_BOUNDS`, a registered architecture, and one normalisation
    value per channel.

    Raises:
        ConfigError: The metadata does not describe a classifier refine-pl can build.
    """
    expected = {"format", "victim_arch", "num_classes", "in_channels", "image_size", "mean", "std", "transform"}
    if set(description) != expected:
        raise ConfigError(
            f"{path} has metadata keys {sorted(description)}, expected {sorted(expected)}: the file is damaged or "
            "was not written by refine-pl's export; export the model again."
        )
    for key, bounds in DESCRIPTION_BOUNDS.items():
        _check_int(path, key, description[key], bounds)
    arch = description["victim_arch"]
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ConfigError(
            f"{path} records victim architecture {arch!r}, which this refine-pl does not know (known: "
            f"{', '.join(sorted(ARCHITECTURES))}): load it with the refine-pl version that exported it."
        )
    check_normalisation(description["mean"], description["std"], description["in_channels"], str(path))
    transform = description["transform"]
    if not isinstance(transform, dict) or set(transform) != set(TRANSFORM_BOUNDS):
        raise ConfigError(f"{path} records transform={transform!r}, expected the keys base_width and depth.")
    for key, bounds in TRANSFORM_BOUNDS.items():
        _check_int(path, f"transform.{key}", transform[key], bounds)


def check_remap(path: Path, permutation: Tensor, num_classes: int) -> None:
    """Refuses a remap that is not a derangement of ``range(num_classes)`` (a long ``[num_classes]`` tensor).

    An identity or repeated entry would let the backdoor's class through or merge classes, silently.
    """
    if (
        permutation.dtype != torch.long
        or permutation.shape != (num_classes,)
        or not torch.equal(permutation.sort().values, torch.arange(num_classes))
    ):
        raise ConfigError(
            f"{path} holds a remap.permutation of dtype {permutation.dtype} and shape {list(permutation.shape)} that "
            f"is not a permutation of the {num_classes} classes: the file is damaged; export the model again."
        )
    fixed = torch.nonzero(permutation == torch.arange(num_classes)).flatten().tolist()
    if fixed:
        raise ConfigError(
            f"{path} holds a remap that leaves classes {fixed[:5]} in place; REFINE's remap moves every class: the "
            "file is damaged or was edited; export the model again."
        )


def _modules(description: dict[str, Any]) -> tuple[NormalizedClassifier, UNet]:
    """The victim and the transform that ``description`` records, with fresh weights."""
    arch, num_classes = description["victim_arch"], description["num_classes"]
    net = build_architecture(arch, num_classes, description["in_channels"])
    victim = NormalizedClassifier(net, description["mean"], description["std"], arch=arch)
    return victim, UNet(description["in_channels"], **description["transform"])


def read_description(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_defended` wrote to ``path`` (the file's header only is read).

    Raises:
        ConfigError: The file is missing, not safetensors, not a refine-pl defended classifier, or its metadata
            fails :func:`check_description`.
    """
    path = Path(path)
    with _open(path) as file:
        return _recorded_description(path, file)


def load_defended(path: str | Path) -> DefendedClassifier:
    """Rebuilds the defended classifier written by :func:`export_defended`, in eval mode.

    Nothing is built before the metadata has passed :func:`check_description`, and the real modules are built
    only once modules built without memory (on the ``meta`` device) have the shapes of the file's tensors, so
    the memory used is bounded by the file's size. The remap must pass :func:`check_remap` and every floating
    tensor must be finite.

    Raises:
        ConfigError: See :func:`read_description`; also when the weights do not fit the recorded modules, the
            remap is not a derangement, a weight is NaN or infinite, or the victim cannot take the recorded
            image size.
    """
    path = Path(path)
    with _open(path) as file:
        description = _recorded_description(path, file)
        try:
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (no __iter__)
        except Exception as error:  # safetensors raises its own error types for damaged tensor data
            raise ConfigError(f"{path} has damaged tensor data ({error}): export the model again.") from error
    with torch.device("meta"):
        victim, transform = _modules(description)
    expected = {
        **{f"victim.{key}": value for key, value in victim.state_dict().items()},
        **{f"transform.{key}": value for key, value in transform.state_dict().items()},
        "remap.permutation": torch.empty(description["num_classes"], dtype=torch.long, device="meta"),
    }
    problem = describe_key_mismatch(expected, tensors)
    if problem is not None:
        raise ConfigError(f"The weights in {path} do not fit its recorded modules: {problem}.")
    check_remap(path, tensors["remap.permutation"], description["num_classes"])
    for name, tensor in tensors.items():
        if tensor.is_floating_point() != expected[name].is_floating_point():
            raise ConfigError(
                f"{path} holds {name} as {tensor.dtype}, expected {expected[name].dtype}: export it again."
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"{path} holds NaN or infinite values in {name}: the file is damaged; export it again.")
    victim, transform = _modules(description)
    defended = DefendedClassifier(transform, victim, OutputRemap(description["num_classes"]))
    defended.load_state_dict(tensors, strict=True)
    defended.requires_grad_(False)
    check_victim_accepts(victim.net, description["in_channels"], description["image_size"], description["victim_arch"])
    return defended.eval()
