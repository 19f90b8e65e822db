"""The YAML configs shipped with refine-pl (package data), and :func:`resolve_config`, which finds one by its name.

A config's name is its path under this folder with a ``configs/`` prefix: ``configs/refine/reference.yaml``,
``configs/victim/mnist.yaml``, ``configs/attacks/badnets.yaml``. The commands (``refine-pl``, ``train.py``,
``refine-pl-pipeline``), the defense registry's overlays and the benchmarks name configs that way, so they work
from any folder, from a checkout or an installed wheel alike.
"""

from importlib.resources import files
from pathlib import Path, PurePath

from refine_pl.errors import ConfigError

CONFIGS = Path(str(files(__name__)))
"""The folder of the shipped configs, inside the installed package."""

PREFIX = "configs"
"""The first part of a config's name: ``configs/<kind>/<name>.yaml`` is ``CONFIGS/<kind>/<name>.yaml``."""


def resolve_config(config: str) -> str:
    """The file that ``--config config`` reads.

    - A path that exists (from the current folder, or absolute) is used as is: the user's own file, or a copy
      of a shipped config edited in place.
    - Otherwise a name ``configs/<kind>/<file>`` is the shipped config ``CONFIGS/<kind>/<file>``.
    - Anything else (an inline YAML string, which jsonargparse also accepts, or a missing file outside
      ``configs/``) is returned unchanged, for jsonargparse to read or refuse.

    Args:
        config: The value given to ``--config``.

    Returns:
        The path (or string) to pass to jsonargparse.

    Raises:
        ConfigError: ``config`` is a ``configs/...`` name that neither exists here nor ships with refine-pl.
    """
    path = PurePath(config)
    if Path(config).exists() or path.is_absolute() or path.parts[:1] != (PREFIX,):
        return config
    shipped = CONFIGS.joinpath(*path.parts[1:])
    if shipped.is_file():
        return str(shipped)
    raise ConfigError(
        f"--config {config}: no such file in {Path.cwd()} nor among refine-pl's configs in {CONFIGS}: pass an existing "
        f"file or a shipped config ({_shipped_near(shipped)})."
    )


def _shipped_near(missing: Path) -> str:
    """The names of the shipped configs in ``missing``'s folder, or the folders of configs when it holds none."""
    folder = missing.parent
    if folder != CONFIGS and folder.is_relative_to(CONFIGS) and any(folder.glob("*.yaml")):
        return ", ".join(sorted(f"{PREFIX}/{p.relative_to(CONFIGS).as_posix()}" for p in folder.glob("*.yaml")))
    kinds = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_"))
    return ", ".join(f"{PREFIX}/{kind}/" for kind in kinds)
