"""The one exception type for bad user input, and how its messages name a command-line flag."""

import re


def cli_flag(section: str, *names: str) -> str:
    """The command-line flag of a constructor argument, as error messages spell it.

    ``cli_flag("model", "victim_arch")`` is ``--model.init_args.victim_arch``; further names go down nested
    classes: ``cli_flag("data", "attack", "target_label")`` is ``--data.init_args.attack.init_args.target_label``.
    ``cli_flag("trainer", "max_epochs")`` is ``--trainer.max_epochs`` (the trainer is not a class of the config).
    """
    if section == "trainer":
        return "--" + ".".join((section, *names))
    return "--" + ".".join((section, *(part for name in names for part in ("init_args", name))))


def first_sentence(error: BaseException) -> str:
    """The first sentence of an error's message, without torch's advice to retry with weights_only=False."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n", str(error).strip()) if s and "weights_only" not in s]
    return (sentences[0] if sentences else type(error).__name__)[:200].rstrip(".")


class ConfigError(ValueError):
    """Raised when a config, file or tensor given by the user cannot be used.

    The message names the problem and the fix. ``train.py`` prints it as a single line instead of a
    traceback, so every check that guards user input raises this type.
    """
