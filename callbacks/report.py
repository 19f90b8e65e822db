"""Callback that turns the test run of a defense into the before/after BA / ASR / any-class ASR / RA / DER report."""

import json
import math
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from callbacks.checkpoint import require_trained_weights
from refine_pl.classifier import DefendedClassifier
from refine_pl.defended_module import DefendedLitModule
from refine_pl.defenses import DEFENSES
from refine_pl.detection import DETECTOR, calibrate_on, defended_scores, flag, image_batches
from refine_pl.errors import ConfigError
from refine_pl.metric_names import (
    AGREEMENT,
    CLEAN_FLOOR,
    DEFENDED,
    FINDINGS,
    LABEL_FREE,
    NO_DEFENSE,
    RATE_LABELS,
    REPORT_ROWS,
)


def _measured(metrics: dict[str, Any], key: str) -> float | None:
    """The logged rate under ``key``, or None when it was not measured (not logged, or over no sample)."""
    value = metrics.get(key)
    return None if value is None or math.isnan(float(value)) else round(float(value), 6)


def test_images(trainer: Trainer, pl_module: DefendedLitModule) -> dict[str, dict[str, int]]:
    """How many clean and triggered test images the last test measured, of how many the test sets hold.

    Fewer are measured than there are when the test was cut short (``limit_test_batches``, ``fast_dev_run``).
    """
    measured = pl_module.evaluated_images("test")
    available = [len(loader.dataset) for loader in trainer.test_dataloaders or []] + [0, 0]
    return {
        kind: {"measured": count, "of": total}
        for kind, count, total in zip(("clean", "triggered"), measured, available[:2], strict=True)
    }


def is_partial(report: dict[str, Any]) -> bool:
    """Whether a report's figures come from a test cut short (fewer images measured than its test sets hold)."""
    return any(images["measured"] < images["of"] for images in report.get("test_images", {}).values())


def partial_notice(report: dict[str, Any]) -> str:
    """One sentence that a report's test was cut short, with its image counts; empty for a full test."""
    if not is_partial(report):
        return ""
    counts = ", ".join(
        f"{images['measured']} of {images['of']} {kind}" for kind, images in report["test_images"].items()
    )
    return f"**Partial test** ({counts} test images): these figures are not the defense's."


def label_free_line(estimate: dict[str, Any] | None) -> str:
    """One sentence with the label-free agreement of a run (:data:`~refine_pl.metric_names.LABEL_FREE`), or empty."""
    if not estimate:
        return ""
    return (
        f"Label-free agreement with the victim on {estimate['held_out_images']} held-out training images "
        f"(epoch {estimate['epoch']}): {estimate[AGREEMENT]:.4f}, an estimate of the defended BA relative to the "
        "victim's that reads no label."
    )


def detector_report(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
    """The detector of triggered inputs of a tested input-transform defense, or None (no held-out benign image).

    Its calibration on the benign images the run held out (:func:`refine_pl.detection.calibrate_on`: the threshold at
    a 1 % false-positive rate, chosen without labels), then the share of the clean test images it flags
    (``test_fpr``: its false-positive rate on images it was not chosen on) and of the triggered test images
    (``test_tpr``, None without them), over the whole test sets whatever the process.
    """
    defended = getattr(pl_module, "defended", None)
    data = trainer.datamodule
    if not isinstance(defended, DefendedClassifier):
        return None
    calibration = calibrate_on(defended, getattr(data, "val_set", None))
    if calibration is None:
        return None
    device = next(defended.parameters()).device
    sets = [loader.dataset for loader in trainer.test_dataloaders or []] + [None, None]
    rates: dict[str, Any] = {}
    for rate, count, dataset in (("test_fpr", "test_images", sets[0]), ("test_tpr", "test_triggered_images", sets[1])):
        if dataset is None or len(dataset) == 0:
            rates[rate], rates[count] = None, 0
            continue
        scores = torch.cat([defended_scores(defended, batch) for batch in image_batches(dataset, device)])
        rates[rate], rates[count] = round(float(flag(scores, calibration["threshold"]).double().mean()), 6), len(scores)
    return {**calibration, **rates}


def detector_line(detector: dict[str, Any] | None) -> str:
    """One sentence on the detector of a report (:func:`detector_report`), or empty."""
    if not detector:
        return ""
    measured = (
        f"; it flags {detector['test_fpr']:.4f} of the {detector['test_images']} clean test images (false positives)"
        if detector.get("test_fpr") is not None
        else ""
    )
    caught = (
        f" and {detector['test_tpr']:.4f} of the {detector['test_triggered_images']} triggered ones"
        if detector.get("test_tpr") is not None
        else ""
    )
    return (
        f"Detector of triggered inputs (`flagged` in predictions): score above {detector['threshold']:.6g}, chosen "
        f"without labels on {detector['benign_images']} held-out benign images at a target false-positive rate of "
        f"{detector['target_fpr']} (there: {detector['benign_fpr']:.4f}){measured}{caught}."
    )


def format_report_table(report: dict[str, Any]) -> str:
    """The before/after table of a report as markdown; a rate is ``n/a`` when it was not measured.

    A partial test's table is headed by :func:`partial_notice`; the label-free agreement, when the run measured
    one, follows it (:func:`label_free_line`).
    """

    def cell(row: dict[str, Any], key: str) -> str:
        return "n/a" if row.get(key) is None else f"{row[key]:.4f}"

    defense = report["defense"]
    labels = {DEFENDED.key: DEFENSES[defense].label if defense in DEFENSES else defense}
    rates = DEFENDED.rates
    lines = ["| | " + " | ".join(RATE_LABELS[rate] for rate in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for row in REPORT_ROWS:
        if report.get(row.key) is not None:
            cells = " | ".join(cell(report[row.key], rate) for rate in rates)
            lines.append(f"| {labels.get(row.key, row.label)} | {cells} |")
    notice, label_free = partial_notice(report), label_free_line(report.get(LABEL_FREE))
    detector = detector_line(report.get(DETECTOR))
    findings = (report.get(FINDINGS) or {}).get("summary", "")
    return "\n".join(
        [
            *([notice, ""] if notice else []),
            *lines,
            *(["", label_free] if label_free else []),
            *(["", detector] if detector else []),
            *(["", findings] if findings else []),
        ]
    )


def defense_report(
    trainer: Trainer, pl_module: LightningModule, output: str = "report.json", defense: str = "refine"
) -> dict[str, Any]:
    """BA / ASR / any-class ASR / RA of the victim alone and of the defended classifier (and its DER), as last tested.

    A rate is None when it was not measured (no labeled test images for BA, no attack or triggered images for ASR,
    triggered images of unknown class for the any-class ASR and RA).
    ``label_free`` is the tested checkpoint's label-free agreement (None when its run held no images out);
    ``detector`` the detector of triggered inputs (:func:`detector_report`; None likewise, or for a defense that is
    not an input transform); ``findings`` what the defense itself found (:meth:`~refine_pl.DefendedLitModule.findings`,
    e.g. Neural Cleanse's flagged classes; None for most defenses).

    Args:
        trainer: The trainer that tested ``pl_module``.
        pl_module: The tested module.
        output: The file the report is for, named in the error about untrained weights.
        defense: Name of the defense (see :data:`refine_pl.defenses.DEFENSES`), recorded in the report.

    Raises:
        ConfigError: ``pl_module`` is not a :class:`~refine_pl.DefendedLitModule` (every defense is one), or its
            weights were never trained.
    """
    if not isinstance(pl_module, DefendedLitModule):
        raise ConfigError(
            f"DefenseReport reports the test of a defense (a DefendedLitModule), not {type(pl_module).__name__}; "
            "remove the callback from configs that test another model."
        )
    require_trained_weights(trainer, output)
    metrics = trainer.callback_metrics
    datamodule = trainer.datamodule
    attack = getattr(datamodule, "attack", None)
    return {
        "dataset": datamodule.source.name,
        "attack": None if attack is None else attack.name,
        "target_label": None if attack is None else attack.target_label,
        "attack_spec": None if attack is None else attack.spec(),
        "defense": defense,
        **{
            row.key: {rate: _measured(metrics, row.logged("test", rate)) for rate in row.rates}
            for row in (NO_DEFENSE, DEFENDED)
        },
        CLEAN_FLOOR.key: (
            {rate: _measured(metrics, CLEAN_FLOOR.logged("test", rate)) for rate in CLEAN_FLOOR.rates}
            if pl_module.clean_reference is not None
            else None
        ),
        "victim_checkpoint": pl_module.hparams.get("victim_checkpoint"),
        "clean_reference": pl_module.hparams.get("clean_reference"),
        "defense_checkpoint": trainer.ckpt_path,
        "test_images": test_images(trainer, pl_module),
        LABEL_FREE: pl_module.label_free_estimate,
        DETECTOR: detector_report(trainer, pl_module),
        FINDINGS: pl_module.findings(),
    }


def report_path(path: Path, report: dict[str, Any]) -> Path:
    """Where a report (or a file made from it) goes: ``path``, unless a partial test would overwrite a full one.

    A partial test then writes ``<stem>.partial<suffix>`` beside it, so that a full test's figures are never
    replaced by figures measured on part of the test sets; either way a warning says the test was partial.
    """
    if not is_partial(report):
        return path
    if path.is_file() and _holds_full_figures(path):
        partial = path.with_name(f"{path.stem}.partial{path.suffix}")
        rank_zero_warn(f"{partial_notice(report)} Written to {partial}, beside the full test's {path}.")
        return partial
    rank_zero_warn(f"{partial_notice(report)} Written to {path}.")
    return path


def _holds_full_figures(path: Path) -> bool:
    """Whether a report file (JSON, or markdown with the table) holds the figures of a full test."""
    text = path.read_text(errors="replace")
    if path.suffix == ".json":
        try:
            return not is_partial(json.loads(text))
        except ValueError:
            return False
    return "| BA |" in text and "**Partial test**" not in text


class DefenseReport(Callback):
    """After testing a defense (a :class:`~refine_pl.DefendedLitModule`), prints and saves its figures before / after.

    Every row is measured in the same test pass on the same held-out images: "no defense" is the victim
    alone, the defended row the defended classifier, with its DER against the victim, and, when the module was
    given a clean reference model, "clean_floor" that model: its ASR is the floor below which no defense can bring
    an ASR (how often triggered images land in the target class without any backdoor). The figures go to
    ``report.json`` (fractions in [0, 1]; ``clean_floor`` is null without a reference) and ``report.md`` in the
    trainer's ``default_root_dir``, and are printed.

    Args:
        defense: Name of the defense (see :data:`refine_pl.defenses.DEFENSES`), recorded in the report.
        filename: Name of the JSON file; the markdown file takes the same stem.
    """

    def __init__(self, defense: str = "refine", filename: str = "report.json") -> None:
        self.defense = defense
        self.filename = filename
        self.report: dict[str, Any] | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.report = defense_report(trainer, pl_module, self.filename, self.defense)
        self._write(Path(trainer.default_root_dir))

    @rank_zero_only
    def _write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        table = format_report_table(self.report)
        json_path = report_path(directory / self.filename, self.report)
        json_path.write_text(json.dumps(self.report, indent=2) + "\n")
        json_path.with_suffix(".md").write_text(table + "\n")
        print(f"\nDefense report ({self.report['dataset']}, attack: {self.report['attack']}):\n{table}\n")
        print(f"Saved to {json_path}")
