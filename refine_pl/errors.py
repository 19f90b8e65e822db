"""The one exception type for bad user input, and how entry points report it."""

import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """Raised when a config, file or tensor given by the user cannot be used.

    The message names the problem and the fix. ``train.py`` prints it as a single line instead of a
    traceback, so every check that guards user input raises this type.
    """


def exit_on_config_error(main: Callable[[], object]) -> None:
    """Runs a command-line entry point; a :class:`ConfigError` ends it with one line and exit status 1."""
    try:
        main()
    except ConfigError as error:
        message = str(error)
        # A DataLoader worker re-raises the error with the worker's traceback in its text; the user needs
        # only the message at its end.
        marker = f"{ConfigError.__module__}.{ConfigError.__qualname__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        sys.exit(f"refine-pl: error: {message}")
