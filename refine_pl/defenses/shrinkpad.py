"""ShrinkPad (Li et al., "Backdoor Attack in the Physical World", 2021): shrink, pad back at a random place."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refine_pl.classifier import check_transform_input
from refine_pl.defenses.registry import DEFENSES, Defense
from refine_pl.errors import ConfigError
from refine_pl.input_transform_module import TrainingFreeDefense


class ShrinkPad(nn.Module):
    """Shrinks each image by ``pad`` pixels in height and width and zero-pads it back to its size at a random offset.

    A trigger that relies on exact pixel positions (a patch in a corner) moves by up to ``pad`` pixels and is
    resampled. ``pad`` is ``round(pad_ratio * side)`` (at least 1): the reference setting, 4 px on 32 px images,
    is ``pad_ratio`` 0.125, which gives 4 px on 28 px digits (3.5 rounded to even) and 28 px on 224 px images.
    The image is resized with bilinear interpolation (antialiased) to ``H - pad`` x ``W - pad`` and lands with its
    top-left corner at ``(top, left)``, each drawn uniformly from ``0..pad`` per image; the rest is 0.

    The offsets come from the module's own generator, seeded with ``seed`` at construction, so a fresh module
    gives the same offsets for the same sequence of batches (and the global random state is left alone).

    Args:
        in_channels: Channels of the images.
        pad_ratio: Pixels removed per side length, as a share of it (in (0, 1)).
        seed: Seed of the offsets.
    """

    def __init__(self, in_channels: int, pad_ratio: float = 0.125, seed: int = 0) -> None:
        super().__init__()
        if not 0 < pad_ratio < 1:
            raise ConfigError(f"ShrinkPad's pad_ratio must be in (0, 1), got {pad_ratio}.")
        self.in_channels = in_channels
        self.pad_ratio = pad_ratio
        self.generator = torch.Generator().manual_seed(seed)

    def padding(self, side: int) -> int:
        """Pixels removed from (and padded back to) a side of ``side`` pixels."""
        return max(1, round(self.pad_ratio * side))

    def forward(self, images: Tensor) -> Tensor:
        """Shrinks and pads ``[B, C, H, W]`` images in [0, 1]; the output has the same shape."""
        check_transform_input(images, self.in_channels, "ShrinkPad")
        batch, _, height, width = images.shape
        pad_h, pad_w = self.padding(height), self.padding(width)
        if pad_h >= height or pad_w >= width:
            raise ConfigError(f"ShrinkPad cannot remove {pad_h}x{pad_w} px from {height}x{width} px images.")
        small = F.interpolate(images, size=(height - pad_h, width - pad_w), mode="bilinear", antialias=True)
        tops = torch.randint(0, pad_h + 1, (batch,), generator=self.generator).tolist()
        lefts = torch.randint(0, pad_w + 1, (batch,), generator=self.generator).tolist()
        padded = torch.zeros_like(images)
        for i, (top, left) in enumerate(zip(tops, lefts, strict=True)):
            padded[i, :, top : top + height - pad_h, left : left + width - pad_w] = small[i]
        return padded


DEFENSES.add(
    Defense(
        "shrinkpad",
        "ShrinkPad",
        "T: shrink by 1/8 of the side, zero-pad back at a random offset; M: identity; nothing trained",
        TrainingFreeDefense,
        "configs/defenses/shrinkpad.yaml",
    )
)
