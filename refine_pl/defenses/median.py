"""Median smoothing, a feature-squeezing pre-processing (Xu et al., "Feature Squeezing", NDSS 2018)."""

import torch.nn.functional as F
from torch import Tensor, nn

from refine_pl.classifier import check_transform_input
from refine_pl.defenses.registry import DEFENSES, Defense
from refine_pl.errors import ConfigError
from refine_pl.input_transform_module import TrainingFreeDefense


class MedianFilter(nn.Module):
    """Replaces every pixel by the median of the ``k`` x ``k`` window at it, channel by channel.

    The window of pixel ``(i, j)`` spans rows ``i - (k - 1) // 2 .. i + k // 2`` (columns alike), the image is
    extended by reflection at its borders, and for an even ``k * k`` the lower of the two middle values is taken
    (as ``torch.median``). Xu et al. use 2 x 2 windows on MNIST and CIFAR-10.

    Args:
        in_channels: Channels of the images.
        kernel_size: Side ``k`` of the window, at least 2.
    """

    def __init__(self, in_channels: int, kernel_size: int = 2) -> None:
        super().__init__()
        if type(kernel_size) is not int or kernel_size < 2:
            raise ConfigError(f"MedianFilter's kernel_size must be an integer >= 2, got {kernel_size!r}.")
        self.in_channels = in_channels
        self.kernel_size = kernel_size

    def forward(self, images: Tensor) -> Tensor:
        """Smooths ``[B, C, H, W]`` images; the output has the same shape."""
        check_transform_input(images, self.in_channels, "MedianFilter")
        k = self.kernel_size
        before, after = (k - 1) // 2, k // 2
        if after >= min(images.shape[-2:]):
            raise ConfigError(f"MedianFilter's {k}x{k} window does not fit {tuple(images.shape[-2:])} px images.")
        padded = F.pad(images, (before, after, before, after), mode="reflect")
        windows = padded.unfold(2, k, 1).unfold(3, k, 1)  # [B, C, H, W, k, k]
        return windows.flatten(-2).median(dim=-1).values


DEFENSES.add(
    Defense(
        "median",
        "Median filter",
        "T: median of every 2x2 window; M: identity; nothing trained",
        TrainingFreeDefense,
        "configs/defenses/median.yaml",
    )
)
