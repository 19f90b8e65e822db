"""Callback that turns a REFINE test run into the before/after BA / ASR report."""

import json
import math
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_only

from callbacks.checkpoint import require_trained_weights
from refine_pl.errors import ConfigError


def _measured(metrics: dict[str, Any], key: str) -> float | None:
    """The logged rate under ``key``, or None when it was not measured (not logged, or over no sample)."""
    value = metrics.get(key)
    return None if value is None or math.isnan(float(value)) else round(float(value), 6)


def format_report_table(report: dict[str, Any]) -> str:
    """The before/after table of a report as markdown; ASR is ``n/a`` when no attack was evaluated."""

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = ["| | BA | ASR |", "|---|---|---|"]
    rows = [("no defense", "no_defense"), ("REFINE", "refine")]
    if report.get("clean_floor") is not None:
        rows.append(("clean model (ASR floor)", "clean_floor"))
    for label, key in rows:
        lines.append(f"| {label} | {cell(report[key]['ba'])} | {cell(report[key]['asr'])} |")
    return "\n".join(lines)


class DefenseReport(Callback):
    """After testing a :class:`~refine_pl.RefineLitModule`, prints and saves BA / ASR before and after REFINE.

    Every row is measured in the same test pass on the same held-out images: "no defense" is the victim
    alone, "REFINE" the defended classifier, and, when the module was given a clean reference model,
    "clean_floor" that model: its ASR is the floor below which no defense can bring an ASR (how often triggered
    images land in the target class without any backdoor). The figures go to ``report.json`` (fractions in
    [0, 1]; ``clean_floor`` is null without a reference) and ``report.md`` in the trainer's
    ``default_root_dir``, and are printed.

    Args:
        filename: Name of the JSON file; the markdown file takes the same stem.
    """

    def __init__(self, filename: str = "report.json") -> None:
        self.filename = filename
        self.report: dict[str, Any] | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = trainer.callback_metrics
        if "test/victim_ba" not in metrics:
            raise ConfigError(
                "DefenseReport needs the test metrics of RefineLitModule (test/ba, test/victim_ba); remove the "
                "callback from configs that test another model."
            )
        require_trained_weights(trainer, self.filename)
        datamodule = trainer.datamodule
        attack = getattr(datamodule, "attack", None)
        self.report = {
            "dataset": datamodule.source.name,
            "attack": None if attack is None else attack.name,
            "target_label": None if attack is None else attack.target_label,
            "attack_spec": None if attack is None else attack.spec(),
            "no_defense": {
                "ba": _measured(metrics, "test/victim_ba"),
                "asr": _measured(metrics, "test/victim_asr"),
            },
            "refine": {"ba": _measured(metrics, "test/ba"), "asr": _measured(metrics, "test/asr")},
            "clean_floor": (
                {"ba": _measured(metrics, "test/clean_ba"), "asr": _measured(metrics, "test/clean_asr")}
                if "test/clean_ba" in metrics
                else None
            ),
            "victim_checkpoint": pl_module.hparams.get("victim_checkpoint"),
            "clean_reference": pl_module.hparams.get("clean_reference"),
            "refine_checkpoint": trainer.ckpt_path,
        }
        self._write(Path(trainer.default_root_dir))

    @rank_zero_only
    def _write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        table = format_report_table(self.report)
        json_path = directory / self.filename
        json_path.write_text(json.dumps(self.report, indent=2) + "\n")
        json_path.with_suffix(".md").write_text(table + "\n")
        print(f"\nDefense report ({self.report['dataset']}, attack: {self.report['attack']}):\n{table}\n")
        print(f"Saved to {json_path}")
