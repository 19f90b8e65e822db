"""Callback that writes the tested defended classifier for deployment (ONNX, TorchScript) and its model card."""

import hashlib
import importlib.metadata
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_only

from callbacks.export import exportable_defense
from callbacks.report import defense_report, detector_line, format_report_table, label_free_line, report_path
from refine_pl.black_box import BlackBox, OnnxBlackBox
from refine_pl.black_box_export import export_black_box_onnx
from refine_pl.detection import calibrate_on
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.export import ONNX_OPSET, export_onnx, export_torchscript
from refine_pl.input_transform_module import InputTransformDefense

FORMATS = {"onnx": "defended.onnx", "torchscript": "defended.torchscript.pt"}
"""The deployment formats and the files they are written to."""

CARD = "MODEL_CARD.md"
"""The model card's file name."""

PACKAGES = ("refine-pl", "torch", "torchvision", "pytorch-lightning", "safetensors", "onnx", "onnxruntime")
"""The packages whose versions the model card records (those installed)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> str:
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join([*found, f"Python {platform.python_version()}"])


def model_card(
    trainer: Trainer, module: InputTransformDefense, report: dict[str, Any] | None, files: dict[str, str]
) -> str:
    """The model card of a REFINE run, as markdown.

    Args:
        trainer: The trainer that fitted or tested ``module``.
        module: The module.
        report: Its :func:`~callbacks.report.defense_report` after a test; None after fitting (nothing measured).
        files: ``{file name in the run folder: what it is}`` of the files the card describes (those that exist are
            listed with their sha256).
    """
    data = trainer.datamodule
    source = data.source
    hparams = module.hparams
    record = module.victim_record
    size, channels = hparams.image_size, hparams.in_channels
    root = Path(trainer.default_root_dir)
    names = data.class_names
    if report is None:
        label_free = label_free_line(module.label_free_estimate)
        # A black box is not asked more queries for the detector's calibration.
        black_box = isinstance(module.victim, BlackBox)
        detector = None if black_box else detector_line(calibrate_on(module.defended, data.val_set))
        measured = [
            "Not measured yet: `test` the run (`--ckpt_path last`) to measure BA and ASR; it writes this card again.",
            *(["", label_free] if label_free else []),
            *(["", detector] if detector else []),
        ]
    else:
        images = report["test_images"]
        clean, poisoned = images["clean"]["measured"], images["triggered"]["measured"]
        if report["attack"]:
            asr_from = f"attack {report['attack']}, target class {report['target_label']}"
        elif poisoned:
            asr_from = f"the triggered images of `{source.triggered_root}`, target class {source.target_label}"
        else:
            asr_from = "no attack or triggered images given, so ASR is n/a"
        test_from = f" from `{source.test_root}`" if getattr(source, "test_root", None) else ""
        measured = [
            f"- BA on {clean} labeled test images{test_from}; ASR on {poisoned} triggered test images ({asr_from}).",
            "- any-class ASR: the largest share of the triggered images that any one class receives among those not of "
            "that class. The remap moves the target class, so a trigger that survived the transform would show here "
            "and not in the ASR; n/a when the triggered images' true classes are unknown.",
            "",
            format_report_table(report),
        ]
    tested = f"after testing `{trainer.ckpt_path}`" if report is not None else "after fitting"
    train_from = f" from `{source.root}`" if hasattr(source, "root") else ""
    unet = f"first width {module.transform.base_width}, depth {module.transform.depth}"
    held_out = data.val_set is not None and len(data.val_set) > 0
    lines = [
        f"# Model card: REFINE-defended classifier ({source.name})",
        "",
        f"Written by refine-pl on {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} {tested}.",
        "",
        "## Files",
        "",
        "| file | what it is | sha256 |",
        "|---|---|---|",
        *(f"| {name} | {what} | `{_sha256(root / name)}` |" for name, what in files.items() if (root / name).is_file()),
        "",
        "## Input and output",
        "",
        f"- Input: float images `[batch, {channels}, {size}, {size}]` with pixels in [0, 1]; the model normalises "
        f"them itself (mean {list(hparams.mean)}, std {list(hparams.std)}). Images of another size: "
        + ("shorter side resized to it, centre-cropped." if source.crop else "stretched to it."),
        f"- Output: logits `[batch, {hparams.num_classes}]` over the victim's classes"
        + (f" ({', '.join(names)})." if names else "."),
        "",
        "## Victim (the suspect model)",
        "",
        f"- File: `{record.path}`, sha256 `{record.sha256}`",
        f"- Architecture: `{record.arch}`",
        "",
        *(_black_box_lines(module) if isinstance(module.victim, BlackBox) else []),
        "## Defense",
        "",
        f"- REFINE: a U-Net ({unet}) in front of the frozen victim, and a fixed output remap drawn from seed "
        f"{hparams.remap_seed} (victim class c becomes class permutation[c], permutation "
        f"{module.remap.permutation.tolist()}).",
        f"- Trained on {len(data.train_set)} images{train_from}"
        + (", unlabeled" if not source.labeled_train else "; their labels were not used")
        + (f"; {len(data.val_set)} more held out, never trained on (the label-free agreement)." if held_out else "."),
        "",
        "## Measured on held-out test images",
        "",
        *measured,
        "",
        "## Software",
        "",
        f"- {_versions()}",
        "",
    ]
    return "\n".join(lines)


def _black_box_lines(module: InputTransformDefense) -> list[str]:
    """What the card says of a black-box defense: what the victim answered, the surrogate, the queries."""
    record = getattr(module, "record", {})
    agreement = record.get("surrogate_test_agreement")
    queries = getattr(module, "training_queries", 0)
    refreshes = int(record.get("surrogate_refreshes", 0))
    refreshed = f" and refreshed {refreshes} times on the victim's answers to T's output" if refreshes else ""
    return [
        "## Black box",
        "",
        f"- The victim only answered queries ({record.get('answers', module.victim.answers)}): "
        f"{record.get('answered_images', queries)} images for training, {queries} training queries in all; T "
        f"trained through a surrogate (`{record.get('surrogate_arch')}`) distilled from those answers{refreshed}, "
        "with the victim's own answers to the original images as pseudo-labels. The deployed classifier is "
        "M(victim(T(x))).",
        *(
            [f"- The surrogate's agreement with the victim on the clean test images: {agreement:.4f}."]
            if agreement
            else []
        ),
        "",
    ]


class DeploymentFiles(Callback):
    """After ``fit`` and ``test``, writes the defended classifier for runtimes without refine-pl, and a model card.

    As ``defended.safetensors`` (:class:`~callbacks.ExportDefendedClassifier`), the files describe the last trained
    weights after ``fit`` and the tested checkpoint after ``test``, whose card has the measured BA / ASR.

    Files in the trainer's ``default_root_dir``: ``defended.onnx`` (ONNX opset :data:`~refine_pl.export.ONNX_OPSET`,
    input ``images`` with a dynamic batch, output ``logits``), ``defended.torchscript.pt`` (``torch.jit.trace``) and
    ``MODEL_CARD.md``: the victim file's sha256 and architecture, the data used, the remap, the measured BA / ASR,
    the files' sha256 and the package versions. The exported models do not check their input (the safetensors file
    loaded with :func:`refine_pl.export.load_defended` does).

    Args:
        formats: Which of ``onnx`` and ``torchscript`` to write ([]: the model card only).
    """

    def __init__(self, formats: list[str] | None = None) -> None:
        formats = list(FORMATS) if formats is None else formats
        unknown = sorted(set(formats) - set(FORMATS))
        if unknown:
            raise ConfigError(
                f"Unknown deployment format(s) {unknown}: choose among {sorted(FORMATS)} "
                f"({cli_flag('trainer', 'callbacks')} DeploymentFiles formats)."
            )
        self.formats = formats

    @rank_zero_only
    def _write(self, trainer: Trainer, pl_module: LightningModule, report: dict[str, Any] | None) -> None:
        defense = exportable_defense(trainer, pl_module, type(self).__name__, CARD)
        root = Path(trainer.default_root_dir)
        defended, size = defense.defended, defense.hparams.image_size
        if isinstance(defended.victim, BlackBox):  # T and M around a black box: one ONNX graph for an ONNX victim
            if "onnx" in self.formats and isinstance(defended.victim, OnnxBlackBox):
                export_black_box_onnx(defended, size, root / FORMATS["onnx"])
            files = {
                "defended.safetensors": "T and M of the black-box defense; load with "
                "`refine_pl.black_box_export.load_black_box_defense` around the black box",
                FORMATS["onnx"]: f"ONNX opset {ONNX_OPSET}: T, the victim's graph and M, input `images`, output "
                "`logits`, dynamic batch",
            }
        else:
            if "onnx" in self.formats:
                export_onnx(defended, size, root / FORMATS["onnx"])
            if "torchscript" in self.formats:
                export_torchscript(defended, size, root / FORMATS["torchscript"])
            files = {
                "defended.safetensors": "weights and description; load with `refine_pl.export.load_defended`",
                FORMATS["onnx"]: f"ONNX opset {ONNX_OPSET}, input `images`, output `logits`, dynamic batch",
                FORMATS["torchscript"]: "TorchScript (`torch.jit.trace`), dynamic batch",
            }
        card = root / CARD if report is None else report_path(root / CARD, report)
        card.write_text(model_card(trainer, defense, report, files))
        print(f"Deployment files and model card saved to {root}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, None)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, defense_report(trainer, pl_module, CARD))
