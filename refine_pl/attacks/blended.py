"""Blended (Chen et al., 2017): a full-image pattern blended into the image at a small opacity."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from refine_pl.attacks.base import Attack
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class Blended(Attack):
    """Poisons with ``(1 - alpha) * image + alpha * pattern``, changing every pixel a little.

    The pattern is an image file (read once, converted to the images' channels and resized to their
    size) or, without a file, uniform noise drawn from ``seed`` for the images' shape. A pattern read from
    a file is part of the attack's state, so a victim checkpoint carries it and the file is not needed to
    rebuild the poisoned test set.

    Args:
        alpha: Opacity of the pattern (0.1-0.2 in the literature).
        pattern_path: Image file of the pattern; None for seeded noise.
    """

    name = "blended"

    alpha: float = 0.2
    pattern_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"Blended alpha must be in (0, 1], got {self.alpha}.")
        self._file_pattern: Tensor | None = None  # uint8 [C, H, W] as read from pattern_path

    def _read_file_pattern(self) -> Tensor:
        if self._file_pattern is None:
            path = Path(self.pattern_path)
            if not path.is_file():
                raise ConfigError(f"Blended pattern image {path} not found: fix pattern_path or drop it for noise.")
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            self._file_pattern = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
        return self._file_pattern

    def pattern(self, channels: int, height: int, width: int) -> Tensor:
        """The ``[C, H, W]`` pattern in [0, 1] for images of the given shape."""
        if self.pattern_path is None:
            generator = torch.Generator().manual_seed(self.seed)
            return torch.rand(channels, height, width, generator=generator)
        pattern = self._read_file_pattern().float().div(255.0)
        pattern = pattern.mean(0, keepdim=True) if channels == 1 else pattern
        if pattern.shape[0] != channels:
            raise ConfigError(f"Blended pattern {self.pattern_path} is RGB; it cannot blend into {channels} channels.")
        return F.interpolate(pattern[None], size=(height, width), mode="bilinear", align_corners=False)[0]

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        pattern = self.pattern(*images.shape[1:]).to(images)
        return (1 - self.alpha) * images + self.alpha * pattern

    def state_dict(self) -> dict[str, Any]:
        return {} if self.pattern_path is None else {"pattern": self._read_file_pattern()}

    def pending_files(self) -> list[str]:
        return [self.pattern_path] if self.pattern_path is not None and self._file_pattern is None else []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) - {"pattern"} or ("pattern" in state) != (self.pattern_path is not None):
            raise ConfigError(f"Blended state {sorted(state)} does not fit pattern_path={self.pattern_path!r}.")
        if "pattern" in state:
            pattern = state["pattern"]
            is_rgb = isinstance(pattern, Tensor) and pattern.ndim == 3 and pattern.shape[0] == 3 and pattern.numel() > 0
            if not is_rgb or pattern.dtype != torch.uint8:
                shape = list(pattern.shape) if isinstance(pattern, Tensor) else type(pattern).__name__
                raise ConfigError(
                    f"Blended state pattern must be a uint8 RGB image [3, H, W] as read from pattern_path, got "
                    f"{shape}: the victim checkpoint is damaged."
                )
            self._file_pattern = pattern
