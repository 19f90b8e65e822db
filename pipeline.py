"""The main job of refine-pl: backdoored victim, REFINE defense, before/after report (see README.md)."""

from refine_pl.errors import exit_on_config_error
from refine_pl.pipeline import main

if __name__ == "__main__":
    exit_on_config_error(main)
