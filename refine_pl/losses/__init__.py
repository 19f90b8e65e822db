"""The two losses of REFINE, and its objective on a batch."""

from refine_pl.losses.objective import RefineTerms, refine_objective
from refine_pl.losses.supcon import SupConLoss
from refine_pl.losses.utility import UtilityLoss

__all__ = ["RefineTerms", "SupConLoss", "UtilityLoss", "refine_objective"]
