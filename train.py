"""Entry point of refine-pl: ``python train.py fit --config configs/...`` (see README.md)."""

from refine_pl.cli import cli_main
from refine_pl.errors import exit_on_config_error

__all__ = ["cli_main"]

if __name__ == "__main__":
    exit_on_config_error(cli_main)
