import dataclasses

import pytest
import torch

from datamodules.datasets import ImageTensorDataset, PoisonedTestSet, PoisonedTrainingSet
from refine_pl.attacks import ATTACKS, BadNets, attack_from_spec
from refine_pl.errors import ConfigError


def _dataset(n: int = 200, classes: int = 10, channels: int = 1, size: int = 28) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 200, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    return ImageTensorDataset(images, torch.arange(n) % classes)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.25])
def test_badnets_poisons_exactly_the_asked_fraction_of_non_target_samples(rate: float) -> None:
    data = _dataset()
    attack = BadNets(target_label=3, poison_rate=rate)
    indices = attack.select_poison_indices(data.labels)
    assert len(indices) == round(rate * len(data)) == len(set(indices.tolist()))
    assert (data.labels[indices] != 3).all()
    poisoned = PoisonedTrainingSet(data, attack, indices)
    labels = torch.tensor([poisoned[i][1] for i in range(len(data))])
    changed = torch.tensor([not torch.equal(poisoned[i][0], data[i][0]) for i in range(len(data))])
    assert changed.sum().item() == len(indices) and set(torch.nonzero(changed).flatten().tolist()) == set(
        indices.tolist()
    )
    assert (labels[indices] == 3).all()
    untouched = torch.ones(len(data), dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(labels[untouched], data.labels[untouched])


def test_poison_selection_is_seeded() -> None:
    labels = _dataset().labels
    assert torch.equal(BadNets(seed=5).select_poison_indices(labels), BadNets(seed=5).select_poison_indices(labels))
    assert not torch.equal(BadNets(seed=5).select_poison_indices(labels), BadNets(seed=6).select_poison_indices(labels))


def test_too_high_poison_rate_for_the_non_target_pool_is_refused() -> None:
    labels = torch.zeros(10, dtype=torch.long)
    labels[0] = 1
    with pytest.raises(ConfigError, match="lower poison_rate"):
        BadNets(target_label=0, poison_rate=0.5).select_poison_indices(labels)


def test_poisoned_test_set_holds_only_non_target_samples_with_target_label() -> None:
    data = _dataset()
    test_set = PoisonedTestSet(data, BadNets(target_label=4))
    assert len(test_set) == (data.labels != 4).sum().item()
    for position in range(len(test_set)):
        _, label, target = test_set[position]
        assert label != 4 and target == 4


@pytest.mark.parametrize("location", ["bottom_right", "bottom_left", "top_right", "top_left"])
@pytest.mark.parametrize("channels", [1, 3])
def test_badnets_changes_only_the_patch(location: str, channels: int) -> None:
    images = torch.rand(4, channels, 32, 32) * 0.5
    attack = BadNets(patch_size=3, location=location, margin=1, pattern="checkerboard")
    poisoned = attack.apply(images)
    top = 1 if location.startswith("top") else 32 - 1 - 3
    left = 1 if location.endswith("left") else 32 - 1 - 3
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[top : top + 3, left : left + 3] = True
    assert torch.equal(poisoned[..., ~inside], images[..., ~inside])
    expected_patch = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(poisoned[..., top : top + 3, left : left + 3], expected_patch.expand(4, channels, 3, 3))


def test_patch_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        BadNets(patch_size=8).apply(torch.rand(1, 1, 6, 6))


def test_spec_round_trips_and_unknown_names_are_refused() -> None:
    attack = BadNets(
        target_label=2, poison_rate=0.05, seed=9, patch_size=4, location="top_left", pattern="checkerboard"
    )
    rebuilt = attack_from_spec(attack.spec())
    assert rebuilt.spec() == attack.spec()
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(rebuilt.apply(images), attack.apply(images))
    assert "badnets" in ATTACKS
    with pytest.raises(ConfigError, match="Unknown attack 'nope'.*badnets"):
        attack_from_spec({"name": "nope", "init_args": {}})
    with pytest.raises(ConfigError, match="does not fit BadNets"):
        attack_from_spec({"name": "badnets", "init_args": {"strength": 3}})


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_declares_its_settings_as_fields_of_its_own_dataclass(name: str) -> None:
    # Without its own @dataclass, an attack's annotated settings would be class attributes: its constructor
    # would not take them and its spec would not record them.
    cls = ATTACKS[name]
    assert dataclasses.is_dataclass(cls) and "__dataclass_fields__" in vars(cls)
    attack = cls()
    assert hash(attack) == object.__hash__(attack) and attack != cls()  # identity, not the settings
    assert repr(attack).startswith(f"{cls.__name__}(target_label=")
