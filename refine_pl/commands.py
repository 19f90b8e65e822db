"""The console command ``refine-pl``: ``refine-pl defend MODEL IMAGES`` or the LightningCLI's subcommands.

``refine-pl defend ...`` runs :func:`refine_pl.defend.main` (your own model defended in one command); anything else
(``fit``, ``validate``, ``test``, ``predict``, ``--help``) is the LightningCLI, :func:`refine_pl.cli.run`. The
dispatch lives here, above both, because ``defend`` runs its stages through the LightningCLI.
"""

import sys

from refine_pl import cli, defend
from refine_pl.console import exit_on_config_error

DEFEND = "defend"
"""The first argument that selects ``refine-pl defend``."""


def run() -> None:
    """The console command ``refine-pl`` (and ``python train.py``, ``python -m refine_pl``) on ``sys.argv``.

    A ConfigError ends it with one line and exit status 1.
    """
    if sys.argv[1:2] == [DEFEND]:
        exit_on_config_error(lambda: defend.main(sys.argv[2:]))
    else:
        cli.run()
