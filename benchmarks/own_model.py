"""Your own model, defended: REFINE on models that look like users' models, before and after (issue 23).

Each case plays a third party and a user, with the embedded MNIST-5k (``datamodules.EmbeddedMNIST``) as the only
image source: colour cases draw every digit in a random foreground colour on a random background colour (each at
least 0.35 apart, on average over the channels), resized to the case's size; grayscale cases resize the digits.

1. The third party trains a backdoored model its own way: a plain seeded PyTorch loop (Adam with a cosine decay,
   cross-entropy) over the training split (colour cases repaint the digits every epoch), a share of the images of
   other classes stamped with its trigger and relabelled to its target. It hands over bare weights
   (``torch.save(model.state_dict(), path)``) or a ``torch.export`` archive (``.pt2``, the normalisation inside).
   The same loop without poisoning gives the clean model, whose rate of triggered images classified as the target
   is the ASR floor (measured here, on the triggered folder's images).
2. The user holds PNG folders: unlabeled images from the training split, a labeled test folder (``<class>/*.png``,
   BA) and a triggered folder (test images of the other classes with the trigger stamped, ASR), disjoint from them.
3. The user's model is defended twice:

   - ``before``: the own-model path of commit 528d108, ``configs/refine/reference.yaml`` + that commit's
     ``own_model.yaml`` (``benchmarks/configs/own_model_528d108.yaml``) + ``--trainer.max_epochs 30``, the
     source's settings as flags, run through :func:`~refine_pl.pipeline.run_defense`;
   - ``after``: ``refine-pl defend MODEL IMAGES ...`` as the user types it (:func:`refine_pl.defend.main`), with
     whatever recipe the package holds.

Results: ``own_model.csv`` and ``own_model.md`` (its table rendered from the csv by :func:`benchmarks.render.own_model`)
in ``--results-dir``; rows of cases and variants not run this time are kept from the csv already there. Runs go under
``--run-dir`` (default ``runs/own_model/<case>/``): the user's folders and the third party's models are made once,
a finished defense is reused (``--redo after`` runs it again, the earlier run moved aside), an interrupted one
resumes.

    python benchmarks/own_model.py                              # every case, both variants
    python benchmarks/own_model.py --variants after --redo after  # the "after" rows again, e.g. after a recipe change
"""

import argparse
import csv
import importlib
import inspect
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/own_model.py` from the root

from benchmarks import render
from benchmarks.victims import configs_version
from datamodules import EmbeddedMNIST
from refine_pl import defend
from refine_pl.metric_names import AGREEMENT, ASR, BA, DEFENDED, LABEL_FREE, NO_DEFENSE
from refine_pl.pipeline import run_defense
from refine_pl.run_folder import start_over

REPO = Path(__file__).resolve().parents[1]
BEFORE_CONFIGS = ["configs/refine/reference.yaml", str(REPO / "benchmarks" / "configs" / "own_model_528d108.yaml")]
"""The own-model recipe of commit 528d108: the reference recipe, then that commit's own-model overlay."""
BEFORE_COMMIT = "528d108"
BEFORE_EPOCHS = 30
"""The epochs the README's own-model commands were run with (issue 23)."""
VARIANTS = ("before", "after")
NUM_CLASSES = 10
MIN_VICTIM_ASR, MIN_VICTIM_BA = 0.9, 0.9
"""A third party's model counts as a real backdoor at these (checked when it is trained)."""
FIELDS = [
    "case", "variant", "architecture", "image_size", "channels", "unlabeled_images", "victim_ba", "victim_asr",
    "floor", "defended_ba", "defended_asr", "ba_change", "agreement", "epochs", "seconds", "recipe",
]  # fmt: skip


@dataclass(frozen=True)
class Trigger:
    """A third party's trigger, stamped on uint8 images ``[N, C, H, W]``.

    Attributes:
        kind: ``patch`` (a checkerboard of ``colors`` of side ``size`` in a corner) or ``blend`` (``pattern`` mixed
            into the whole image at opacity ``alpha``: ``noise``, uniform noise drawn from ``seed``, or ``stripes``,
            vertical sine stripes of period ``size`` pixels).
        size: The patch's side, or the stripes' period.
        location: The patch's corner: ``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``.
        colors: The checkerboard's two colours (one value per channel, or one for all).
        pattern: The blended pattern.
        alpha: The blend's opacity.
        seed: The noise pattern's seed.
    """

    kind: str
    size: int = 3
    location: str = "top_left"
    colors: tuple[tuple[float, ...], tuple[float, ...]] = ((1.0,), (0.0,))
    pattern: str = "noise"
    alpha: float = 0.1
    seed: int = 0

    def stamp(self, images: Tensor) -> Tensor:
        """``images`` (uint8 ``[N, C, H, W]``) with the trigger, as uint8 (the pixels a PNG file holds)."""
        x = images.float() / 255
        _, channels, height, width = x.shape
        if self.kind == "patch":
            rows = torch.arange(self.size)[:, None] + torch.arange(self.size)[None, :]
            first, second = (torch.tensor(c).expand(channels).view(channels, 1, 1) for c in self.colors)
            patch = torch.where(rows % 2 == 0, first, second)
            top = 0 if self.location.startswith("top") else height - self.size
            left = 0 if self.location.endswith("left") else width - self.size
            x[:, :, top : top + self.size, left : left + self.size] = patch
        elif self.pattern == "noise":
            noise = torch.rand(channels, height, width, generator=torch.Generator().manual_seed(self.seed))
            x = (1 - self.alpha) * x + self.alpha * noise
        else:
            stripes = 0.5 + 0.5 * torch.sin(2 * torch.pi * torch.arange(width) / self.size)
            x = (1 - self.alpha) * x + self.alpha * stripes.expand(channels, height, width)
        return x.mul(255).round().clamp(0, 255).to(torch.uint8)

    def describe(self) -> str:
        """The trigger in a few words."""
        if self.kind == "patch":
            return f"a {self.size}x{self.size} checkerboard patch, {self.location.replace('_', '-')}"
        what = "uniform noise" if self.pattern == "noise" else f"sine stripes of period {self.size} px"
        return f"{what} blended at opacity {self.alpha}"


@dataclass(frozen=True)
class Case:
    """A user's model and images: what the third party trained, what the user holds and types.

    Attributes:
        name: The case's name (its run folder and csv rows).
        what: The model and data in a few words, for the report.
        arch: The architecture as the user names it (``--arch``): an import path or a torchvision model name.
        image_size: The side of the square images the model takes.
        channels: 1 (grayscale digits) or 3 (colour digits).
        images: The user's unlabeled images.
        trigger: The third party's trigger.
        target: The trigger's target class.
        seed: The seed of the third party's training, the images' colours, the user's share of the images.
        mean: The normalisation the third party trained with (per channel).
        std: As ``mean``.
        epochs: The third party's training epochs.
        user_flags: What the user types after the model, the folders and ``--arch`` (the facts the command cannot
            infer, as its errors ask for them).
        pass_through: LightningCLI flags the user must add after ``--`` where the command has no option for a fact
            (a workaround: the report shows them).
        export: The third party hands over a ``torch.export`` archive with the normalisation inside (``--arch``
            then names the network only to build it here, and the user passes no ``--arch``).
        poison_rate: The share of the training images poisoned (drawn from the other classes).
        lr: The third party's Adam learning rate.
        test_images: The test images used (all of the test split when None; fewer only in tests).
        note: What the report should say about the case besides its definition.
    """

    name: str
    what: str
    arch: str
    image_size: int
    channels: int
    images: int
    trigger: Trigger
    target: int
    seed: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    epochs: int
    user_flags: tuple[str, ...] = ()
    pass_through: tuple[str, ...] = ()
    export: bool = False
    poison_rate: float = 0.1
    lr: float = 1e-3
    test_images: int | None = None
    note: str = ""

    @property
    def model_file(self) -> str:
        return "suspect.pt2" if self.export else "suspect.pt"


SOURCE = "--data.init_args.source.init_args."
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ARCHS = "benchmarks.own_model_archs"
CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case(
            "mlp_gray28", "an MLP (no convolution) by import path, 28 px grayscale digits", f"{ARCHS}:mlp", 28, 1, 800,
            Trigger("patch", 3, "top_left"), target=3, seed=200, mean=(0.5,), std=(0.5,), epochs=20,
            user_flags=("--image-size", "28", "--mean", "0.5", "--std", "0.5"),
            pass_through=(f"{SOURCE}in_channels", "1", f"{SOURCE}mean", "[0.5]", f"{SOURCE}std", "[0.5]"),
            note="when the case was first run, refine-pl defend read channels from the first convolution only, took "
            "this MLP for an RGB model and stopped with \"size mismatch for 1.weight: file [256, 784], model "
            "[256, 2352]\"; the flags after `--` worked around it. It now infers 1 channel from the input layer the "
            "weights fit (and takes --channels); the flags are kept so that the case stays the one measured"
        ),
        Case(
            "cnn_nobn_color32", "a CNN without batch norm by import path, 32 px colour digits", f"{ARCHS}:plain_cnn",
            32, 3, 2000, Trigger("blend", pattern="noise", alpha=0.15, seed=201), target=6, seed=201,
            mean=(0.45,) * 3, std=(0.25,) * 3, epochs=25, lr=3e-3,
            user_flags=("--image-size", "32", "--mean", "0.45", "--std", "0.25"),
        ),
        Case(
            "mobilenet_color64", "torchvision's mobilenet_v3_small by name, 64 px colour digits", "mobilenet_v3_small",
            64, 3, 500, Trigger("patch", 6, "top_right", colors=((1.0, 0.0, 1.0), (0.0, 1.0, 0.0))), target=2,
            seed=202, mean=IMAGENET[0], std=IMAGENET[1], epochs=12, lr=2e-3, user_flags=("--image-size", "64"),
        ),
        Case(
            "pt2_bn_color48", "a torch.export archive of a CNN with batch norm (normalising inside), 48 px colour",
            f"{ARCHS}:BatchNormCNN", 48, 3, 1000, Trigger("blend", 8, pattern="stripes", alpha=0.2), target=5,
            seed=203, mean=(0.5,) * 3, std=(0.3,) * 3, epochs=15, export=True,
            user_flags=("--mean", "0", "--std", "1"),
        ),
    )
}  # fmt: skip
"""The cases: seeds from 200, targets and triggers the attacks table does not use."""

THIRD_PARTY_FIELDS = (
    "arch", "image_size", "channels", "trigger", "target", "seed", "mean", "std", "epochs", "export", "poison_rate",
    "lr", "test_images",
)  # fmt: skip
"""What the third party's models and their measured figures depend on."""
USER_FIELDS = ("image_size", "channels", "images", "trigger", "target", "seed", "test_images")
"""What the user's folders depend on."""


def case_spec(case: Case, fields: tuple[str, ...], **more: Any) -> dict[str, Any]:
    """The ``fields`` of ``case`` (and ``more``) as JSON values, to compare with what a run folder recorded."""
    every = asdict(case)
    return json.loads(json.dumps({**{key: every[key] for key in fields}, **more}))


# --- the images ---------------------------------------------------------------------------------------------------


def resized_digits(case: Case, digits: Tensor) -> Tensor:
    """MNIST digits (uint8 ``[N, 1, 28, 28]``) at the case's size, as float ``[N, 1, size, size]`` in [0, 1]."""
    x = digits.float() / 255
    if case.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(case.image_size,) * 2, mode="bilinear", align_corners=False).clamp(0, 1)
    return x


def paint(case: Case, digits: Tensor, generator: torch.Generator) -> Tensor:
    """Resized digits (:func:`resized_digits`) as the case's uint8 images ``[N, channels, size, size]``.

    Colour cases paint each digit in a random foreground colour on a random background colour (drawn from
    ``generator``, redrawn until they are 0.35 apart on average over the channels); grayscale ones keep the digits.
    """
    x = digits
    if case.channels == 3:
        fg, bg = torch.rand(len(x), 3, generator=generator), torch.rand(len(x), 3, generator=generator)
        close = (fg - bg).abs().mean(1) < 0.35
        while close.any():
            fg[close] = torch.rand(int(close.sum()), 3, generator=generator)
            close = (fg - bg).abs().mean(1) < 0.35
        x = bg[:, :, None, None] * (1 - x) + fg[:, :, None, None] * x
    return x.mul(255).round().to(torch.uint8)


def case_images(case: Case, digits: Tensor, seed: int) -> Tensor:
    """MNIST digits (uint8 ``[N, 1, 28, 28]``) as the case's images (:func:`paint`, colours drawn from ``seed``)."""
    return paint(case, resized_digits(case, digits), torch.Generator().manual_seed(seed))


@dataclass
class CaseData:
    """A case's images in memory (uint8) and the user's folders."""

    train: Tensor
    train_digits: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    triggered: Tensor
    folders: dict[str, Path] = field(default_factory=dict)


def _write_png(image: Tensor, path: Path) -> None:
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def case_data(case: Case, folder: Path) -> CaseData:
    """The case's images, and the user's PNG folders under ``folder`` (written once; ``done.json`` marks them)."""
    train, test = EmbeddedMNIST().load()
    data = CaseData(
        case_images(case, train.images, case.seed),
        resized_digits(case, train.images),
        train.labels,
        case_images(case, test.images, case.seed + 1000),
        test.labels,
        torch.empty(0),
    )
    if case.test_images is not None:
        keep = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(case.seed))[: case.test_images]
        data.test, data.test_labels = data.test[keep], data.test_labels[keep]
    data.triggered = case.trigger.stamp(data.test[data.test_labels != case.target])
    data.folders = {name: folder / name for name in ("images", "test", "triggered")}
    done = folder / "done.json"
    spec = case_spec(case, USER_FIELDS)
    if done.is_file():
        if json.loads(done.read_text())["case"] != spec:
            raise SystemExit(
                f"{folder} holds the folders of another definition of case {case.name}: move it away, or pass another "
                "--run-dir."
            )
        return data
    if folder.exists():
        shutil.rmtree(folder)  # a partial write of this script's own folders
    share = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(case.seed))[: case.images]
    for name in data.folders.values():
        name.mkdir(parents=True)
    for index in share.tolist():
        _write_png(data.train[index], data.folders["images"] / f"train_{index:05d}.png")
    for index, (image, label) in enumerate(zip(data.test, data.test_labels.tolist(), strict=True)):
        (data.folders["test"] / str(label)).mkdir(exist_ok=True)
        _write_png(image, data.folders["test"] / str(label) / f"test_{index:04d}.png")
    for index, image in enumerate(data.triggered):
        _write_png(image, data.folders["triggered"] / f"triggered_{index:04d}.png")
    counts = {"images": len(share), "test": len(data.test), "triggered": len(data.triggered)}
    done.write_text(json.dumps({"case": spec, "files": counts}) + "\n")
    return data


# --- the third party ----------------------------------------------------------------------------------------------


class Normalized(nn.Module):
    """``net`` behind its normalisation, as an exported model that takes [0, 1] pixels holds it."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def build_network(case: Case) -> nn.Module:
    """The case's network as the third party builds it: its own function by import path, or torchvision's model."""
    if ":" not in case.arch:
        return torchvision.models.get_model(case.arch, num_classes=NUM_CLASSES)
    module, name = case.arch.split(":")
    builder = getattr(importlib.import_module(module), name)
    kwargs = {"num_classes": NUM_CLASSES, "in_channels": case.channels}
    parameters = inspect.signature(builder).parameters
    return builder(**{key: value for key, value in kwargs.items() if key in parameters})


def train_model(case: Case, data: CaseData, poisoned: bool, epochs: int) -> nn.Module:
    """The third party's training: seeded Adam with a cosine decay, normalised inputs; the model in eval mode.

    Colour cases paint the training digits in new colours every epoch (the third party's augmentation: the digit's
    shape is the class, not its colours). Poisoned: ``poison_rate`` of the training images, drawn from the classes
    other than the target, carry the trigger and the target label.
    """
    torch.manual_seed(case.seed)
    generator = torch.Generator().manual_seed(case.seed)
    labels = data.train_labels.clone()
    chosen = torch.empty(0, dtype=torch.long)
    if poisoned:
        others = (labels != case.target).nonzero().flatten()
        chosen = others[torch.randperm(len(others), generator=generator)[: round(case.poison_rate * len(labels))]]
        labels[chosen] = case.target
    model = Normalized(build_network(case), case.mean, case.std)
    optimizer = torch.optim.Adam(model.parameters(), lr=case.lr)
    steps = epochs * -(-len(labels) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        images = paint(case, data.train_digits, generator)
        images[chosen] = case.trigger.stamp(images[chosen])
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(64):
            loss = F.cross_entropy(model(images[batch].float() / 255), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predictions(model: nn.Module, images: Tensor) -> Tensor:
    """The classes ``model`` gives uint8 ``images``."""
    return torch.cat([model(batch.float() / 255).argmax(1) for batch in images.split(256)])


def third_party(case: Case, data: CaseData, folder: Path, epochs: int, allow_weak: bool) -> dict[str, Any]:
    """The victim's file and the clean model's, trained once; returns their record (BA, ASR, floor, seconds).

    Raises:
        SystemExit: ``folder`` holds models of another case definition, or the victim is no real backdoor
            (ASR < 0.9 or BA < 0.9) and ``allow_weak`` is off.
    """
    record_path = folder / "record.json"
    spec = case_spec(case, THIRD_PARTY_FIELDS, victim_epochs=epochs)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["case"] != spec:
            raise SystemExit(
                f"{folder} holds the models of another definition of case {case.name} ({record['case']}): move it "
                "away, or pass another --run-dir."
            )
        return record
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    victim = train_model(case, data, poisoned=True, epochs=epochs)
    victim_seconds = time.perf_counter() - start
    clean = train_model(case, data, poisoned=False, epochs=epochs)
    clean_seconds = time.perf_counter() - start - victim_seconds
    if case.export:
        batch = torch.export.Dim("batch")
        program = torch.export.export(victim, (data.test[:2].float() / 255,), dynamic_shapes=({0: batch},))
        torch.export.save(program, folder / case.model_file)
    else:
        torch.save(victim.net.state_dict(), folder / case.model_file)
    torch.save(clean.net.state_dict(), folder / "clean.pt")
    targeted = [(predictions(m, data.triggered) == case.target).float().mean().item() for m in (victim, clean)]
    accuracy = [(predictions(m, data.test) == data.test_labels).float().mean().item() for m in (victim, clean)]
    record = {
        "case": spec,
        "victim_ba": accuracy[0],
        "victim_asr": targeted[0],
        "clean_ba": accuracy[1],
        "floor": targeted[1],
        "victim_seconds": victim_seconds,
        "clean_seconds": clean_seconds,
    }
    print(
        f"{case.name}: victim BA {accuracy[0]:.4f} ASR {targeted[0]:.4f} ({victim_seconds:.0f} s); clean model BA "
        f"{accuracy[1]:.4f}, ASR floor {targeted[1]:.4f} ({clean_seconds:.0f} s)"
    )
    if (targeted[0] < MIN_VICTIM_ASR or accuracy[0] < MIN_VICTIM_BA) and not allow_weak:
        raise SystemExit(
            f"{case.name}: the victim is no real backdoor (BA {accuracy[0]:.4f}, ASR {targeted[0]:.4f}; needs ASR >= "
            f"{MIN_VICTIM_ASR} and BA >= {MIN_VICTIM_BA}): change the case (epochs, trigger, poison rate)."
        )
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


# --- the user -----------------------------------------------------------------------------------------------------


def _listed(values: tuple[float, ...], channels: int) -> str:
    return json.dumps(list(values) * (channels // len(values)))


def before_arguments(case: Case, data: CaseData, extra: list[str]) -> list[str]:
    """The flags of the 528d108 own-model job (after its configs): the source's settings, 30 epochs, ``--arch``."""
    source = SOURCE
    mean, std = ((0.0,), (1.0,)) if case.export else (case.mean, case.std)
    arch = [] if case.export else ["--model.init_args.victim_arch", case.arch]
    return [
        "--trainer.max_epochs", str(BEFORE_EPOCHS), *arch,
        f"{source}root", str(data.folders["images"]),
        f"{source}num_classes", str(NUM_CLASSES),
        f"{source}image_size", str(case.image_size),
        f"{source}mean", _listed(mean, case.channels),
        f"{source}std", _listed(std, case.channels),
        f"{source}in_channels", str(case.channels),
        f"{source}test_root", str(data.folders["test"]),
        f"{source}triggered_root", str(data.folders["triggered"]),
        f"{source}target_label", str(case.target),
        *extra,
    ]  # fmt: skip


def after_arguments(case: Case, data: CaseData, model: Path, job: Path, extra: list[str]) -> list[str]:
    """``refine-pl defend``'s arguments as the user types them (``extra`` after ``--``: tests only)."""
    arch = [] if case.export else ["--arch", case.arch]
    return [
        str(model), str(data.folders["images"]), *arch, *case.user_flags,
        "--test-root", str(data.folders["test"]),
        "--triggered-root", str(data.folders["triggered"]),
        "--target-label", str(case.target),
        "--out", str(job),
        *(["--", *case.pass_through, *extra] if case.pass_through or extra else []),
    ]  # fmt: skip


def defense_row(
    case: Case, variant: str, folder: Path, data: CaseData, record: dict[str, Any], redo: bool, extra: list[str]
) -> dict[str, Any]:
    """The csv row of ``variant`` on ``case``: run (or resumed, or reused when finished and not ``redo``)."""
    job = folder / variant
    timing = job / "timing.json"
    finished = timing.is_file() and (job / "report.json").is_file()
    if finished and redo:
        start_over(job)
        finished = False
    if not finished:
        model = folder / "third_party" / case.model_file
        resumed = job.exists()
        start = time.perf_counter()
        if variant == "before":
            arguments = before_arguments(case, data, extra)
            run_defense(model, BEFORE_CONFIGS, job, arguments)
            command = ["run_defense", str(model), *BEFORE_CONFIGS, *arguments]
        else:
            command = ["refine-pl", "defend", *after_arguments(case, data, model, job, extra)]
            defend.main(command[2:])
        seconds = time.perf_counter() - start
        recipe = BEFORE_COMMIT if variant == "before" else configs_version(defend.DEFEND_CONFIGS)
        run = {"seconds": seconds, "resumed": resumed, "recipe": recipe, "command": command}
        timing.write_text(json.dumps(run, indent=1) + "\n")
    report, timed = json.loads((job / "report.json").read_text()), json.loads(timing.read_text())
    victim, defended = report[NO_DEFENSE.key], report[DEFENDED.key]
    label_free = report.get(LABEL_FREE) or {}
    return {
        "case": case.name,
        "variant": variant,
        "architecture": case.arch + (" (.pt2)" if case.export else ""),
        "image_size": case.image_size,
        "channels": case.channels,
        "unlabeled_images": case.images,
        "victim_ba": victim[BA],
        "victim_asr": victim[ASR],
        "floor": round(record["floor"], 6),
        "defended_ba": defended[BA],
        "defended_asr": defended[ASR],
        "ba_change": round(defended[BA] - victim[BA], 6),
        "agreement": label_free.get(AGREEMENT, ""),
        "epochs": label_free.get("epoch", ""),
        "seconds": round(timed["seconds"], 1),
        "recipe": timed.get("recipe", ""),
    }


# --- the report ---------------------------------------------------------------------------------------------------


def merged_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the rows of ``path`` (an earlier csv) of other cases and variants, in case then variant order."""
    kept = render.read_csv(path) if path.is_file() else []
    new = {(row["case"], row["variant"]) for row in rows}
    every = [row for row in kept if (row["case"], row["variant"]) not in new] + rows
    order = {name: index for index, name in enumerate(CASES)}
    return sorted(every, key=lambda row: (order.get(row["case"], len(order)), VARIANTS.index(row["variant"])))


def typed(case: Case) -> str:
    """What the user types beyond the model, the folders, ``--arch`` and the test options."""
    flags = [*case.user_flags, *(["--", *case.pass_through] if case.pass_through else [])]
    return " ".join(flags) or "(nothing more)"


def report_text(results_dir: Path, name: str, records: dict[str, dict[str, Any]], conditions: str) -> str:
    """``<name>.md``: the rendered table, the cases, how each variant runs, the gate, the conditions."""
    rows = render.read_csv(results_dir / f"{name}.csv")
    shown = list(dict.fromkeys(row["case"] for row in rows))
    cases = []
    for case_name in shown:
        case = CASES.get(case_name)
        if case is None:
            continue
        record = records.get(case_name)
        costs = (
            f"; the third party's training {record['victim_seconds']:.0f} s (victim) + {record['clean_seconds']:.0f} s "
            f"(clean model), clean model BA {record['clean_ba']:.4f}"
            if record
            else ""
        )
        handed = "a torch.export archive (.pt2)" if case.export else "bare weights (state_dict)"
        cases.append(
            f"- **{case.name}**: {case.what}; {case.images} unlabeled images; trigger {case.trigger.describe()}, "
            f"target {case.target}, {case.poison_rate:.0%} of the training images poisoned, seed {case.seed}, "
            f"{handed}; the user types `{typed(case)}`{costs}.{f' Note: {case.note}.' if case.note else ''}"
        )
    passing = [f"{row['case']} {row['variant']}" for row in rows if render.meets_gate(row)]
    return "\n".join(
        [
            "# Your own model, defended: before and after",
            "",
            render.own_model(results_dir, name),
            "",
            "Cases (images: the embedded MNIST-5k's digits; colour cases draw each digit in a random colour on a "
            "random background colour, resized to the case's size; test images: the 1,000 of the test split, "
            "triggered images: those of the other classes with the trigger):",
            "",
            *cases,
            "",
            f"- **before**: the own-model path of commit 528d108: `configs/refine/reference.yaml` + "
            f"`benchmarks/configs/own_model_528d108.yaml` (that commit's own-model overlay) + `--trainer.max_epochs "
            f"{BEFORE_EPOCHS}`, the source's settings as flags.",
            "- **after**: `refine-pl defend MODEL IMAGES [--arch ARCH] [the case's flags] --test-root TEST "
            "--triggered-root TRIGGERED --target-label T --out RUN` with the recipe of `refine_pl/defend.py` "
            "(`DEFEND_CONFIGS`) as it was when the row was run: the recipe column names the last commit of its configs "
            "(`+changes`: edited since).",
            "",
            f"Gate (the attacks table's): {render.GATE}; the floor is the clean model's rate of triggered images "
            "classified as the target. "
            f"Rows that meet it: {', '.join(passing) if passing else 'none'}. Victim BA / ASR and the defended figures "
            "are measured by refine-pl on the user's folders in the same test pass; agreement and epochs are the "
            "report's label-free estimate (the defended model's agreement with the victim on the held-out tenth of "
            "the unlabeled images) and the epoch it was taken at. Seconds: the defense (fit and test) wall clock.",
            "",
            f"Conditions: {conditions}",
        ]
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the cases with the command line ``argv``; returns the csv rows of this run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--redo", nargs="+", choices=VARIANTS, default=[],
        help="run these variants again even where finished (the earlier run is moved aside, nothing is deleted)",
    )  # fmt: skip
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "own_model")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--results-name", default="own_model", help="results file name stem")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument(
        "--conditions", default="",
        help="what else the machine was doing, for the report (default: nothing said)",
    )  # fmt: skip
    parser.add_argument("--victim-epochs", type=int, help="the third party's epochs of every case (tests only)")
    parser.add_argument("--allow-weak-victims", action="store_true", help="go on with a victim that is no backdoor")
    parser.add_argument(
        "--refine-arg", action="append", default=[], metavar="ARG",
        help="extra LightningCLI argument of both variants (tests only: it changes what the user types; repeat; write "
        "--refine-arg=--flag)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, records = [], {}
    for name in args.cases:
        case, folder = CASES[name], args.run_dir / name
        start = time.perf_counter()
        data = case_data(case, folder / "user")
        print(f"{name}: the user's folders in {time.perf_counter() - start:.0f} s")
        epochs = args.victim_epochs or case.epochs
        records[name] = third_party(case, data, folder / "third_party", epochs, args.allow_weak_victims)
        for variant in args.variants:
            row = defense_row(case, variant, folder, data, records[name], variant in args.redo, args.refine_arg)
            print(json.dumps(row))
            rows.append(row)
    csv_path = args.results_dir / f"{args.results_name}.csv"
    every = merged_rows(csv_path, rows)
    for name in {row["case"] for row in every} - set(records):
        record = args.run_dir / name / "third_party" / "record.json"
        if record.is_file():
            records[name] = json.loads(record.read_text())
    args.results_dir.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(every)
    conditions = (
        f"{args.threads} torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{os.cpu_count()} CPU cores. {args.conditions}".strip()
    )
    text = report_text(args.results_dir, args.results_name, records, conditions)
    (args.results_dir / f"{args.results_name}.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
