"""The defended classifier ``M(f(T(x)))`` as files: safetensors (rebuilt by refine-pl), ONNX and TorchScript.

After REFINE the defended classifier is what a user deploys. :func:`export_defended` writes the weights of
the transform, the frozen victim and the remap permutation to a ``.safetensors`` file, with what is needed
to rebuild the modules as JSON in the file's metadata. :func:`load_defended` rebuilds the classifier and loads
the weights; no code is ever read from the file (safetensors holds tensors and strings only). How the victim is
rebuilt depends on what it was:

- a refine-pl or torchvision architecture: by its name, with the file's weights;
- the user's own builder given by import path: the file records the path, and :func:`load_defended` imports it
  only when its caller passes the same path (``victim_arch``), since a name read from a file must never decide
  which code runs;
- a torch.export archive: the file holds the archive's bytes as a ``uint8`` tensor (``victim_archive``), read back
  with the same checks as the original (:func:`refine_pl.archives.load_exported_program`).

:func:`export_onnx` and :func:`export_torchscript` write the same computation for runtimes without refine-pl
(onnxruntime, libtorch). Those files do not check their input: give them float images in [0, 1] of the recorded
size.
"""

import contextlib
import copy
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from refine_pl.architectures import architecture, build_architecture, import_builder, is_import_path
from refine_pl.archives import PT2_ARCH, ExportedNet, load_exported_program
from refine_pl.classifier import DefendedClassifier, NormalizedClassifier, check_normalisation
from refine_pl.detection import check_calibration
from refine_pl.errors import ConfigError
from refine_pl.internals import archive_records
from refine_pl.remap import OutputRemap
from refine_pl.state_dicts import describe_key_mismatch
from refine_pl.transform import UNet
from refine_pl.victims import check_victim_accepts

FORMAT = "refine-pl-defended-classifier/2"
"""Value of the ``format`` metadata key, versioned so that a later layout can still read this one."""

READABLE_FORMATS = {
    "refine-pl-defended-classifier/1": {
        "format", "victim_arch", "num_classes", "in_channels", "image_size", "mean", "std", "transform",
    },
    FORMAT: {
        "format", "victim_arch", "num_classes", "in_channels", "image_size", "mean", "std", "transform",
        "class_names", "crop",
    },
}  # fmt: skip
"""The metadata keys of each format :func:`load_defended` reads; version 1 files have no class names and were
centre-cropped."""

DETECTOR_KEY = "detector"
"""Optional field of a defended file's description (its one metadata entry, ``refine_pl``) that holds the detector's
calibration (:func:`refine_pl.detection.calibrate_detector`: score, threshold, target and benign false-positive
rate); files without it are read as before. Inside the one entry, not an entry of its own: safetensors writes its
metadata entries in no fixed order, and two entries would make the same export give different bytes."""

ARCHIVE_KEY = "victim_archive"
"""Tensor of a defended file that holds the bytes of a torch.export victim archive (``uint8 [N]``)."""

DESCRIPTION_BOUNDS = {
    "num_classes": (2, 100_000),  # ImageNet-21k, the largest common label set, has 21,841 classes
    "in_channels": (1, 64),  # RGB, grayscale, RGB-D and multispectral images stay far below 64 bands
    "image_size": (1, 4096),
}
"""Inclusive bounds of the integer metadata: a file outside them is refused before any module is built, since
the modules' size follows from these numbers (a 5 MB file claiming 1e9 classes would ask for a terabyte)."""

TRANSFORM_BOUNDS = {"base_width": (1, 1024), "depth": (1, 8)}
"""Inclusive bounds of the U-Net's recorded size (the reference uses width 64, depth 4)."""

MAX_CLASS_NAME = 200
"""Longest class name a defended file may record (characters)."""

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")

ONNX_OPSET = 20
"""ONNX opset of :func:`export_onnx`: the one torch's exporter writes natively (no version conversion), run by
onnxruntime 1.17 and later."""

ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000
"""Weights above this size go to ``<file>.data`` beside the ONNX file: one protobuf file cannot exceed 2 GB."""


def _description(
    defended: DefendedClassifier, image_size: int, class_names: list[str] | None, crop: bool
) -> dict[str, Any]:
    transform, victim = defended.transform, defended.victim
    if not isinstance(transform, UNet):
        raise ConfigError(
            f"Export rebuilds the transform from its size, which it knows for refine_pl.transform.UNet only; this "
            f"run's transform is {type(transform).__name__}: save the LightningModule's checkpoint instead."
        )
    if victim.arch is None:
        raise ConfigError(
            "Export needs the victim's architecture, and this victim does not record one: load it with "
            "refine_pl.victims.load_victim."
        )
    num_classes = defended.remap.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(f"Export got {len(class_names)} class names for {num_classes} classes.")
    if bool((defended.remap.permutation == torch.arange(num_classes)).any()):
        raise ConfigError(
            "Export writes REFINE's defended classifier, whose remap moves every class; this run's remap leaves "
            "classes in place (the no-remap ablation): remove ExportDefendedClassifier from its callbacks."
        )
    return {
        "format": FORMAT,
        "victim_arch": victim.arch,
        "num_classes": num_classes,
        "in_channels": transform.in_channels,
        "image_size": image_size,
        "mean": victim.mean.flatten().tolist(),
        "std": victim.std.flatten().tolist(),
        "transform": {"base_width": transform.base_width, "depth": transform.depth},
        "class_names": None if class_names is None else [str(name) for name in class_names],
        "crop": crop,
    }


def export_defended(
    defended: DefendedClassifier,
    image_size: int,
    path: str | Path,
    class_names: list[str] | None = None,
    crop: bool = True,
    detector: dict[str, Any] | None = None,
) -> Path:
    """Writes the defended classifier to ``path`` (a ``.safetensors`` file) and returns the path.

    Args:
        defended: The defended classifier: a trained :class:`~refine_pl.transform.UNet`, the frozen victim as
            :func:`~refine_pl.victims.load_victim` builds it, and the remap the transform was trained with.
        image_size: Image side of the data the victim was built for.
        path: Output file.
        class_names: Name of each class, recorded for predictions (None: the data has none).
        crop: Whether images of another size are brought to ``image_size`` by resizing the shorter side and
            centre-cropping (else by stretching), as the data source did; recorded for predictions.
        detector: The detector's calibration on the run's held-out benign images
            (:func:`refine_pl.detection.calibrate_detector`), recorded in the description under :data:`DETECTOR_KEY`
            for predictions' ``flagged`` column (None: not recorded).

    Raises:
        ConfigError: The transform is not a UNet, the victim does not record its architecture, or the remap is not a
            derangement (what :func:`load_defended` accepts).
    """
    description = _description(defended, image_size, class_names, crop)
    state = defended.state_dict()
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    if isinstance(defended.victim.net, ExportedNet):
        tensors = {name: tensor for name, tensor in tensors.items() if not name.startswith("victim.")}
        tensors[ARCHIVE_KEY] = torch.from_numpy(np.frombuffer(defended.victim.net.archive, dtype=np.uint8).copy())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if detector is not None:
        description[DETECTOR_KEY] = detector
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
    except (ValueError, RecursionError) as error:  # a RecursionError: nesting deeper than the parser's stack
        reason = "nested too deeply" if isinstance(error, RecursionError) else f"not JSON: {error}"
        raise ConfigError(f"{path} has damaged refine-pl metadata ({reason}): export the model again.") from error
    found = description.get("format") if isinstance(description, dict) else None
    if found not in READABLE_FORMATS:
        raise ConfigError(
            f"{path} is not a refine-pl defended classifier (format {found!r}, expected {FORMAT!r}); a victim's "
            "weights load with --model.init_args.victim_checkpoint instead."
        )
    check_description(path, description)
    return {"class_names": None, "crop": True, **description}


def _check_int(path: Path, key: str, value: Any, bounds: tuple[int, int]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not bounds[0] <= value <= bounds[1]:
        raise ConfigError(
            f"{path} records {key}={value!r}, which is not an integer in [{bounds[0]}, {bounds[1]}]: the file is "
            "damaged or was not written by refine-pl's export; export the model again."
        )


def _check_victim_arch(path: Path, arch: Any) -> None:
    if isinstance(arch, str) and (arch == PT2_ARCH or _IMPORT_PATH.fullmatch(arch)):
        return
    try:
        if isinstance(arch, str):
            architecture(arch)
            return
    except ConfigError:
        pass
    raise ConfigError(
        f"{path} records victim architecture {arch!r}, which this refine-pl does not know (a refine-pl or "
        "torchvision name, an import path or 'pt2'): load it with the refine-pl version that exported it."
    )


def check_description(path: Path, description: dict[str, Any]) -> None:
    """Checks the metadata of a defended classifier file before anything is built from it.

    Schema (exactly the keys :func:`export_defended` writes for the file's format), types, the bounds of
    :data:`DESCRIPTION_BOUNDS` and :data:`TRANSFORM_BOUNDS`, a known kind of architecture, one normalisation
    value per channel, and one class name (at most :data:`MAX_CLASS_NAME` characters) per class.

    Raises:
        ConfigError: The metadata does not describe a classifier refine-pl can build.
    """
    expected = READABLE_FORMATS.get(description.get("format"), READABLE_FORMATS[FORMAT])
    if set(description) - {DETECTOR_KEY} != expected:
        raise ConfigError(
            f"{path} has metadata keys {sorted(description)}, expected {sorted(expected)} (and optionally "
            f"{DETECTOR_KEY!r}): the file is damaged or "
            "was not written by refine-pl's export; export the model again."
        )
    for key, bounds in DESCRIPTION_BOUNDS.items():
        _check_int(path, key, description[key], bounds)
    _check_victim_arch(path, description["victim_arch"])
    check_normalisation(description["mean"], description["std"], description["in_channels"], str(path))
    transform = description["transform"]
    if not isinstance(transform, dict) or set(transform) != set(TRANSFORM_BOUNDS):
        raise ConfigError(f"{path} records transform={transform!r}, expected the keys base_width and depth.")
    for key, bounds in TRANSFORM_BOUNDS.items():
        _check_int(path, f"transform.{key}", transform[key], bounds)
    names = description.get("class_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != description["num_classes"]
        or not all(isinstance(name, str) and len(name) <= MAX_CLASS_NAME for name in names)
    ):
        raise ConfigError(
            f"{path} records class_names that are not {description['num_classes']} strings of at most "
            f"{MAX_CLASS_NAME} characters: the file is damaged; export the model again."
        )
    if not isinstance(description.get("crop", True), bool):
        raise ConfigError(f"{path} records crop={description['crop']!r}, not true or false: export the model again.")


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


def _victim_builder(path: Path, description: dict[str, Any], victim_arch: str | None) -> Any:
    """The builder of the recorded victim: by registered / torchvision name, or the import path the caller confirmed."""
    arch = description["victim_arch"]
    if is_import_path(arch):
        if victim_arch != arch:
            raise ConfigError(
                f"{path} holds a victim built by the import path {arch!r}; refine-pl never imports code named by a "
                f"file: pass load_defended(path, victim_arch={arch!r}) (or --victim-arch {arch}) if you trust it."
            )
        return import_builder(arch)
    return lambda num_classes, in_channels: build_architecture(arch, num_classes, in_channels)


def read_description(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_defended` wrote to ``path`` (the file's header only is read).

    Files of format version 1 come back with the keys of version 2 (``class_names`` None, ``crop`` true).

    Raises:
        ConfigError: The file is missing, not safetensors, not a refine-pl defended classifier, or its metadata
            fails :func:`check_description`.
    """
    path = Path(path)
    with _open(path) as file:
        return _recorded_description(path, file)


def read_detector(path: str | Path) -> dict[str, Any] | None:
    """The detector's calibration recorded in a defended file, or None (none recorded, damaged, or another score).

    Read from the header only, after the file passed :func:`read_description`. A calibration refine-pl cannot use
    (:func:`refine_pl.detection.check_calibration`) gives None: predictions then have no ``flagged`` column rather than
    flags from a threshold chosen for another score.

    Raises:
        ConfigError: See :func:`read_description`.
    """
    path = Path(path)
    with _open(path) as file:
        calibration = _recorded_description(path, file).get(DETECTOR_KEY)
    return None if calibration is None else check_calibration(calibration, str(path))


def _archive_victim(path: Path, archive: Tensor | None) -> ExportedNet:
    if archive is None or archive.dtype != torch.uint8 or archive.ndim != 1:
        raise ConfigError(f"{path} records a torch.export victim without its archive ({ARCHIVE_KEY}): export again.")
    data = archive.numpy().tobytes()
    records = archive_records(data)
    if records is None:
        raise ConfigError(f"{path} holds a damaged victim archive: export the model again.")
    return load_exported_program(path, data, records)


def load_defended(path: str | Path, victim_arch: str | None = None) -> DefendedClassifier:
    """Rebuilds the defended classifier written by :func:`export_defended`, in eval mode and channels-last layout.

    Nothing is built before the metadata has passed :func:`check_description`, and the real modules are built
    only once modules built without memory (on the ``meta`` device) have the shapes of the file's tensors, so
    the memory used is bounded by the file's size. The remap must pass :func:`check_remap` and every floating
    tensor must be finite. A torch.export victim is read from the archive the file carries, with the checks of
    :func:`~refine_pl.archives.load_exported_program`.

    Args:
        path: The ``.safetensors`` file.
        victim_arch: The import path of the victim's builder, required when the file records one (the caller's
            confirmation that this code may run); ignored otherwise.

    Raises:
        ConfigError: See :func:`read_description`; also when the weights do not fit the recorded modules, the
            remap is not a derangement, a weight is NaN or infinite, the victim cannot take the recorded image size,
            or the victim was built by an import path that ``victim_arch`` does not repeat.
    """
    path = Path(path)
    with _open(path) as file:
        description = _recorded_description(path, file)
        try:
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (no __iter__)
        except Exception as error:  # safetensors raises its own error types for damaged tensor data
            raise ConfigError(f"{path} has damaged tensor data ({error}): export the model again.") from error
    num_classes, in_channels = description["num_classes"], description["in_channels"]
    from_archive = description["victim_arch"] == PT2_ARCH
    build = None if from_archive else _victim_builder(path, description, victim_arch)
    with torch.device("meta"):
        transform = UNet(in_channels, **description["transform"])
        expected = {f"transform.{key}": value for key, value in transform.state_dict().items()}
        if build is not None:
            victim_state = build(num_classes, in_channels).state_dict()
            expected |= {f"victim.net.{key}": value for key, value in victim_state.items()}
    expected["remap.permutation"] = torch.empty(num_classes, dtype=torch.long, device="meta")
    archive = tensors.pop(ARCHIVE_KEY, None) if from_archive else None
    problem = describe_key_mismatch(expected, tensors)
    if problem is not None:
        raise ConfigError(f"The weights in {path} do not fit its recorded modules: {problem}.")
    check_remap(path, tensors["remap.permutation"], num_classes)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() != expected[name].is_floating_point():
            raise ConfigError(
                f"{path} holds {name} as {tensor.dtype}, expected {expected[name].dtype}: export it again."
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"{path} holds NaN or infinite values in {name}: the file is damaged; export it again.")
    net = _archive_victim(path, archive) if from_archive else build(num_classes, in_channels)
    victim = NormalizedClassifier(net, description["mean"], description["std"], arch=description["victim_arch"])
    defended = DefendedClassifier(
        UNet(in_channels, **description["transform"]),
        victim,
        OutputRemap(num_classes),
        in_channels=in_channels,
        image_size=description["image_size"],
    )
    parts = {"transform": defended.transform, "remap": defended.remap}
    if not from_archive:
        parts["victim.net"] = victim.net
    for prefix, module in parts.items():
        module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")})
    defended.requires_grad_(False)
    # Channels-last convolutions were faster for both the defended classifier and the bare victim on CPU (U-Net 16
    # + ResNet-18, 32 px, at batch 1 and 256; the inference timings: benchmarks/results/speed.md), and training uses
    # that layout, so the loaded classifier computes exactly the logits the run's test measured.
    defended.to(memory_format=torch.channels_last)
    check_victim_accepts(victim.net, in_channels, description["image_size"], description["victim_arch"], num_classes)
    return defended.eval()


class _Unchecked(nn.Module):
    """The defended computation without the input check, which tracers cannot follow (it reads pixel values).

    Holds a CPU copy of the classifier, so that a run on a GPU writes files that run anywhere and its own model
    stays where it is.
    """

    def __init__(self, defended: DefendedClassifier) -> None:
        super().__init__()
        self.defended = copy.deepcopy(defended).cpu()

    def forward(self, images: Tensor) -> Tensor:
        return self.defended.unchecked(images)


def _example(defended: DefendedClassifier, image_size: int, batch: int = 2) -> Tensor:
    return torch.rand(batch, defended.transform.in_channels, image_size, image_size, generator=torch.Generator())


def export_onnx(defended: DefendedClassifier, image_size: int, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Writes the defended classifier as an ONNX model (input ``images``, output ``logits``, dynamic batch).

    The input is float32 ``[batch, C, image_size, image_size]`` in [0, 1]; the output is the defended logits
    ``[batch, num_classes]``. Uses torch's ``torch.export``-based exporter (it needs the ``onnx`` and
    ``onnxscript`` packages). One file, unless the weights exceed :data:`ONNX_EXTERNAL_DATA_BYTES`.

    Raises:
        ConfigError: The exporter's packages are missing.
    """
    try:
        import onnxscript  # noqa: F401  (the exporter imports it lazily and fails late without it)
    except ImportError as error:
        raise ConfigError(
            "Writing ONNX needs the onnx and onnxscript packages (dependencies of refine-pl): pip install onnx "
            "onnxscript, or leave onnx out of the DeploymentFiles callback's formats."
        ) from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _Unchecked(defended).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(
            module,
            (_example(defended, image_size),),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            external_data=weight_bytes > ONNX_EXTERNAL_DATA_BYTES,
            verbose=False,
        )
    return path


def export_torchscript(defended: DefendedClassifier, image_size: int, path: str | Path) -> Path:
    """Writes the defended classifier as TorchScript (``torch.jit.trace``), for libtorch and older runtimes.

    Traced at ``image_size``; the batch size may vary. torch marks TorchScript as deprecated in favour of
    ``torch.export``; the file still loads with ``torch.jit.load`` (which runs the code in it: it is your file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The tracer warns that Python-level shape logic (the U-Net's padding to a multiple of 2**depth, the input
        # checks) is fixed for the traced image size: that is the intended file, at the recorded size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_Unchecked(defended).eval(), _example(defended, image_size), check_trace=False)
    traced.save(str(path))
    return path
