"""ResNet-18 and ResNet-50 in the CIFAR layout (He et al., 2016), for 32 px images.

Unlike the ImageNet layout, the stem is one 3x3 convolution with stride 1 and no max-pool, so a 32 px image
reaches the last stage at 4x4. Parameter names follow the CIFAR ResNet used by BackdoorBox, the REFINE
reference and many CIFAR code bases (``conv1``, ``bn1``, ``layer1``-``layer4`` of blocks with ``conv*``,
``bn*`` and a ``shortcut`` projection, ``linear``), so their state_dicts load as they are.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from refine_pl.architectures.registry import register_architecture


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return conv, nn.BatchNorm2d(out_channels)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Identity (an empty Sequential) or a strided 1x1 projection when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.shortcut = _shortcut(in_channels, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with a residual connection (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, width * self.expansion, 1)
        self.shortcut = _shortcut(in_channels, width * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet with a 3x3 stride-1 stem, four stages (64-512 wide by default) and global average pooling.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        blocks_per_stage: Number of blocks in each of the four stages.
        num_classes: Size of the output.
        in_channels: Channels of the input images.
        width: Channels of the stem and the first stage; each later stage doubles them.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 3)
        channels = width
        stages = []
        widths = (width, 2 * width, 4 * width, 8 * width)
        for index, (stage_width, blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            layers = []
            for position in range(blocks):
                layers.append(block(channels, stage_width, stride=2 if index > 0 and position == 0 else 1))
                channels = stage_width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for normalised images ``[B, C, H, W]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_architecture("resnet18_cifar", native_size=32)
def resnet18_cifar(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet-18 (basic blocks 2-2-2-2) in the CIFAR layout: the REFINE paper's CIFAR-10 victim."""
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_architecture("resnet50_cifar", native_size=32)
def resnet50_cifar(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet-50 (bottleneck blocks 3-4-6-3) in the CIFAR layout."""
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)


@register_architecture("resnet18_cifar_narrow", native_size=32)
def resnet18_cifar_narrow(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet-18 in the CIFAR layout at a quarter of the width (16-128 channels).

    A residual victim for small images that trains in minutes on a CPU: the benchmarks' second victim
    architecture on the embedded digits.
    """
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width=16)
