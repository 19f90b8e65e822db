"""Entry point of refine-pl: ``python train.py fit --config configs/...``, the same as ``refine-pl`` (see README.md)."""

from refine_pl.cli import cli_main
from refine_pl.commands import run

__all__ = ["cli_main"]

if __name__ == "__main__":
    run()
