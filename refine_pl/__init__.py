"""refine-pl: REFINE, the inversion-free backdoor defense via model reprogramming, in PyTorch Lightning."""

from refine_pl.defended_module import DefendedLitModule
from refine_pl.errors import ConfigError
from refine_pl.refine_module import RefineLitModule
from refine_pl.victim_module import VictimLitModule

__all__ = ["ConfigError", "DefendedLitModule", "RefineLitModule", "VictimLitModule"]
