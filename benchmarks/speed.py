"""REFINE's speed: the project's training step against the reference recipe's, the fit loop, defended inference.

One run measures, side by side and interleaved (round after round, one timed step of every variant per round, so
that noise from other jobs hits every variant alike):

- ``steps``: the *reference-equivalent* training step, written as the REFINE reference code does it (float32, a
  victim pass on ``x`` for the pseudo-labels and a second on ``T(x)``, BCE on the remapped softmax, SupCon over
  two identical views, SGD), against ``RefineLitModule``'s own ``training_step`` (with the batch its datamodule
  gives, then backward and the optimizer step, as ``Trainer.fit`` takes them) with every speed option off, then with
  the options added one at a time, then with its defaults, and with ``compile=True`` (compile time reported on its
  own). Settings at equal model sizes: ``cifar10`` (ResNet-18 CIFAR layout + U-Net 64, 32 px, batch 128, the
  reference augmentation, so no pseudo-label cache), ``mnist`` (the main job's: small CNN + U-Net 16, 28 px,
  batch 64, no augmentation) and, when asked, ``imagenet50`` (ResNet-18 + U-Net 32, 224 px). Random images
  already on the device: data loading is not timed. Each setting's row also projects the full 150-epoch run.
- ``profile``: where the default step's time goes in each setting, the operators with the most self time
  (``torch.profiler``), to show what is left to gain.
- ``fit``: the whole ``Trainer.fit`` loop of the main job's REFINE stage (embedded MNIST, data loading and
  logging included) with the project's defaults against every speed option off, interleaved run by run; with
  ``--processes 1 2`` also 2 CPU processes (gloo, ``ddp_spawn``) with the same global batch.
- ``inference``: latency and throughput of the defended classifier ``M(f(T(x)))`` as users deploy it (exported
  to ``defended.safetensors`` and read back with ``load_defended``) against the bare victim ``f(x)``, CIFAR-10
  setting, U-Net widths 16, 32 and 64, batch 1 and 256.

Victims have random weights (speed does not depend on them). Everything runs on the CPU with ``--threads``
torch threads, and on the GPU too when there is one (``--devices``). The conditions (threads, load average,
``--conditions`` text) are written with the tables to ``benchmarks/results/speed.md`` and ``speed.csv``::

    python benchmarks/speed.py --threads 2 --conditions "nothing else running"
    python benchmarks/speed.py --parts steps --settings cifar10 --rounds 3
"""

import argparse
import copy
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor

from datamodules import CIFAR10, DatasetSource, EmbeddedMNIST, ImageFolder, RefineDataModule
from refine_pl import RefineLitModule, VictimLitModule
from refine_pl.architectures import build_architecture
from refine_pl.batches import IndexedImages
from refine_pl.cli import LINKED_DATA_FACTS
from refine_pl.export import export_defended, load_defended
from refine_pl.internals import native_bf16
from refine_pl.transform import UNet

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE_TOP = 8
"""How many operators the profile table lists per setting."""
OPTIONS_OFF = {"bf16": False, "channels_last": False, "pseudo_label_cache": False}


@dataclass(frozen=True)
class Setting:
    """A REFINE setting: the data, victim, U-Net, batch, and the size of its full run.

    Attributes:
        name: The setting's name in the tables.
        source: The dataset whose facts (classes, channels, image size, normalisation) the setting takes; never
            read (the steps run on random images).
        arch: Registered victim architecture.
        unet_width: First width of the U-Net.
        batch: Training batch.
        augmented: Whether the setting trains on augmented images (plain image batches, no pseudo-label cache).
        train_images: Training images of the full run.
        epochs: Epochs of the full run.
        description: The setting in words.
    """

    name: str
    source: DatasetSource
    arch: str
    unet_width: int
    batch: int
    augmented: bool
    train_images: int
    epochs: int
    description: str

    def facts(self) -> dict[str, Any]:
        """The data facts the CLI links from the datamodule to the model."""
        return {fact: getattr(self.source, fact) for fact in LINKED_DATA_FACTS}

    def images(self, device: torch.device, batch: int | None = None) -> Tensor:
        """A seeded batch of random images of the setting's shape on ``device`` (of its training batch if None)."""
        shape = (batch or self.batch, self.source.in_channels, self.source.image_size, self.source.image_size)
        return torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)


SETTINGS = {
    "cifar10": Setting(
        "cifar10", CIFAR10(), "resnet18_cifar", 64, 128, True, 45_000, 150,
        "CIFAR-10: ResNet-18 (CIFAR) + U-Net 64, 32 px, reference augmentation",
    ),
    "mnist": Setting(
        "mnist", EmbeddedMNIST(), "small_cnn", 16, 64, False, 3_600, 20,
        "main job: small CNN + U-Net 16, 28 px, no augmentation",
    ),
    "imagenet50": Setting(
        "imagenet50", ImageFolder("data/imagenet50", num_classes=50), "resnet18", 32, 16, True, 22_500, 150,
        "ImageNet-subset: ResNet-18 + U-Net 32, 224 px, reference augmentation",
    ),
}  # fmt: skip
"""Training images are those of the project's configs (10% of each class held out for validation)."""


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``function`` takes, its device work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


# --- the reference-equivalent step ------------------------------------------------------------------------------


def two_view_supcon(features: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss over two views per sample, as the reference computes it.

    The reference stacks each sample's features twice (``[B, 2, D]``) and runs Khosla et al.'s loss over all
    ``2B`` views: ``2B x 2B`` similarities, the row maximum subtracted, every other view of the same label a
    positive (the sample's own second view included), the mean log-probability of the positives averaged over
    the ``2B`` anchors.

    Args:
        features: ``[B, D]`` L2-normalised features.
        labels: ``[B]`` long pseudo-labels.
        temperature: Softmax temperature (0.07 in the reference).
    """
    views = torch.cat([features, features])
    view_labels = torch.cat([labels, labels])
    logits = views @ views.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(len(views), device=views.device)
    positives = (view_labels[:, None] == view_labels[None, :]).float() * not_self
    log_prob = logits - torch.log((logits.exp() * not_self).sum(1, keepdim=True))
    return -((positives * log_prob).sum(1) / positives.sum(1)).mean()


class ReferenceStep:
    """One training step the way the REFINE reference code takes it, on the same U-Net and victim as the project.

    Float32, contiguous tensors, a victim pass on the images for the pseudo-labels (its parameters are frozen, so
    it builds no graph), the U-Net, a second victim pass on ``T(x)``, the softmax remapped by scattering it with
    the permutation, ``BCELoss`` against the one-hot pseudo-labels, :func:`two_view_supcon` with weight 0.1 over
    the flattened, normalised ``T(x)``, and the reference SGD.
    """

    def __init__(self, module: RefineLitModule) -> None:
        self.unet = copy.deepcopy(module.transform).to(memory_format=torch.contiguous_format).train()
        self.victim = copy.deepcopy(module.victim).to(memory_format=torch.contiguous_format).eval()
        self.permutation = module.remap.permutation.clone()
        self.optimizer = torch.optim.SGD(self.unet.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def __call__(self, images: Tensor) -> None:
        logits = self.victim(images)
        pseudo_labels = logits.argmax(1)
        one_hot = torch.zeros_like(logits).scatter_(1, pseudo_labels[:, None], 1.0)
        transformed = self.unet(images)
        probabilities = F.softmax(self.victim(transformed), dim=1)
        index = self.permutation.repeat(len(images), 1)
        remapped = torch.zeros_like(probabilities).scatter(1, index, probabilities)
        features = F.normalize(transformed.view(len(images), -1), dim=1)
        loss = F.binary_cross_entropy(remapped, one_hot) + 0.1 * two_view_supcon(features, pseudo_labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


# --- the project's step -----------------------------------------------------------------------------------------


def write_victim(setting: Setting, folder: Path) -> Path:
    """A state_dict file of the setting's victim architecture with random weights."""
    source = setting.source
    path = folder / f"{setting.arch}_{source.num_classes}_{source.in_channels}.pt"
    if not path.exists():
        torch.save(build_architecture(setting.arch, source.num_classes, source.in_channels).state_dict(), path)
    return path


def project_module(setting: Setting, victim: Path, **options: Any) -> RefineLitModule:
    """``RefineLitModule`` of the setting, seeded, with ``options`` (bf16, channels_last, ...) over the defaults."""
    torch.manual_seed(0)
    options = {"transform": partial(UNet, base_width=setting.unet_width), **options}
    return RefineLitModule(victim_checkpoint=str(victim), **setting.facts(), victim_arch=setting.arch, **options)


class ProjectStep:
    """``RefineLitModule.training_step`` on the batch its datamodule gives, backward and the optimizer step.

    The step ``Trainer.fit`` takes (automatic optimization). Un-augmented settings pass
    :class:`~refine_pl.batches.IndexedImages`, as :class:`~datamodules.RefineDataModule` does, so a module with the
    pseudo-label cache reads the labels it computed in the first step: the steady state of every epoch after the
    first. Augmented settings pass the images alone, as the reference augmentation does.
    """

    def __init__(self, setting: Setting, victim: Path, device: torch.device, **options: Any) -> None:
        self.module = project_module(setting, victim, **options).to(device).train()
        self.optimizer = self.module.configure_optimizers()
        self.augmented = setting.augmented

    def __call__(self, images: Tensor) -> None:
        batch = images if self.augmented else IndexedImages(images, torch.arange(len(images), device=images.device))
        self.optimizer.zero_grad(set_to_none=True)
        self.module.training_step(batch, 0).backward()
        self.optimizer.step()


def fused_sgd(params: Any) -> torch.optim.Optimizer:
    """The reference SGD with torch's fused kernel."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)


@dataclass
class Variant:
    """A row of the step table: its module options, and whether the setting allows it."""

    name: str
    options: dict[str, Any] | None  # None: the reference step
    applies: Callable[[Setting], bool] = lambda setting: True
    note: str = ""


def step_variants(device: torch.device) -> list[Variant]:
    """The rows of the step table, top to bottom.

    The reference; the project with every option off, then the options added one at a time; the defaults; and
    candidates measured against the defaults that are not defaults (compile is an option).
    """
    bf16_note = "" if native_bf16(device) else "no native bf16 on this device: off by default"
    return [
        Variant("reference recipe (fp32)", None),
        Variant("project, every speed option off (fp32)", dict(OPTIONS_OFF)),
        Variant("+ channels_last", {**OPTIONS_OFF, "channels_last": True}),
        Variant("+ bf16 autocast", {**OPTIONS_OFF, "channels_last": True, "bf16": True}, note=bf16_note),
        Variant(
            "+ pseudo-label cache",
            {"bf16": True, "channels_last": True, "pseudo_label_cache": True},
            applies=lambda setting: not setting.augmented,
        ),
        Variant("project defaults", {}),
        Variant("defaults + compile (option)", {"compile": True}),
        Variant("defaults + fused SGD (not adopted)", {"optimizer": fused_sgd}),
    ]


@dataclass
class Row:
    """One measured line of a table (also a line of the csv)."""

    part: str
    setting: str
    variant: str
    device: str
    batch: int
    seconds: list[float]
    reference: float | None = None  # images/s this row is compared with
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.batch / self.median

    @property
    def ratio(self) -> float | None:
        return None if self.reference is None else self.rate / self.reference


def measure_steps(setting: Setting, device: torch.device, folder: Path, args: argparse.Namespace) -> list[Row]:
    """The step table of one setting on one device: every variant, interleaved round by round."""
    # Each setting compiles from scratch, as a user's job does: after another setting's shapes, dynamo would
    # recompile with dynamic image sizes instead (and inductor of torch 2.14 fails on the U-Net's padding then).
    torch._dynamo.reset()
    victim = write_victim(setting, folder)
    images = setting.images(device)
    steps: dict[str, Callable[[Tensor], None]] = {}
    notes: dict[str, str] = {}
    first_steps: dict[str, float] = {}
    for variant in step_variants(device):
        if not variant.applies(setting) or ((variant.options or {}).get("compile") and not args.compile):
            continue
        if variant.options is None:
            steps[variant.name] = ReferenceStep(project_module(setting, victim, **OPTIONS_OFF).to(device))
        else:
            steps[variant.name] = ProjectStep(setting, victim, device, **variant.options)
        notes[variant.name] = variant.note
        # The first step compiles (compile=True) and fills the pseudo-label cache; it is reported on its own.
        first_steps[variant.name] = timed(partial(steps[variant.name], images), device)
        print(f"  {setting.name} / {variant.name}: first step {first_steps[variant.name]:.2f} s", flush=True)
    for _ in range(args.warmup):
        for step in steps.values():
            step(images)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(timed(partial(step, images), device))
        print(f"  {setting.name} round {round_ + 1}/{args.rounds}", flush=True)
    reference_rate = setting.batch / statistics.median(seconds[next(iter(steps))])
    rows = []
    for name in steps:
        row = Row("steps", setting.name, name, device_label(device), setting.batch, seconds[name], reference_rate)
        row.note = notes[name]
        row.extra["first_step_s"] = first_steps[name]
        row.extra["projected_full_run"] = duration(setting.train_images * setting.epochs / row.rate)
        rows.append(row)
    return rows


def profile_default_step(setting: Setting, device: torch.device, folder: Path, args: argparse.Namespace) -> list[dict]:
    """Where the default step's time goes: the operators with the most self time over ``--rounds`` profiled steps.

    Returns one dict per operator (``setting, device, operator, share, calls_per_step``), the largest shares first
    (the top :data:`PROFILE_TOP`), ``share`` of the self time of all operators (CPU time, or CUDA time on a GPU).
    """
    torch._dynamo.reset()
    step = ProjectStep(setting, write_victim(setting, folder), device)
    images = setting.images(device)
    for _ in range(1 + args.warmup):  # the first step fills the pseudo-label cache (un-augmented settings)
        step(images)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(args.rounds):
            step(images)
        synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [event for event in profiler.key_averages() if getattr(event, attribute) > 0]
    total = sum(getattr(event, attribute) for event in events)
    events.sort(key=lambda event: getattr(event, attribute), reverse=True)
    print(f"  profiled {setting.name}: {args.rounds} default steps", flush=True)
    return [
        {"setting": setting.name, "device": device_label(device), "operator": event.key,
         "share": getattr(event, attribute) / total, "calls_per_step": event.count / args.rounds}
        for event in events[:PROFILE_TOP]
    ]  # fmt: skip


# --- the fit loop -----------------------------------------------------------------------------------------------


class EpochTimer(Callback):
    """Writes ``{"train_seconds", "images"}`` of the training epochs to ``path`` on rank 0 at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seconds = 0.0
        self.images = 0
        self.start = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        synchronize(pl_module.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        synchronize(pl_module.device)
        self.seconds += time.perf_counter() - self.start
        batch = trainer.train_dataloader.batch_size * trainer.world_size
        self.images += trainer.num_training_batches * batch

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            timing = {"train_seconds": self.seconds, "images": self.images, "threads": torch.get_num_threads()}
            Path(self.path).write_text(json.dumps(timing))


def fit_once(
    victim: Path, folder: Path, device: torch.device, processes: int, epochs: int, **options: Any
) -> tuple[float, int]:
    """``(seconds per global batch, threads per process)`` of the main job's REFINE stage through ``Trainer.fit``."""
    setting = SETTINGS["mnist"]
    seed_everything(0, verbose=False)
    module = RefineLitModule(
        victim_checkpoint=str(victim), **setting.facts(), transform=partial(UNet, base_width=16), **options
    )
    data = RefineDataModule(setting.source, batch_size=setting.batch // processes, augment=False)
    result = folder / "fit.json"
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=processes,
        strategy="ddp_spawn" if processes > 1 else "auto",
        max_epochs=epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        callbacks=[EpochTimer(str(result))],
    )
    trainer.fit(module, datamodule=data)
    timing = json.loads(result.read_text())
    return timing["train_seconds"] / timing["images"] * setting.batch, timing["threads"]


def measure_fit(device: torch.device, folder: Path, args: argparse.Namespace) -> list[Row]:
    """The fit-loop table: defaults against every option off, per process count, interleaved run by run."""
    victim = folder / "victim.ckpt"
    net = VictimLitModule(**SETTINGS["mnist"].facts())
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": dict(net.hparams)}, victim)
    variants = {"every speed option off (fp32)": OPTIONS_OFF, "project defaults": {}}
    rows = []
    for processes in args.processes if device.type == "cpu" else [1]:
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        threads = 0
        for repeat in range(args.fit_repeats):
            for name, options in variants.items():
                batch_seconds, threads = fit_once(victim, folder, device, processes, args.fit_epochs, **options)
                seconds[name].append(batch_seconds)
                print(f"  fit, {processes} process(es), {name}, run {repeat + 1}: {batch_seconds:.3f} s/batch")
        reference = SETTINGS["mnist"].batch / statistics.median(seconds[next(iter(variants))])
        label = f"{processes} process{'es' if processes > 1 else ''} x {threads} thread(s)"
        for name in variants:
            row = Row("fit", "mnist", f"{label}, {name}", device_label(device), SETTINGS["mnist"].batch, seconds[name])
            row.reference = reference
            rows.append(row)
    return rows


# --- defended inference -----------------------------------------------------------------------------------------


def measure_inference(device: torch.device, folder: Path, args: argparse.Namespace) -> list[Row]:
    """Latency of the exported defended classifier against the bare victim, CIFAR-10 setting, per U-Net width."""
    setting = SETTINGS["cifar10"]
    victim = write_victim(setting, folder)
    rows = []
    for width in args.widths:
        module = project_module(setting, victim, transform=partial(UNet, base_width=width))
        path = export_defended(module.defended, setting.source.image_size, folder / f"defended_{width}.safetensors")
        defended = load_defended(path).to(device)
        for batch in args.inference_batches:
            images = setting.images(device, batch)
            classifiers = {"bare victim f(x)": defended.victim, f"defended M(f(T(x))), U-Net {width}": defended}
            seconds: dict[str, list[float]] = {name: [] for name in classifiers}
            with torch.inference_mode():
                for classifier in classifiers.values():
                    for _ in range(args.warmup + 1):
                        classifier(images)
                repeats = args.rounds * (8 if batch == 1 else 1)
                for _ in range(repeats):
                    for name, classifier in classifiers.items():
                        seconds[name].append(timed(partial(classifier, images), device))
            victim_rate = batch / statistics.median(seconds["bare victim f(x)"])
            for name in classifiers:
                rows.append(Row("inference", f"U-Net {width}", name, device_label(device), batch, seconds[name]))
                rows[-1].reference = victim_rate
            print(f"  inference, U-Net {width}, batch {batch}: {rows[-1].median * 1e3:.2f} ms defended, "
                  f"{rows[-2].median * 1e3:.2f} ms victim", flush=True)  # fmt: skip
    return rows


# --- report -----------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``"3 d 4.2 h"``, ``"5.1 h"`` or ``"12 min"``."""
    if seconds >= 86_400:
        return f"{int(seconds // 86_400)} d {seconds % 86_400 / 3600:.1f} h"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s)"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ratio_text(row: Row) -> str:
    return "" if row.ratio is None else f"{row.ratio:.2f}x"


def write_results(
    rows: list[Row], profiles: list[dict], args: argparse.Namespace, argv: list[str], loads: tuple[float, float]
) -> None:
    """Writes ``speed.md`` (tables and conditions) and ``speed.csv`` (one line per timed row) to ``--output-dir``."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with (args.output_dir / "speed.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["part", "setting", "variant", "device", "batch", "median_s", "min_s", "max_s", "images_per_s",
             "ratio", "first_step_s", "note"]
        )  # fmt: skip
        for row in rows:
            writer.writerow(
                [row.part, row.setting, row.variant, row.device, row.batch, f"{row.median:.5f}",
                 f"{min(row.seconds):.5f}", f"{max(row.seconds):.5f}", f"{row.rate:.1f}",
                 "" if row.ratio is None else f"{row.ratio:.3f}", f"{row.extra.get('first_step_s', '')}", row.note]
            )  # fmt: skip
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = [
        "# REFINE speed",
        "",
        f"Written by `python benchmarks/speed.py {' '.join(argv)}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, native bf16: {native_bf16(torch.device('cpu'))}; GPU: {gpu}. "
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}. Torch threads: {args.threads}.",
        f"Conditions: {args.conditions or 'not stated'}; 1-minute load average {loads[0]:.2f} at the start, "
        f"{loads[1]:.2f} at the end.",
        f"Each figure is the median of {args.rounds} interleaved rounds after {args.warmup} warm-up round(s).",
    ]
    parts = {row.part for row in rows}
    if "steps" in parts:
        lines += [
            "",
            "## Training step, side by side (random images on the device; data loading not timed)",
            "",
            "| setting | device | variant | batch | s / step, median (min-max) | images / s | vs reference | "
            "first step (s) | projected full run | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if row.part == "steps":
                lines.append(
                    f"| {row.setting} | {row.device} | {row.variant} | {row.batch} | {row.median:.3f} "
                    f"({min(row.seconds):.3f}-{max(row.seconds):.3f}) | {row.rate:.1f} | {ratio_text(row)} | "
                    f"{row.extra['first_step_s']:.2f} | {row.extra['projected_full_run']} | {row.note} |"
                )
        lines += [
            "",
            "Settings: " + "; ".join(f"`{s.name}` = {s.description}" for s in SETTINGS.values()) + ".",
            "Variants add up from top to bottom; `project defaults` is `RefineLitModule()` as configs build it. The "
            "pseudo-label cache applies to un-augmented data only; its rows show the steady state of every epoch "
            "after the first (the first step computes the labels: `first step`). `first step` of `compile` is its "
            "compile time. The projected full run is (training images x epochs) / (images / s), training steps only.",
        ]
    if "fit" in parts:
        lines += [
            "",
            "## The fit loop of the main job's REFINE stage (Trainer.fit, data loading and logging included)",
            "",
            "| device | configuration | global batch | s / batch, median (min-max) | images / s | vs options off |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            if row.part == "fit":
                lines.append(
                    f"| {row.device} | {row.variant} | {row.batch} | {row.median:.4f} "
                    f"({min(row.seconds):.4f}-{max(row.seconds):.4f}) | {row.rate:.1f} | {ratio_text(row)} |"
                )
        lines += [
            "",
            f"{args.fit_epochs} epoch(s) of the embedded MNIST training split per run (the first epoch computes the "
            f"pseudo-labels the cache keeps), {args.fit_repeats} run(s) of each configuration, alternating; "
            "validation off; the global batch is split over the processes.",
        ]
    if "inference" in parts:
        lines += [
            "",
            "## Defended inference (load_defended of an exported defended.safetensors), CIFAR-10 setting",
            "",
            "| device | U-Net | batch | classifier | latency ms, median (min-max) | images / s | vs bare victim |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if row.part == "inference":
                cost = "" if row.ratio is None else f"{1 / row.ratio:.2f}x latency"
                lines.append(
                    f"| {row.device} | {row.setting} | {row.batch} | {row.variant} | {row.median * 1e3:.2f} "
                    f"({min(row.seconds) * 1e3:.2f}-{max(row.seconds) * 1e3:.2f}) | {row.rate:.1f} | {cost} |"
                )
        lines += [
            "",
            "ResNet-18 (CIFAR layout) victim with random weights, float32, `torch.inference_mode()`; the bare victim "
            "is the loaded classifier's own `f` (with its normalisation).",
        ]
    if profiles:
        lines += [
            "",
            "## Where the default step's time goes (torch.profiler, operators by self time)",
            "",
            "| setting | device | operator | share of the step | calls per step |",
            "|---|---|---|---|---|",
            *(
                f"| {p['setting']} | {p['device']} | `{p['operator']}` | {p['share']:.1%} | {p['calls_per_step']:.0f} |"
                for p in profiles
            ),
            "",
            f"The project's default step, {args.rounds} steps profiled after the warm-up; the {PROFILE_TOP} operators "
            "with the most self time (time in the operator itself, not in the operators it calls).",
        ]
    if not any(device == "cuda" for device in args.devices):
        lines += ["", "No GPU was available for this run: no GPU row was measured."]
    (args.output_dir / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nWritten to {args.output_dir / 'speed.md'} and {args.output_dir / 'speed.csv'}")


def main(argv: list[str]) -> None:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["steps", "profile", "fit", "inference"]
    parser.add_argument("--parts", nargs="+", choices=parts, default=parts)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["cifar10", "mnist"])
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda if available")
    parser.add_argument(
        "--batch", action="append", default=[], metavar="SETTING=SIZE",
        help="batch of a setting (default: cifar10=128, mnist=64, imagenet50=16, which fits a CPU's memory at 224 px)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="time compile=True")
    parser.add_argument("--processes", type=int, nargs="+", default=[1], help="CPU processes of the fit part")
    parser.add_argument("--fit-epochs", type=int, default=2, help="training epochs per fit run")
    parser.add_argument("--fit-repeats", type=int, default=2, help="fit runs per configuration")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="U-Net widths (inference)")
    parser.add_argument("--inference-batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--conditions", default="", help="what else ran on the machine, for the results file")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for override in args.batch:
        name, _, size = override.partition("=")
        if name not in SETTINGS or not size.isdigit() or int(size) < 2:
            parser.error(f"--batch {override}: expected SETTING=SIZE with SETTING in {sorted(SETTINGS)} and SIZE >= 2")
        SETTINGS[name] = replace(SETTINGS[name], batch=int(size))
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0]
    rows: list[Row] = []
    profiles: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.devices:
            device = torch.device(name)
            if "steps" in args.parts:
                for setting in args.settings:
                    rows += measure_steps(SETTINGS[setting], device, folder, args)
            if "profile" in args.parts:
                for setting in args.settings:
                    profiles += profile_default_step(SETTINGS[setting], device, folder, args)
            if "fit" in args.parts:
                rows += measure_fit(device, folder, args)
            if "inference" in args.parts:
                rows += measure_inference(device, folder, args)
    write_results(rows, profiles, args, argv, (load_start, os.getloadavg()[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
