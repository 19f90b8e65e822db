"""How the console commands end on bad input: one line naming the problem and the fix, exit status 1."""

import sys
from collections.abc import Callable

from refine_pl.errors import ConfigError
from refine_pl.internals import message_without_worker_traceback


def exit_on_config_error(main: Callable[[], object]) -> None:
    """Runs a command-line entry point; a :class:`ConfigError` ends it with one line and exit status 1."""
    try:
        main()
    except ConfigError as error:
        sys.exit(f"refine-pl: error: {message_without_worker_traceback(str(error))}")
