"""``refine-pl defend MODEL IMAGES``: your own model defended with REFINE in one command.

The own-model job of docs/own-model.md (three configs, a YAML file of the model's facts, four commands) in one:

1. What the model file tells is inferred, and each inferred fact is printed in one line saying from what
   (:func:`infer_model_facts`): the class count, the channels, the image size and the normalisation.
2. The job is the LightningCLI job of the configs in :data:`DEFEND_CONFIGS`, with the facts, the folders and the
   command's options as flags (:func:`stage_args`) and any other LightningCLI flag passed through after ``--``.
3. It runs as every defense of the project does, through :func:`~refine_pl.pipeline.run_defense`: ``fit`` (or its
   resumption), ``test`` when there are test images (``--test-root`` for BA, ``--triggered-root`` for ASR),
   ``predict`` of IMAGES with ``--predict``. The run folder's ``config.yaml`` is the whole job, so
   ``refine-pl test --config RUN/config.yaml --ckpt_path last`` repeats its test.

Nothing in the model file is executed (:func:`~refine_pl.weights.read_weights_file`); the one code that runs is the
architecture the user names.
"""

import argparse
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from refine_pl.architectures import ARCHITECTURES, architecture, import_builder, is_import_path, torchvision_classifiers
from refine_pl.architectures.registry import Builder
from refine_pl.archives import ExportedNet
from refine_pl.black_box import onnx_facts
from refine_pl.classifier import IMAGENET_MEAN, IMAGENET_STD
from refine_pl.configs import resolve_config
from refine_pl.errors import ConfigError, first_sentence
from refine_pl.images import image_files
from refine_pl.pipeline import run_defense
from refine_pl.run_folder import start_over
from refine_pl.state_dicts import describe_key_mismatch, fitting_state_dict
from refine_pl.weights import WeightsFile, read_weights_file

DEFEND_CONFIGS = ["configs/refine/recipe.yaml", "configs/refine/own_model.yaml"]
"""The REFINE recipe of ``refine-pl defend``, merged in order (resolved by :func:`~refine_pl.configs.resolve_config`):
the project's recipe, then the own-model overlay (a folder of unlabeled images)."""

BLACK_BOX_CONFIG = "configs/refine/black_box.yaml"
"""The overlay of a model that can only be queried (an ``.onnx`` MODEL, or ``--answers``): REFINE via a surrogate."""

DEFENDED_FILES = ("defended.safetensors", "defended.onnx", "defended.torchscript.pt", "MODEL_CARD.md")
"""What a defense writes for deployment (the ONNX and TorchScript files unless their formats are turned off)."""

SOURCE = "--data.init_args.source.init_args."
"""The flags of the data source (the own-model overlay's ``UnlabeledFolder``)."""

DEFEND_TERMS = {
    f"{SOURCE}root": "IMAGES",
    f"{SOURCE}num_classes": "--num-classes",
    f"{SOURCE}image_size": "--image-size",
    f"{SOURCE}in_channels": "--channels",
    f"{SOURCE}mean": "--mean",
    f"{SOURCE}std": "--std",
    f"{SOURCE}class_names": "--class-names",
    f"{SOURCE}test_root": "--test-root",
    f"{SOURCE}triggered_root": "--triggered-root",
    f"{SOURCE}target_label": "--target-label",
    "--model.init_args.victim_checkpoint": "MODEL",
    "--model.init_args.victim_arch": "--arch",
    "--trainer.default_root_dir": "--out",
    "--trainer.max_epochs": "--max-epochs",
    "--data.init_args.batch_size": "--batch-size",
    "--fresh true": "--fresh",
    "--model.init_args.answers": "--answers",
    "--model.init_args.surrogate_arch": "--surrogate-arch",
    "--model.init_args.query_budget": "--query-budget",
    "--model.init_args.onnx_outputs": "--onnx-outputs",
}
"""The LightningCLI flags that ``refine-pl defend`` sets from its own options, and those options: an error of a stage
names the option the user typed (:func:`in_defend_terms`)."""

FOLDER_KINDS = {
    "IMAGES": "your own unlabeled images",
    "--test-root": "labeled test images, one sub-folder per class",
    "--triggered-root": "images that carry the trigger",
}
"""What each folder of the command holds, for its errors."""

_CLASS_PROBES = (7, 11)
"""Two class counts the architecture is built with (on the meta device) to find its classifier layer: the tensors
whose shapes differ between the two builds, at the dimension that is 7 in one and 11 in the other."""

USAGE_EXAMPLES = """\
examples:
  a torchvision model saved with torch.save(model.state_dict(), "suspect.pt") (4 classes, 224 px, ImageNet's
  normalisation inferred), trained for at most an hour, tested on held-out images:
    refine-pl defend suspect.pt my_images --arch mobilenet_v3_small --max-minutes 60 \\
      --test-root my_test --triggered-root my_triggered --target-label 0

  a torch.export archive (classes, channels and a static image size inferred) that takes raw [0, 1] pixels:
    refine-pl defend suspect.pt2 my_images --mean 0 --std 1

  a grayscale model of your own (channels inferred from its first convolution), on a GPU:
    refine-pl defend xray.safetensors scans --arch mypackage.nets:build --image-size 128 --mean 0.5 --std 0.25 \\
      -- --trainer.accelerator gpu --trainer.devices 1

  a refine-pl victim checkpoint (it records its classes, size and normalisation), with predictions of IMAGES:
    refine-pl defend victim.ckpt my_images --predict

  a model you can only query, as an ONNX file (run by onnxruntime after its checks; REFINE trains through a
  surrogate distilled from its answers, docs/black-box.md), answering labels only, 40% of IMAGES queried:
    refine-pl defend vendor.onnx my_images --mean 0.5 --std 0.25 --answers labels --query-budget 0.4

what it writes (RUN, --out): defended.safetensors, defended.onnx, defended.torchscript.pt, MODEL_CARD.md,
config.yaml (the whole job), checkpoints/; with test folders report.json and report.md (and the table is printed);
with --predict predictions.csv. Run the same command again to resume an interrupted run (a finished one returns at
once and is tested again); `refine-pl test --config RUN/config.yaml --ckpt_path last` repeats the test, and
`refine-pl-predict RUN/defended.safetensors FOLDER` classifies images with the exported file alone.
See docs/own-model.md."""


class _Parser(argparse.ArgumentParser):
    """argparse that ends a bad command line with one :class:`ConfigError` line, as every refine-pl command does."""

    def error(self, message: str) -> None:
        raise ConfigError(f"{message}: see `refine-pl defend --help` for the options.")


def recipe_setting(key: str) -> Any:
    """What the recipe (:data:`DEFEND_CONFIGS`, the last config that sets it) gives the dotted ``key``; None if none."""
    found = None
    for config in DEFEND_CONFIGS:
        value: Any = yaml.safe_load(Path(resolve_config(config)).read_text())
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            found = value
    return found


def recipe_value(key: str) -> str:
    """:func:`recipe_setting` as the help says it."""
    value = recipe_setting(key)
    return "the recipe's" if value is None else f"the recipe's, {value}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``refine-pl defend`` (the arguments after ``defend``, up to a ``--``)."""
    parser = _Parser(
        prog="refine-pl defend",
        usage="refine-pl defend MODEL IMAGES [options] [-- LightningCLI flags]",
        description=textwrap.fill(
            "Defend your own image classifier with REFINE, in one command: train the input transform on your "
            "unlabeled images in front of the frozen model, write the defended model, and test it when you give test "
            "images. What the model file tells (classes, channels, image size, normalisation) is inferred, and each "
            "inferred value is printed with where it came from; a flag given wins. Any other LightningCLI flag of "
            "`refine-pl fit` goes after `--` (e.g. -- --trainer.accelerator gpu "
            "--model.init_args.transform.init_args.base_width 16): it is given to every stage (fit, test, predict) "
            f"and wins over the values set here. The recipe: {' + '.join(DEFEND_CONFIGS)}.",
            width=100,
        ),
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = parser.add_argument
    arg(
        "model", metavar="MODEL",
        help="the suspect model: bare weights (torch.save(model.state_dict(), path), DDP's module.-prefixed ones, or "
        ".safetensors) with --arch; a torch.export archive (.pt2), which holds its network; or a refine-pl victim "
        "checkpoint (.ckpt), which records everything. Read without unpickling: nothing in it runs",
    )  # fmt: skip
    arg(
        "images", metavar="IMAGES",
        help="folder of your own unlabeled images (any sub-folders; jpg, png, bmp, tif, webp, ...): REFINE trains on "
        "every image, with the model's own predictions as pseudo-labels (no label is read)",
    )  # fmt: skip
    arg(
        "--arch",
        help="the architecture of bare weights: a torchvision model name (mobilenet_v3_small, resnet50, vit_b_16, "
        "...), a refine-pl architecture (small_cnn, resnet18_cifar, ...), or your function or class as "
        "package.module:function (called with num_classes and in_channels when it takes them). Not needed for a .pt2 "
        "or a refine-pl victim checkpoint (default: none)",
    )  # fmt: skip
    arg(
        "--num-classes", type=int, metavar="N",
        help="the model's number of outputs (default: inferred: a .pt2's output width on one image, a victim "
        "checkpoint's record, or the width of the classifier layer in the weights)",
    )  # fmt: skip
    arg(
        "--channels", dest="in_channels", type=int, choices=(1, 3), metavar="C",
        help="channels of the images the model takes: 1 (grayscale: every folder is read in gray) or 3 (RGB) "
        "(default: inferred: a .pt2's input spec, a victim checkpoint's record, the first convolution of the weights, "
        "or the one of 1 and 3 the weights of a network without convolutions fit; torchvision's models take 3)",
    )  # fmt: skip
    arg(
        "--image-size", type=int, metavar="PX",
        help="side of the square images the model takes; images are resized (shorter side) and centre-cropped to it "
        "(default: inferred: a .pt2's static input shape, a victim checkpoint's record, the size the named "
        "architecture is made for: 224 for most torchvision models, 28 for small_cnn, 32 for the CIFAR ones; "
        "required for your own function and for a .pt2 exported with a dynamic size)",
    )  # fmt: skip
    arg(
        "--mean", type=float, nargs="+", metavar="M",
        help="the normalisation mean the model was trained with, one value per channel or one for all (default: "
        "ImageNet's for torchvision architectures, the record of a victim checkpoint; required otherwise: 0 with "
        "--std 1 for a model that takes raw [0, 1] pixels or normalises itself)",
    )  # fmt: skip
    arg(
        "--std", type=float, nargs="+", metavar="S",
        help="the normalisation standard deviation, as --mean (default: as --mean)",
    )  # fmt: skip
    arg(
        "--class-names", nargs="+", metavar="NAME",
        help="the name of each class, in class order: used in predictions and to match --test-root's folders "
        "(default: none; the test folders' names, sorted, when --test-root is given)",
    )  # fmt: skip
    arg(
        "--test-root", metavar="FOLDER",
        help="held-out labeled test images, one sub-folder per class (named as in --class-names, or one per class "
        "in sorted order): measures BA (default: none)",
    )  # fmt: skip
    arg(
        "--triggered-root", metavar="FOLDER",
        help="held-out images that carry the trigger, of classes other than the target: measures ASR; needs "
        "--target-label (default: none)",
    )  # fmt: skip
    arg("--target-label", type=int, metavar="C", help="the class the trigger leads to (default: none)")
    arg("--out", metavar="RUN", help="the run folder (default: runs/defend_<MODEL's name without suffix>)")
    arg(
        "--max-minutes", type=float, metavar="MIN",
        help="stop training after this many minutes (Lightning's trainer.max_time; the last checkpoint is the "
        "defended model) or at --max-epochs, whichever comes first (default: no time limit)",
    )  # fmt: skip
    arg(
        "--max-epochs", type=int, metavar="N",
        help=f"training epochs (default: {recipe_value('trainer.max_epochs')}); an epoch draws at least "
        f"{recipe_setting('data.init_args.min_epoch_samples') or 0} images, passing over fewer images more than once",
    )  # fmt: skip
    arg(
        "--batch-size", type=int, metavar="N",
        help=f"images per batch (default: {recipe_value('data.init_args.batch_size')}; lower it when memory runs out)",
    )  # fmt: skip
    arg("--seed", type=int, help=f"the run's seed (default: {recipe_value('seed_everything')})")
    arg(
        "--answers", choices=("probabilities", "labels"),
        help="defend the model as a black box that answers only class probabilities or only classes: REFINE trains "
        "through a surrogate distilled from its answers, never through the model (default: probabilities for an .onnx "
        "MODEL, which is always a black box; white-box REFINE otherwise)",
    )  # fmt: skip
    arg(
        "--surrogate-arch", metavar="ARCH",
        help="the black box's surrogate: a refine-pl or torchvision architecture or package.module:function (default: "
        "the one of small_cnn, resnet18_cifar_narrow and resnet18 made for the nearest image size)",
    )  # fmt: skip
    arg(
        "--query-budget", type=float, metavar="B",
        help="the share (up to 1) or number (above 1) of IMAGES the black box may answer; REFINE trains on those "
        "(default: 1, all of them)",
    )  # fmt: skip
    arg(
        "--onnx-outputs", choices=("logits", "probabilities"),
        help="what an .onnx MODEL's first output is (default: logits, softmaxed into probabilities)",
    )  # fmt: skip
    arg(
        "--fresh", action="store_true",
        help="move an earlier run in --out aside (to RUN.replaced-<time>; nothing is deleted) and start anew; "
        "without it, the same command resumes the run in --out (default: off)",
    )  # fmt: skip
    arg(
        "--predict", action="store_true",
        help="also classify IMAGES with the defended model: RUN/predictions.csv (default: off)",
    )  # fmt: skip
    return parser


@dataclass(frozen=True)
class ModelFacts:
    """What the job needs to know about the model: given as flags, or inferred from the file.

    Attributes:
        num_classes: Its number of outputs.
        in_channels: The channels of the images it takes (3 or 1: image folders are read in it).
        image_size: The side of the square images it takes.
        mean: The per-channel normalisation mean it was trained with.
        std: The per-channel normalisation standard deviation.
        arch: The architecture to build it with (``victim_arch``), or None when the file holds or records its own.
    """

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str | None


def _build(builder: Builder, num_classes: int, in_channels: int, arch: str) -> nn.Module:
    """``builder(num_classes, in_channels)`` on the meta device (no memory), or on the CPU if that fails."""
    try:
        with torch.device("meta"):
            return builder(num_classes, in_channels)
    except ConfigError:
        raise
    except Exception:  # a builder that creates tensors from data (torch.tensor(...)) may not build on meta
        try:
            return builder(num_classes, in_channels)
        except ConfigError:
            raise
        except Exception as error:
            raise ConfigError(
                f"--arch {arch} cannot be built for {num_classes} classes and {in_channels} channels "
                f"({first_sentence(error)}): check --arch."
            ) from error


def _first_convolution(net: nn.Module) -> tuple[str, int] | None:
    """The weight's key and ``groups`` of the first 2-D convolution of ``net`` in module order, or None."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight" if name else "weight", module.groups
    return None


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def _program_input_shape(program: ExportedNet) -> list[int | None] | None:
    """The image input's shape of a torch.export program (None for a dynamic dimension), or None if it has none."""
    for node in program.program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.ndim == 4:
            return [size if isinstance(size, int) else None for size in value.shape]
    return None


def _output_width(net: nn.Module, in_channels: int, image_size: int, what: str) -> int:
    """The width of ``net``'s output on one black image of the given shape."""
    try:
        with torch.no_grad():
            logits = net.eval()(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as error:  # a network fails on a misfit input in whichever layer, with any exception type
        raise ConfigError(
            f"{what} cannot run on one {in_channels}-channel {image_size}x{image_size} image "
            f"({first_sentence(error)}): pass the --image-size it takes."
        ) from error
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"{what} gives {shape} for one image, not [1, num_classes] logits: it is not a classifier.")
    return int(logits.shape[1])


class _Inference:
    """Collects the model's facts, given or inferred, and one line per inferred one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def infer(self, fact: str, value: Any, source: str) -> Any:
        shown = " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
        self.lines.append(f"Inferred {fact} {shown}: {source}.")
        return value


def _normalisation(
    inference: _Inference, mean: list[float] | None, std: list[float] | None, channels: int, default: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation: the flags (one value spread over every channel), or ImageNet's for torchvision's models."""
    if (mean is None) != (std is None):
        raise ConfigError("--mean and --std go together: give both, the normalisation the model was trained with.")
    if mean is None:
        if default is None:
            raise ConfigError(
                f"The normalisation {inference.path} expects cannot be told from the file: pass --mean and --std, the "
                "values the model was trained with (one per channel, or one for all), or --mean 0 --std 1 for a model "
                "that takes raw [0, 1] pixels or normalises itself."
            )
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        inference.infer("--mean", mean, default)
        inference.infer("--std", std, default)
    values = []
    for name, given in (("--mean", mean), ("--std", std)):
        if len(given) == 1:
            given = list(given) * channels
        if len(given) != channels:
            raise ConfigError(
                f"{name} has {len(given)} values for a {channels}-channel model: give one per channel, or one for all."
            )
        values.append(tuple(float(v) for v in given))
    return values[0], values[1]


def _recorded(inference: _Inference, weights: WeightsFile, args: argparse.Namespace) -> ModelFacts:
    """The facts of a refine-pl victim checkpoint: its record, unless a flag gives one (the job then checks it)."""
    hparams = weights.hparams
    if weights.attack_spec is not None and args.triggered_root is not None:
        attack = weights.attack_spec.get("name", "its attack")
        raise ConfigError(
            f"{inference.path} records the attack it was trained with ({attack}), which stamps its trigger on "
            "--test-root's images to measure ASR: drop --triggered-root (and --target-label)."
        )
    where = f"recorded in {inference.path} (a refine-pl victim checkpoint of {hparams['arch']})"
    recorded = {}
    for fact, flag in (("num_classes", "--num-classes"), ("in_channels", "channels"), ("image_size", "--image-size")):
        given = getattr(args, fact, None)
        value = hparams.get(fact)
        if given is None and (type(value) is not int or value < 1):
            raise ConfigError(
                f"{inference.path} records {fact}={value!r}, not a positive integer: it is damaged; get it again."
            )
        recorded[fact] = given if given is not None else inference.infer(flag, value, where)
    mean, std = args.mean, args.std
    if mean is None and std is None and hparams.get("mean") is not None and hparams.get("std") is not None:
        mean, std = inference.infer("--mean", hparams["mean"], where), inference.infer("--std", hparams["std"], where)
    channels = recorded["in_channels"]
    mean, std = _normalisation(inference, mean, std, channels, None)
    return ModelFacts(recorded["num_classes"], channels, recorded["image_size"], mean, std, args.arch)


def _exported(inference: _Inference, weights: WeightsFile, args: argparse.Namespace) -> ModelFacts:
    """The facts of a torch.export archive: its input spec, its output width on one image."""
    path = inference.path
    if args.arch is not None:
        raise ConfigError(f"{path} is a torch.export archive, which holds its own network: drop --arch.")
    shape = _program_input_shape(weights.program)
    shown = "[" + ", ".join("dynamic" if size is None else str(size) for size in shape or ()) + "]"
    spec = f"the input spec of {path}, {shown}"
    if args.in_channels is not None:
        channels = args.in_channels
    elif shape is not None and shape[1] is not None:
        channels = inference.infer("channels", shape[1], spec)
    else:
        channels = inference.infer("channels", 3, f"assumed: {path} does not fix its channels")
    image_size = args.image_size
    if image_size is None:
        if shape is None or shape[2] is None or shape[2] != shape[3]:
            raise ConfigError(
                f"{path} was exported for images of any size (input {shown if shape else 'of no fixed shape'}): pass "
                "--image-size, the side of the square images it takes."
            )
        image_size = inference.infer("--image-size", shape[2], spec)
    num_classes = args.num_classes
    if num_classes is None:
        width = _output_width(weights.program, channels, image_size, str(path))
        num_classes = inference.infer("--num-classes", width, f"the output width of {path} on one image")
    mean, std = _normalisation(inference, args.mean, args.std, channels, None)
    return ModelFacts(num_classes, channels, image_size, mean, std, None)


def _class_count(
    inference: _Inference, builder: Builder, weights: WeightsFile, arch: str, channels: int, image_size: int
) -> int:
    """The class count bare weights imply.

    The width of the architecture's classifier layer in the file, or, for a builder that takes no class count, the
    output width of the network with the file's weights on one image.
    """
    path = inference.path
    first, second = (_build(builder, n, channels, arch).state_dict() for n in _CLASS_PROBES)
    state_dict = fitting_state_dict(first, weights.state_dict)
    widths: dict[str, int] = {}
    for key, tensor in first.items():
        other = second.get(key)
        if other is None or other.shape == tensor.shape:
            continue
        dims = [d for d, (a, b) in enumerate(zip(tensor.shape, other.shape, strict=False)) if (a, b) == _CLASS_PROBES]
        found = state_dict.get(key)
        if not dims or found is None or found.ndim != tensor.ndim:
            raise ConfigError(
                f"The weights in {path} do not fit architecture {arch!r} "
                f"({describe_key_mismatch(first, state_dict) or f'no {key}'}): check --arch."
            )
        widths[key] = int(found.shape[dims[0]])
    if not widths:  # the builder ignores the class count: run the network itself
        net = _build(builder, 2, channels, arch).to_empty(device="cpu")
        problem = describe_key_mismatch(net.state_dict(), fitting_state_dict(net.state_dict(), weights.state_dict))
        if problem is not None:
            raise ConfigError(f"The weights in {path} do not fit architecture {arch!r} ({problem}): check --arch.")
        net.load_state_dict(fitting_state_dict(net.state_dict(), weights.state_dict))
        width = _output_width(net, channels, image_size, f"{arch!r} with the weights of {path}")
        return inference.infer("--num-classes", width, f"the output width of {arch} with {path}'s weights on one image")
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"{key} {_shape(state_dict[key])}" for key in widths)
        raise ConfigError(
            f"The classifier layers of {arch!r} in {path} disagree on the class count ({shown}): check it."
        )
    key = next(iter(widths))
    source = f"{key} {_shape(state_dict[key])} in {path}, the classifier layer of {arch}"
    return inference.infer("--num-classes", widths[key], source)


def _channels_the_weights_fit(inference: _Inference, builder: Builder, weights: WeightsFile, arch: str) -> int:
    """The one of 1 and 3 channels whose build of ``arch`` has the input layer of the weights (no convolution to read).

    The input layer is the first weight of two or more dimensions (an MLP's first linear layer, whose input width is
    the pixels times the channels); its output width may be the class count, which the probe does not know.
    """
    fitting, present = [], False
    for channels in (1, 3):
        built = _build(builder, _CLASS_PROBES[0], channels, arch).state_dict()
        key = next((key for key, value in built.items() if value.ndim >= 2), None)
        found = fitting_state_dict(built, weights.state_dict).get(key) if key else None
        present = present or found is not None
        if found is not None and tuple(found.shape[1:]) == tuple(built[key].shape[1:]):  # its inputs, not outputs
            fitting.append((channels, f"{key} {_shape(found)} in {inference.path}, the input layer of {arch} built for "
                                      f"{channels} channel(s)"))  # fmt: skip
    if not present:  # weights of another architecture: loading them says so, naming --arch
        return inference.infer("channels", 3, f"assumed: {inference.path} holds no input layer of {arch}")
    if len(fitting) != 1:
        fits = "both 1 and 3 channels" if fitting else "neither 1 nor 3 channels"
        raise ConfigError(
            f"{inference.path} holds no convolution of {arch} to read its channels from, and its input layer fits "
            f"{fits}: pass --channels 1 (grayscale) or 3 (RGB)."
        )
    return inference.infer("channels", *fitting[0])


def _built(inference: _Inference, weights: WeightsFile, args: argparse.Namespace) -> ModelFacts:
    """The facts of bare weights: the architecture's first convolution and classifier layer in the file, its size."""
    path, arch = inference.path, args.arch
    if arch is None:
        raise ConfigError(
            f"{path} holds bare weights without an architecture, so the network cannot be built: pass --arch, a "
            "torchvision model name (mobilenet_v3_small, resnet50, ...), a refine-pl architecture (small_cnn, ...) or "
            "your own as package.module:function."
        )
    own_code = is_import_path(arch)
    builder = import_builder(arch) if own_code else architecture(arch).builder
    torchvision = not own_code and arch in torchvision_classifiers()
    if args.in_channels is not None:
        channels = args.in_channels
    elif torchvision and arch not in ARCHITECTURES:
        channels = inference.infer("channels", 3, f"torchvision's {arch} takes RGB images")
    else:
        net = _build(builder, _CLASS_PROBES[0], 3, arch)
        conv = _first_convolution(net)
        state_dict = fitting_state_dict(net.state_dict(), weights.state_dict)
        found = state_dict.get(conv[0]) if conv else None
        if found is not None and found.ndim == 4:
            source = f"{conv[0]} {_shape(found)} in {path}, the first convolution of {arch}"
            channels = inference.infer("channels", int(found.shape[1]) * conv[1], source)
        else:
            channels = _channels_the_weights_fit(inference, builder, weights, arch)
    image_size = args.image_size
    if image_size is None:
        if own_code:
            raise ConfigError(
                f"--arch {arch} is your own network, whose image size refine-pl cannot tell: pass --image-size, the "
                "side of the square images it takes."
            )
        made_for = "its ImageNet weights' crop" if arch not in ARCHITECTURES else "refine-pl's registry"
        size = architecture(arch).native_size
        image_size = inference.infer("--image-size", size, f"the size {arch} is made for ({made_for})")
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = _class_count(inference, builder, weights, arch, channels, image_size)
    default = f"ImageNet's, which torchvision's {arch} is trained with" if torchvision and channels == 3 else None
    mean, std = _normalisation(inference, args.mean, args.std, channels, default)
    return ModelFacts(num_classes, channels, image_size, mean, std, arch)


def _onnx(inference: _Inference, args: argparse.Namespace) -> ModelFacts:
    """The facts of an ONNX file: its graph's input and output shapes (nothing of it runs)."""
    path = inference.path
    if args.arch is not None:
        raise ConfigError(f"{path} is an ONNX file, which holds its own network: drop --arch.")
    fixed = onnx_facts(path)
    spec = f"the graph of {path}"
    facts = {}
    for fact, flag, given in (
        ("in_channels", "channels", args.in_channels),
        ("image_size", "--image-size", args.image_size),
        ("num_classes", "--num-classes", args.num_classes),
    ):
        if given is not None:
            facts[fact] = given
        elif fixed[fact] is not None:
            facts[fact] = inference.infer(flag, fixed[fact], spec)
        elif fact == "in_channels":
            facts[fact] = inference.infer("channels", 3, f"assumed: {path} does not fix its channels")
        else:
            option = "--channels" if fact == "in_channels" else flag
            raise ConfigError(f"{path} does not fix its {fact.replace('_', ' ')}: pass {option}.")
    mean, std = _normalisation(inference, args.mean, args.std, facts["in_channels"], None)
    return ModelFacts(facts["num_classes"], facts["in_channels"], facts["image_size"], mean, std, None)


def is_black_box(args: argparse.Namespace) -> bool:
    """Whether the command defends MODEL as a black box: an ``.onnx`` file, or ``--answers`` given."""
    return str(args.model).lower().endswith(".onnx") or args.answers is not None


def infer_model_facts(args: argparse.Namespace) -> tuple[ModelFacts, list[str]]:
    """The model's facts, from the flags and what the file tells, and one line per inferred fact saying from what.

    - a torch.export archive: channels and a static image size from its input spec, the class count from its
      output width on one image;
    - a refine-pl victim checkpoint: its record (classes, channels, image size, normalisation);
    - bare weights with ``--arch``: channels from the architecture's first convolution in the file (torchvision's
      models: 3), the class count from its classifier layer in the file (for a builder that takes no class count:
      the output width on one image), the image size the architecture is made for (torchvision's: their weights'
      crop size; refine-pl's: their registry's), ImageNet's normalisation for torchvision's architectures.

    The normalisation of anything else, and the image size of a network the user builds, cannot be told from the
    file: they are asked for.

    Args:
        args: The parsed command line (:func:`build_parser`).

    Raises:
        ConfigError: The file is missing or refused (:func:`~refine_pl.weights.read_weights_file`), or a fact cannot
            be inferred and is not given (naming the flag that gives it), or the weights do not fit ``--arch``.
    """
    path = Path(args.model)
    if not path.is_file():
        raise ConfigError(
            f"MODEL {path} {'is a folder' if path.is_dir() else 'not found'}: pass the suspect model's file (weights "
            "saved with torch.save(model.state_dict(), path) or as .safetensors, a .pt2 archive, or a refine-pl victim "
            "checkpoint)."
        )
    inference = _Inference(path)
    if path.suffix.lower() == ".onnx":
        return _onnx(inference, args), inference.lines
    weights = read_weights_file(path)
    if weights.program is not None:
        facts = _exported(inference, weights, args)
    elif isinstance(weights.hparams.get("arch"), str):
        facts = _recorded(inference, weights, args)
    else:
        facts = _built(inference, weights, args)
    return facts, inference.lines


def _flag_value(value: Any) -> str:
    """A value as the LightningCLI reads it back: lists as JSON, a path YAML would read as something else with ./."""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    text = str(value)
    if isinstance(value, str):
        try:
            same = yaml.safe_load(text) == text
        except yaml.YAMLError:
            same = False
        if not same and not Path(text).is_absolute():
            return f"./{text}"  # "null", "[a]": ./ keeps them paths
    return text


def _max_time(minutes: float) -> str:
    """``minutes`` as Lightning's ``max_time`` string, ``DD:HH:MM:SS``."""
    seconds = max(1, round(minutes * 60))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    return f"{days:02d}:{hours:02d}:{seconds // 60:02d}:{seconds % 60:02d}"


def stage_args(args: argparse.Namespace, facts: ModelFacts, run_dir: Path) -> list[str]:
    """The LightningCLI flags of the job, merged after :data:`DEFEND_CONFIGS`.

    The data source's folders and the model's facts, the architecture, the run folder and the training options
    given (the model file itself is passed by :func:`~refine_pl.pipeline.run_defense`).
    """
    source = {
        "root": args.images,
        "num_classes": facts.num_classes,
        "in_channels": facts.in_channels,
        "image_size": facts.image_size,
        "mean": facts.mean,
        "std": facts.std,
        "class_names": args.class_names,
        "test_root": args.test_root,
        "triggered_root": args.triggered_root,
        "target_label": args.target_label,
    }
    options = {
        **{f"{SOURCE}{key}": value for key, value in source.items()},
        "--trainer.default_root_dir": str(run_dir),
        "--model.init_args.victim_arch": facts.arch,
        "--trainer.max_epochs": args.max_epochs,
        "--trainer.max_time": None if args.max_minutes is None else _max_time(args.max_minutes),
        "--data.init_args.batch_size": args.batch_size,
        "--seed_everything": args.seed,
    }
    if is_black_box(args):
        options.update(
            {
                "--model.init_args.answers": args.answers,
                "--model.init_args.surrogate_arch": args.surrogate_arch,
                "--model.init_args.query_budget": args.query_budget,
                "--model.init_args.onnx_outputs": args.onnx_outputs,
            }
        )
    return [item for flag, value in options.items() if value is not None for item in (flag, _flag_value(value))]


def in_defend_terms(message: str) -> str:
    """An error message of a stage with the LightningCLI flags that ``refine-pl defend`` sets named as its options."""
    for flag in sorted(DEFEND_TERMS, key=len, reverse=True):
        message = message.replace(flag, DEFEND_TERMS[flag])
    return message


def _check_folders(args: argparse.Namespace) -> None:
    """Refuses, before the model is read, folders that are missing or empty and options that cannot work."""
    if (args.triggered_root is None) != (args.target_label is None):
        given = "--triggered-root" if args.triggered_root is not None else "--target-label"
        raise ConfigError(
            f"{given} needs {'--target-label' if given == '--triggered-root' else '--triggered-root'}: the triggered "
            "images and the class their trigger leads to go together (ASR)."
        )
    black_box_options = ("--surrogate-arch", "--query-budget", "--onnx-outputs")
    given = [name for name in black_box_options if getattr(args, name[2:].replace("-", "_")) is not None]
    if given and not is_black_box(args):
        raise ConfigError(
            f"{given[0]} is an option of a black-box defense: give an .onnx MODEL, or --answers probabilities or "
            "labels to defend MODEL through its answers only."
        )
    if args.onnx_outputs is not None and not str(args.model).lower().endswith(".onnx"):
        raise ConfigError("--onnx-outputs says what an .onnx MODEL's output is: drop it for other model files.")
    for name, value in (("--max-epochs", args.max_epochs), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ConfigError(f"--max-minutes must be more than 0, got {args.max_minutes}.")
    for name, folder in (
        ("IMAGES", args.images),
        ("--test-root", args.test_root),
        ("--triggered-root", args.triggered_root),
    ):
        if folder is None:
            continue
        if not Path(folder).is_dir():
            raise ConfigError(f"{name} {folder} is not a folder: give the folder of {FOLDER_KINDS[name]}.")
        if not image_files(Path(folder)):
            raise ConfigError(
                f"No image files under {name} {folder} (jpg, png, ppm, bmp, pgm, tif, webp): give the folder of "
                f"{FOLDER_KINDS[name]}."
            )


def _split_pass_through(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` before the first ``--`` (the command's own arguments) and after it (LightningCLI flags)."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs ``refine-pl defend`` with the arguments after ``defend`` (``sys.argv[2:]`` when None).

    Returns:
        The report (``report.json``) when the job tested, else None.

    Raises:
        ConfigError: A bad command line, folder or model file, a fact that cannot be inferred and is not given, or
            any check of the job, in one line that names this command's options.
    """
    own, passed = _split_pass_through(sys.argv[2:] if argv is None else argv)
    try:
        args = build_parser().parse_args(own)
        _check_folders(args)
        facts, lines = infer_model_facts(args)
        for line in lines:
            print(line)
        run_dir = Path(args.out or f"runs/defend_{Path(args.model).stem}")
        if args.fresh:
            start_over(run_dir)
        tests = args.test_root is not None or args.triggered_root is not None
        report = run_defense(
            args.model,
            [*DEFEND_CONFIGS, BLACK_BOX_CONFIG] if is_black_box(args) else DEFEND_CONFIGS,
            run_dir,
            [*stage_args(args, facts, run_dir), *passed],
            predict_root=args.images if args.predict else None,
            test=tests,
        )
    except ConfigError as error:
        raise ConfigError(in_defend_terms(str(error))) from None
    written = [name for name in DEFENDED_FILES if (run_dir / name).is_file()]
    print(f"Defended model in {run_dir}: {', '.join(written)}; the whole job: {run_dir / 'config.yaml'}.")
    if args.predict:
        print(f"Predictions of {args.images}: {run_dir / 'predictions.csv'}.")
    if tests:
        print(f"Repeat the test: refine-pl test --config {run_dir / 'config.yaml'} --ckpt_path last")
    else:
        print(
            "Nothing was tested: give --test-root (labeled images, one folder per class: BA) and/or --triggered-root "
            "with --target-label (ASR) to measure the defense."
        )
    return report
