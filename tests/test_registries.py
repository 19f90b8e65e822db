"""The one registry style: attacks, victim architectures and defenses by name, each entry a builder with metadata."""

from dataclasses import dataclass

import pytest

from refine_pl import ConfigError
from refine_pl.architectures import ARCHITECTURES
from refine_pl.attacks import ATTACKS, Attack
from refine_pl.defenses import DEFENSES
from refine_pl.registry import Registry


@dataclass(frozen=True)
class Entry:
    name: str
    size: int


def test_a_registry_keeps_entries_in_order_and_names_the_known_ones_for_an_unknown_name() -> None:
    registry: Registry[Entry] = Registry("widget", " Widgets come from elsewhere too.")
    first, second = registry.add(Entry("b", 1)), registry.add(Entry("a", 2))
    assert list(registry) == ["b", "a"] and registry.values() == [first, second] and len(registry) == 2
    assert registry["a"] is second and "a" in registry and "c" not in registry
    assert registry.items() == [("b", first), ("a", second)]
    with pytest.raises(ConfigError, match=r"^Unknown widget 'c'; known widgets: b, a\. Widgets come from elsewhere"):
        registry["c"]
    with pytest.raises(ValueError, match="widget name 'a' is registered twice"):
        registry.add(Entry("a", 3))


@pytest.mark.parametrize("registry", [ATTACKS, ARCHITECTURES, DEFENSES], ids=lambda r: r.kind)
def test_every_registry_is_one_registry_of_named_entries(registry: Registry) -> None:
    assert isinstance(registry, Registry) and len(registry) > 0
    for name, entry in registry.items():
        assert entry.name == name
    with pytest.raises(ConfigError, match=f"Unknown {registry.kind} 'no_such_entry'; known {registry.kind}s: "):
        registry["no_such_entry"]


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_registered_attack_is_an_attack_class_registered_under_its_own_name(name: str) -> None:
    attack = ATTACKS[name]
    assert issubclass(attack, Attack)
    assert attack.name == name
