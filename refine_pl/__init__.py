"""refine-pl: REFINE, the inversion-free backdoor defense via model reprogramming, in PyTorch Lightning."""

from refine_pl.errors import ConfigError
from refine_pl.refine_module import RefineLitModule
from refine_pl.victim_module import VictimLitModule

__all__ = ["ConfigError", "RefineLitModule", "VictimLitModule"]
