"""Backdoor attacks: one module per attack, all behind :class:`Attack` and the name registry."""

from refine_pl.attacks.adaptive_patch import AdaptivePatch
from refine_pl.attacks.badnets import BadNets
from refine_pl.attacks.base import Attack, TrainingControlledAttack
from refine_pl.attacks.batt import BATT
from refine_pl.attacks.blended import Blended
from refine_pl.attacks.input_aware import InputAwareDynamic
from refine_pl.attacks.label_consistent import LabelConsistent
from refine_pl.attacks.low_frequency import LowFrequency
from refine_pl.attacks.physical_ba import PhysicalBA
from refine_pl.attacks.refine_in_loop import RefineInTheLoop
from refine_pl.attacks.registry import ATTACKS, attack_from_spec, attack_record, attack_spec_of
from refine_pl.attacks.robust_trigger import TransformRobustTrigger
from refine_pl.attacks.wanet import WaNet

__all__ = [
    "ATTACKS",
    "BATT",
    "AdaptivePatch",
    "Attack",
    "BadNets",
    "Blended",
    "InputAwareDynamic",
    "LabelConsistent",
    "LowFrequency",
    "PhysicalBA",
    "RefineInTheLoop",
    "TrainingControlledAttack",
    "TransformRobustTrigger",
    "WaNet",
    "attack_from_spec",
    "attack_record",
    "attack_spec_of",
]
