"""Bit-depth reduction, a feature-squeezing pre-processing (Xu et al., "Feature Squeezing", NDSS 2018)."""

import torch
from torch import Tensor, nn

from refine_pl.classifier import check_transform_input
from refine_pl.defenses.registry import DEFENSES, Defense
from refine_pl.errors import ConfigError
from refine_pl.input_transform_module import TrainingFreeDefense


class BitDepthReduction(nn.Module):
    """Rounds every pixel to one of ``L + 1 = 2**bits`` evenly spaced levels in [0, 1]: ``round(x * L) / L``.

    Small, precise perturbations (a blended noise pattern) fall between two levels and vanish; a trigger of
    saturated pixels (a white patch) survives. Xu et al. squeeze MNIST to 1 bit and CIFAR-10 to 5 bits.

    Args:
        in_channels: Channels of the images.
        bits: Bits kept per pixel, 1 to 8.
    """

    def __init__(self, in_channels: int, bits: int) -> None:
        super().__init__()
        if type(bits) is not int or not 1 <= bits <= 8:
            raise ConfigError(f"BitDepthReduction keeps 1 to 8 bits per pixel, got bits={bits!r}.")
        self.in_channels = in_channels
        self.bits = bits

    def forward(self, images: Tensor) -> Tensor:
        """Squeezes ``[B, C, H, W]`` images in [0, 1]; the output has the same shape."""
        check_transform_input(images, self.in_channels, "BitDepthReduction")
        levels = 2**self.bits - 1
        return torch.round(images * levels) / levels


DEFENSES.add(
    Defense(
        "bit_depth",
        "Bit-depth reduction",
        "T: round every pixel to 2**bits levels (1 bit on digits); M: identity; nothing trained",
        TrainingFreeDefense,
        "configs/defenses/bit_depth.yaml",
    )
)
