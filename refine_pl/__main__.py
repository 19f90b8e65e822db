"""``python -m refine_pl fit|validate|test|predict|defend ...``: the same as the console command ``refine-pl``."""

from refine_pl.commands import run

run()
