"""The one registry style of refine-pl: entries by name, each entry a builder with its metadata.

Attacks (the attack class: its ``name``, whether it controls training), victim architectures (builder and native
image size) and defenses (LightningModule class, kind, config overlay) are each a :class:`Registry`. An unknown
name is a :class:`~refine_pl.errors.ConfigError` that lists the known ones.
"""

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from refine_pl.errors import ConfigError


class Named(Protocol):
    """Anything with a registry name."""

    name: str


EntryT = TypeVar("EntryT", bound=Named)


class Registry(Generic[EntryT]):
    """Entries by their ``name``, in the order they were added.

    Args:
        kind: What the entries are, singular (``"attack"``), for error messages.
        hint: A sentence the unknown-name error adds (where other names come from, or the flag that sets one).
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, EntryT] = {}

    def add(self, entry: EntryT) -> EntryT:
        """Registers ``entry`` under ``entry.name`` and returns it (so it also serves as a class decorator).

        Raises:
            ValueError: The name is taken.
        """
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} name {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def __getitem__(self, name: str) -> EntryT:
        """The entry registered as ``name``.

        Raises:
            ConfigError: No entry has that name (the message lists the known names).
        """
        if name not in self._entries:
            raise ConfigError(
                f"Unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self._entries)}.{self.hint}"
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, EntryT]]:
        """``(name, entry)`` pairs in registration order."""
        return list(self._entries.items())

    def values(self) -> list[EntryT]:
        """The entries in registration order."""
        return list(self._entries.values())
