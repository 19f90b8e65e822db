"""The REFINE callbacks refuse a run that is not REFINE, and the report says n/a for what was not measured."""

from pathlib import Path

import pytest

from callbacks import DefenseReport, ExportDefendedClassifier, format_report_table
from datamodules import VictimDataModule
from refine_pl import ConfigError, VictimLitModule
from tests.conftest import MNIST_FACTS, SmallDigits, quiet_trainer


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (DefenseReport(), r"DefenseReport reports the test of a defense \(a DefendedLitModule\), not VictimLitModule"),
        (
            ExportDefendedClassifier(),
            r"ExportDefendedClassifier exports an input-transform defense \(InputTransformDefense\), not "
            "VictimLitModule",
        ),
    ],
)
def test_refine_callbacks_refuse_to_report_or_export_another_model(callback, message: str, tmp_path: Path) -> None:
    trainer = quiet_trainer(tmp_path, callbacks=[callback], limit_test_batches=1)
    with pytest.raises(ConfigError, match=message):
        trainer.test(VictimLitModule(**MNIST_FACTS), datamodule=VictimDataModule(SmallDigits()))
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "defended.safetensors").exists()


def test_the_table_says_n_a_where_nothing_was_measured() -> None:
    report = {
        "defense": "refine",
        "no_defense": {"ba": 0.98, "asr": None, "any_class_asr": None, "ra": None},
        "defended": {"ba": 0.975, "asr": None, "any_class_asr": None, "ra": None, "der": None},
    }
    table = format_report_table(report)
    assert table.splitlines()[0] == "| | BA | ASR | any-class ASR | RA | DER |"
    assert table.splitlines()[2:] == [
        "| no defense | 0.9800 | n/a | n/a | n/a | n/a |",
        "| REFINE | 0.9750 | n/a | n/a | n/a | n/a |",
    ]
