"""The trainable input transformation T of REFINE: an image-to-image U-Net."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refine_pl.errors import ConfigError


class _DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        mid_channels = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    """Bilinear 2x upsampling, concatenation with the skip connection, then a double convolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _DoubleConv(in_channels, out_channels, in_channels // 2)

    def forward(self, low: Tensor, skip: Tensor) -> Tensor:
        low = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, low], dim=1))


class UNet(nn.Module):
    """U-Net that maps images in [0, 1] to images in [0, 1] of the same shape.

    The layout follows the REFINE reference: ``depth`` down stages (max-pool + double conv) doubling the
    width from ``base_width``, the same number of bilinear up stages with skip connections, and a 1x1
    output convolution; the output is clamped to the image range. Inputs of any height, width and
    channel count work: they are padded (replicating the border) to a multiple of ``2**depth`` and the
    output is cropped back.

    Args:
        in_channels: Channels of the images (1 for MNIST, 3 for RGB); the output has the same number.
        base_width: Channels of the first stage (64 in the reference for 32 px, 32 for 224 px).
        depth: Number of down (and up) stages.
    """

    def __init__(self, in_channels: int, base_width: int = 64, depth: int = 4) -> None:
        super().__init__()
        if in_channels < 1 or base_width < 1 or depth < 1:
            raise ConfigError(
                f"UNet needs positive in_channels, base_width and depth, got {in_channels}, {base_width}, {depth}."
            )
        self.in_channels = in_channels
        self.base_width = base_width
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.stem = _DoubleConv(in_channels, widths[0])
        # With bilinear upsampling the bottom stage halves its width so that each concatenation
        # (skip + upsampled) has exactly twice the skip's width.
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _DoubleConv(widths[i], widths[i + 1] // (2 if i == depth - 1 else 1)))
            for i in range(depth)
        )
        self.ups = nn.ModuleList(_Up(widths[i + 1], widths[i] // (2 if i > 0 else 1)) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], in_channels, kernel_size=1)

    def forward(self, images: Tensor) -> Tensor:
        """Transforms ``[B, C, H, W]`` images in [0, 1] into ``[B, C, H, W]`` images in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ConfigError(
                f"UNet built for {self.in_channels}-channel images got a tensor of shape {tuple(images.shape)}; "
                "set the transform's in_channels to the data's channel count."
            )
        height, width = images.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        x = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else images
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        out = self.head(x)[..., :height, :width]
        return out.clamp(0.0, 1.0)
