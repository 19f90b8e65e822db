"""BadNets (Gu et al., 2017): a fixed patch stamped on the image."""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from refine_pl.attacks.base import Attack
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]
Pattern = Literal["white", "checkerboard"]


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class BadNets(Attack):
    """Stamps a ``patch_size`` x ``patch_size`` pattern in a corner of every poisoned image.

    The trigger is a pattern and a mask of the image's size; poisoning is
    ``image * (1 - mask) + pattern * mask``, so pixels outside the patch are untouched.

    Args:
        patch_size: Side of the square patch in pixels.
        location: Corner of the patch.
        margin: Pixels between the patch and the image border.
        pattern: ``"white"`` (all ones) or ``"checkerboard"`` (alternating ones and zeros).
    """

    name = "badnets"

    patch_size: int = 3
    location: Corner = "bottom_right"
    margin: int = 0
    pattern: Pattern = "white"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1 or self.margin < 0:
            raise ConfigError(f"BadNets needs patch_size >= 1 and margin >= 0, got {self.patch_size}, {self.margin}.")
        if self.location not in ("bottom_right", "bottom_left", "top_right", "top_left"):
            raise ConfigError(f"Unknown BadNets location {self.location!r}; use bottom_right, top_left, ...")
        if self.pattern not in ("white", "checkerboard"):
            raise ConfigError(f"Unknown BadNets pattern {self.pattern!r}; use 'white' or 'checkerboard'.")

    def trigger(self, channels: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The trigger for images of the given shape.

        Returns:
            ``(pattern [C, H, W], mask [1, H, W])``, both float, mask 1 inside the patch and 0 elsewhere.
        """
        size, margin = self.patch_size, self.margin
        if size + margin > min(height, width):
            raise ConfigError(f"BadNets patch of {size} px with margin {margin} does not fit {height}x{width} images.")
        top = margin if self.location.startswith("top") else height - margin - size
        left = margin if self.location.endswith("left") else width - margin - size
        mask = torch.zeros(1, height, width)
        mask[:, top : top + size, left : left + size] = 1.0
        if self.pattern == "white":
            patch = torch.ones(size, size)
        else:
            rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            patch = ((rows + cols) % 2 == 0).float()
        pattern = torch.zeros(channels, height, width)
        pattern[:, top : top + size, left : left + size] = patch
        return pattern, mask

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        pattern, mask = self.trigger(*images.shape[1:])
        pattern, mask = pattern.to(images), mask.to(images)
        return images * (1 - mask) + pattern * mask
