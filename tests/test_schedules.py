"""WarmupCosineLR: its rates, its checks, and a resume that continues the schedule."""

import math

import pytest
import torch

from refine_pl import ConfigError
from refine_pl.schedules import WarmupCosineLR


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
    "arguments",
    [{"T_max": 3, "warmup_epochs": 3}, {"T_max": 3, "warmup_factor": 0.0}, {"T_max": 3, "warmup_factor": 2}],
)
def test_settings_that_leave_no_schedule_are_refused(arguments: dict) -> None:
    with pytest.raises(ConfigError, match="WarmupCosineLR needs"):
        WarmupCosineLR(_optimizer(), **arguments)
