"""What every defense shares (DefendedLitModule): the metric table, the kinds, a victim that only answers queries."""

from functools import partial
from pathlib import Path

import pytest
import torch

from datamodules import RefineDataModule
from refine_pl import ConfigError, DefendedLitModule, RefineLitModule
from refine_pl.defended_module import DEFENSE_KINDS
from refine_pl.defenses import DEFENSES, AutoencoderDefense, ConvAutoencoder, ShrinkPad, TrainingFreeDefense
from refine_pl.metric_names import RATES, REPORT_ROWS
from tests.conftest import MNIST_FACTS, SmallDigits, fit_and_test_with_report, quiet_trainer, tiny_refine_module


def test_the_report_and_the_logged_keys_are_exactly_those_of_the_metric_table(
    victim_checkpoint: Path, untrained_victim: Path, tmp_path: Path
) -> None:
    module = tiny_refine_module(victim_checkpoint, clean_reference=str(untrained_victim))
    data = RefineDataModule(SmallDigits(train_per_class=(4,) * 10, test_per_class=(3,) * 10), batch_size=16)
    trainer, report = fit_and_test_with_report(module, data, tmp_path)

    rows = {
        key: value
        for key, value in report.report.items()
        if isinstance(value, dict) and key not in ("attack_spec", "test_images")
    }
    assert {row.key: set(row.rates) for row in REPORT_ROWS} == {key: set(value) for key, value in rows.items()}
    assert all(rate in RATES for row in REPORT_ROWS for rate in row.rates)
    logged = {key for key in trainer.callback_metrics if key.startswith("test/")}
    assert logged == {row.logged("test", rate) for row in REPORT_ROWS for rate in row.rates}
    for row in REPORT_ROWS:
        for rate in row.rates:
            measured = float(trainer.callback_metrics[row.logged("test", rate)])
            assert report.report[row.key][rate] == pytest.approx(measured, abs=1e-6)


@pytest.mark.parametrize("name", list(DEFENSES))
def test_every_registered_defense_is_a_defended_module_of_a_known_kind(name: str) -> None:
    entry = DEFENSES[name]
    assert issubclass(entry.module, DefendedLitModule)
    assert entry.kind in DEFENSE_KINDS
    assert entry.trains == entry.module.trains


def test_a_defense_that_trains_through_the_victim_refuses_a_query_only_victim(untrained_victim: Path) -> None:
    with pytest.raises(ConfigError, match="RefineLitModule trains through the victim's gradients.*victim_access"):
        RefineLitModule(victim_checkpoint=str(untrained_victim), **MNIST_FACTS, victim_access="query_only")
    with pytest.raises(ConfigError, match="victim_access must be white_box or query_only, got 'grey'"):
        TrainingFreeDefense(victim_checkpoint=str(untrained_victim), **MNIST_FACTS, victim_access="grey")


def test_a_query_only_victim_answers_like_the_white_box_one_but_passes_no_gradient(untrained_victim: Path) -> None:
    shrink = partial(ShrinkPad, seed=1)
    white = TrainingFreeDefense(victim_checkpoint=str(untrained_victim), **MNIST_FACTS, transform=shrink).eval()
    query = TrainingFreeDefense(
        victim_checkpoint=str(untrained_victim), **MNIST_FACTS, transform=shrink, victim_access="query_only"
    ).eval()
    images = torch.rand(4, 1, 28, 28, requires_grad=True)
    assert torch.equal(white(images), query(images))
    assert white.victim(images).requires_grad and not query.victim(images).requires_grad


def test_a_defense_that_only_queries_the_victim_trains_with_a_query_only_victim(
    untrained_victim: Path, tmp_path: Path
) -> None:
    module = AutoencoderDefense(
        victim_checkpoint=str(untrained_victim),
        **MNIST_FACTS,
        transform=partial(ConvAutoencoder, width=4),
        victim_access="query_only",
    )
    before = {key: value.clone() for key, value in module.transform.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=RefineDataModule(SmallDigits(train_per_class=(4,) * 10), batch_size=16))
    assert any(not torch.equal(value, before[key]) for key, value in module.transform.state_dict().items())
    assert module.victim.query_only
