"""Attacks by name: the registry, and an attack rebuilt from the spec a victim checkpoint records.

A spec is ``{"name": ..., "init_args": {...}}`` (plus ``"state"`` for an attack with learned parts): read from
a third party's file, so every argument is checked against the constructor's annotations before anything is built.
"""

import math
import types
import typing
from typing import Any, Literal, Union

from refine_pl.attacks.base import Attack, constructor_parameters
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
"""The attacks by name; an entry is the attack class (its ``name``, ``training_controlled`` and constructor).
Attack modules register their class with the decorator ``@ATTACKS.add``."""


def attack_record(attack: Attack) -> dict[str, Any]:
    """What a victim checkpoint stores about its attack: the spec, plus ``"state"`` when the attack has one."""
    record = attack.spec()
    state = attack.state_dict()
    if state:
        record["state"] = state
    return record


def attack_spec_of(record: dict[str, Any]) -> dict[str, Any]:
    """The plain spec (name and constructor arguments) of an :func:`attack_record`, without its state."""
    return {"name": record.get("name"), "init_args": record.get("init_args", {})}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain value (as read from JSON or a checkpoint) fits a constructor's type annotation.

    Integers exclude booleans, floats must be finite; annotations other than the plain ones attacks use are
    left to the constructor.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an integer too large for a float (above 1.8e308) is no number an attack can use
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and abs(value) < 1e308
        )
    if hint is str:
        return isinstance(value, str)
    return True


def _constructor_type_hints(cls: type) -> dict[str, Any]:
    """The type hints of :func:`constructor_parameters` (the attack's fields, declared in its class or a base)."""
    parameters = constructor_parameters(cls)
    return {name: hint for name, hint in typing.get_type_hints(cls).items() if name in parameters}


def _check_init_args(cls: type[Attack], init_args: Any) -> dict[str, Any]:
    """Refuses constructor arguments of a spec (e.g. from a checkpoint) whose names or types do not fit ``cls``.

    Returns:
        The arguments, integers given for float parameters converted to float (as the config parser does).
    """
    if not isinstance(init_args, dict) or not all(isinstance(key, str) for key in init_args):
        raise ConfigError(f"Attack {cls.name!r}: init_args must be a dict of argument names, got {init_args!r}.")
    hints = _constructor_type_hints(cls)
    parameters = constructor_parameters(cls)
    for key, value in init_args.items():
        if key not in parameters:
            raise ConfigError(
                f"Attack spec {cls.name!r} does not fit {cls.__name__}: it has no argument {key!r} (it takes "
                f"{', '.join(parameters)})."
            )
        if key in hints and not _fits(value, hints[key]):
            expected = hints[key].__name__ if isinstance(hints[key], type) else str(hints[key]).replace("typing.", "")
            raise ConfigError(
                f"Attack spec {cls.name!r} has {key}={value!r}, which does not fit its type {expected} (numbers must "
                "be finite)."
            )
    return {key: _as_float_if_needed(value, hints.get(key)) for key, value in init_args.items()}


def _as_float_if_needed(value: Any, hint: Any) -> Any:
    """``float(value)`` for an integer given where a float is expected (and not an int), else ``value``."""
    takes = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if isinstance(value, int) and not isinstance(value, bool) and float in takes and int not in takes:
        return float(value)
    return value


def attack_from_spec(spec: dict[str, Any]) -> Attack:
    """Rebuilds an attack from :meth:`Attack.spec` or :func:`attack_record` output (e.g. from a victim checkpoint).

    Everything in ``spec`` is checked before use: its keys, the constructor arguments' names and types, and
    the state (by the attack's ``load_state_dict``). The rebuilt attack never reads a file named in the spec:
    what the attack read (a Blended pattern image) must travel in the record's ``state``.

    Raises:
        ConfigError: The spec is not a dict of ``name``, ``init_args`` and ``state``, names no registered
            attack, has arguments or a state that do not fit it, or names a file whose content it does not carry.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"An attack spec must be a dict with a 'name' string, got {spec!r}.")
    unknown = sorted(str(key) for key in spec if key not in ("name", "init_args", "state"))
    if unknown:
        raise ConfigError(f"Attack spec {spec['name']!r} has unknown keys {unknown}; it takes name, init_args, state.")
    cls = ATTACKS[spec["name"]]
    init_args = _check_init_args(cls, spec.get("init_args", {}))
    try:
        attack = cls(**init_args)
    except TypeError as error:
        raise ConfigError(
            f"Attack spec {spec['name']!r} with init_args {init_args!r} does not fit {cls.__name__}: {error}."
        ) from error
    if "state" in spec:
        state = spec["state"]
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise ConfigError(
                f"Attack {spec['name']!r}: the state must be a dict of names, got {type(state).__name__}."
            )
        attack.load_state_dict(state)
    pending = attack.pending_files()
    if pending:
        raise ConfigError(
            f"The attack record {spec['name']!r} names {pending} but does not carry what was read from it; refine-pl "
            "never opens a path named in a record (a victim checkpoint could name any file): give the attack in the "
            f"config instead ({cli_flag('data', 'attack')})."
        )
    return attack
