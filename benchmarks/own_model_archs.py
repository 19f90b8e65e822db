"""Architectures of the own-model benchmark's third parties (``benchmarks/own_model.py``), importable by path.

Models refine-pl has never seen, as a user's own code gives them: ``--arch benchmarks.own_model_archs:mlp``. Each
builder takes ``num_classes`` (and ``in_channels`` where the network has convolutions), the way refine-pl calls a
user's builder.
"""

from torch import Tensor, nn


def mlp(num_classes: int = 10, image_size: int = 28, in_channels: int = 1, hidden: int = 256) -> nn.Sequential:
    """A multilayer perceptron (no convolution): flattened pixels, two hidden layers of ``hidden`` units."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class PlainCNN(nn.Module):
    """A CNN without batch normalisation: three conv-ReLU-maxpool stages, global average pooling, a linear layer.

    Args:
        num_classes: Number of outputs.
        in_channels: Channels of the input images.
        width: Channels of the first stage (doubled at each stage).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(3):
            out = width * 2**stage
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def plain_cnn(num_classes: int = 10, in_channels: int = 3) -> PlainCNN:
    """:class:`PlainCNN` of first width 16."""
    return PlainCNN(num_classes, in_channels)


class BatchNormCNN(nn.Module):
    """A small CNN with batch normalisation (conv-BN-ReLU stages, three of them strided), for the ``.pt2`` case.

    Args:
        num_classes: Number of outputs.
        in_channels: Channels of the input images.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, 32, 1), *block(32, 32, 2), *block(32, 64, 1), *block(64, 64, 2), *block(64, 128, 2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
