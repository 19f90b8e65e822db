"""WarmupCosineLR: its rates, its checks, a resume that continues the schedule, and a length that follows the
trainer's max_epochs when T_max is not given.
"""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback, LightningModule, Trainer

from datamodules import VictimDataModule
from refine_pl import ConfigError, VictimLitModule
from refine_pl.schedules import WarmupCosineLR
from tests.conftest import MNIST_FACTS, SmallDigits, quiet_trainer


def _rates(scheduler: WarmupCosineLR, optimizer: torch.optim.Optimizer, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)


def test_the_rate_warms_up_then_follows_a_cosine_to_zero() -> None:
    optimizer = _optimizer()
    rates = _rates(WarmupCosineLR(optimizer, T_max=10, warmup_epochs=2, warmup_factor=0.2), optimizer, 12)
    expected = [0.002, 0.006] + [0.005 * (1 + math.cos(math.pi * (e - 2) / 8)) for e in range(2, 11)] + [0.0]
    assert rates == pytest.approx(expected, abs=1e-12)


def test_a_resumed_schedule_continues_where_it_stopped() -> None:
    optimizer = _optimizer()
    scheduler = WarmupCosineLR(optimizer, T_max=6)
    _rates(scheduler, optimizer, 3)
    state = scheduler.state_dict()
    resumed_optimizer = _optimizer()
    resumed = WarmupCosineLR(resumed_optimizer, T_max=6)
    resumed.load_state_dict(state)
    resumed_optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    assert _rates(resumed, resumed_optimizer, 3) == pytest.approx(_rates(scheduler, optimizer, 3))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"T_max": 0}, "must be a positive epoch count"),
        ({"T_max": 3, "warmup_epochs": -1}, "WarmupCosineLR needs"),
        ({"T_max": 3, "warmup_factor": 0.0}, "WarmupCosineLR needs"),
        ({"T_max": 3, "warmup_factor": 2}, "WarmupCosineLR needs"),
    ],
)
def test_settings_that_leave_no_schedule_are_refused(arguments: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WarmupCosineLR(_optimizer(), **arguments)


def test_without_t_max_the_decay_ends_at_the_length_it_is_given() -> None:
    optimizer = _optimizer()
    scheduler = WarmupCosineLR(optimizer, warmup_epochs=0)
    scheduler.end_with_training(4)
    expected = [0.005 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert _rates(scheduler, optimizer, 4) == pytest.approx(expected, abs=1e-12)
    optimizer = _optimizer()
    short = WarmupCosineLR(optimizer, warmup_epochs=2, warmup_factor=0.5)
    short.end_with_training(1)  # a training no longer than the warmup is warmup only
    assert _rates(short, optimizer, 3) == pytest.approx([0.005, 0.0, 0.0], abs=1e-12)
    given = WarmupCosineLR(_optimizer(), T_max=7)
    given.end_with_training(4)  # a T_max that was given is kept
    assert given.T_max == 7


def test_without_t_max_and_without_an_epoch_count_the_schedule_names_the_fix() -> None:
    scheduler = WarmupCosineLR(_optimizer())
    with pytest.raises(ConfigError, match="set --trainer.max_epochs, or T_max"):
        scheduler.end_with_training(-1)  # Lightning's max_epochs when training is counted in steps only
    with pytest.raises(ConfigError, match="WarmupCosineLR has no T_max"):
        scheduler.factor(2)


class _RatePerEpoch(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_module_without_t_max_decays_over_the_trainers_epochs(tmp_path: Path) -> None:
    # The MNIST configs leave T_max unset, so that --trainer.max_epochs alone changes the length of the decay.
    module = VictimLitModule(
        **MNIST_FACTS,
        optimizer=partial(torch.optim.SGD, lr=0.01),
        scheduler=partial(WarmupCosineLR, warmup_epochs=1, warmup_factor=0.1),
    )
    rates = _RatePerEpoch()
    trainer = quiet_trainer(tmp_path, max_epochs=5, callbacks=[rates], limit_val_batches=0, limit_train_batches=1)
    trainer.fit(module, datamodule=VictimDataModule(SmallDigits(), batch_size=8))
    expected = [0.001] + [0.005 * (1 + math.cos(math.pi * (e - 1) / 4)) for e in range(1, 5)]
    assert rates.rates == pytest.approx(expected, abs=1e-12)
