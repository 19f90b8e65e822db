"""The registry of defenses by name: the module class each config builds, its kind, and its config overlay.

Every defense is a :class:`~refine_pl.DefendedLitModule` of one kind (:data:`~refine_pl.defended_module.DEFENSE_KINDS`):
today all are input transforms ``M(f(T(x)))`` around the frozen victim ``f`` (REFINE's U-Net, an autoencoder,
ShrinkPad, bit-depth reduction, a median filter, the identity; REFINE's derangement or the identity behind it). A
defense runs through ``train.py`` with the REFINE job of a dataset and its own config merged after it (``fit`` first
when it trains, then ``test``), which writes ``report.json``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from refine_pl.defended_module import DefendedLitModule
from refine_pl.registry import Registry


@dataclass(frozen=True)
class Defense:
    """A registered defense.

    Attributes:
        name: Registry name: ``report.json``'s ``defense``, the benchmark's column.
        label: Name in tables.
        summary: One line: ``T``, ``M`` and what trains ``T``.
        module: The LightningModule class its config builds.
        overlay: Config merged after a dataset's REFINE job (``configs/refine/recipe.yaml`` and
            ``configs/refine/<dataset>.yaml``), by name (see :mod:`refine_pl.configs`); None for REFINE itself.
    """

    name: str
    label: str
    summary: str
    module: type[DefendedLitModule]
    overlay: str | None

    @property
    def kind(self) -> str:
        """Where the defense acts (a key of :data:`~refine_pl.defended_module.DEFENSE_KINDS`)."""
        return self.module.kind

    @property
    def trains(self) -> bool:
        """Whether the defense is fitted before it is tested (``fit`` then ``test --ckpt_path last``)."""
        return self.module.trains

    def configs(self, job: Sequence[str]) -> list[str]:
        """The configs of this defense, merged in order: the dataset's REFINE ``job``, then the overlay."""
        return [*job, *([self.overlay] if self.overlay else [])]


DEFENSES: Registry[Defense] = Registry("defense")
"""The defenses by name, in the order of the benchmark's tables (REFINE and its ablations first)."""
