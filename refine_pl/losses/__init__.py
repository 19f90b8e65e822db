"""The two losses of REFINE."""

from refine_pl.losses.supcon import SupConLoss
from refine_pl.losses.utility import UtilityLoss

__all__ = ["SupConLoss", "UtilityLoss"]
