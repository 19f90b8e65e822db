"""Registry of victim architectures. Importing this package registers every built-in architecture."""

from refine_pl.architectures import small_cnn as _small_cnn  # noqa: F401  (registers "small_cnn")
from refine_pl.architectures.registry import ARCHITECTURES, build_architecture, register_architecture

__all__ = ["ARCHITECTURES", "build_architecture", "register_architecture"]
