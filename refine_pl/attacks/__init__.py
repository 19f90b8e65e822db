"""Backdoor attacks: one module per attack, all behind :class:`Attack` and the name registry."""

from refine_pl.attacks.badnets import BadNets
from refine_pl.attacks.base import ATTACKS, Attack, attack_class, attack_from_spec, register_attack

__all__ = ["ATTACKS", "Attack", "BadNets", "attack_class", "attack_from_spec", "register_attack"]
