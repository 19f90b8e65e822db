"""An autoencoder pre-processing defense (the baseline of BackdoorBox's ``AutoEncoderDefense``).

An autoencoder trained only to reconstruct the unlabeled benign images sits in front of the frozen victim: what it
cannot reconstruct (a trigger it never saw) it may wash out. It gets REFINE's data budget: the same
:class:`~datamodules.RefineDataModule` (unlabeled images only), batch size and epochs.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn

from refine_pl.batches import AugmentedViews, IndexedImages
from refine_pl.classifier import check_transform_input
from refine_pl.defenses.registry import DEFENSES, Defense
from refine_pl.input_transform_module import InputTransformDefense


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder from images in [0, 1] to images in [0, 1] of the same shape.

    ``depth`` stages of 3x3 convolution, ReLU and 2x max-pooling, then ``depth`` stages of 3x3 convolution, ReLU
    and 2x nearest upsampling, a last 3x3 convolution and a sigmoid: the layout of BackdoorBox's autoencoder for
    28 px digits (width 32, depth 2), which takes any size here (padded, replicating the border, to a multiple of
    ``2**depth`` and cropped back). It has no skip connection, so every image passes through the
    ``width`` x ``H / 2**depth`` x ``W / 2**depth`` bottleneck.

    Args:
        in_channels: Channels of the images; the output has the same number.
        width: Channels of every hidden convolution.
        depth: Number of down (and up) stages.
    """

    def __init__(self, in_channels: int, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2)]
        layers += [nn.Conv2d(width, in_channels, 3, padding=1), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)
        self.multiple = 2**depth

    def forward(self, images: Tensor) -> Tensor:
        """Reconstructs ``[B, C, H, W]`` images in [0, 1]."""
        check_transform_input(images, self.in_channels, "ConvAutoencoder")
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        padded = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else images
        return self.layers(padded)[..., :height, :width]


def autoencoder_adam(params) -> torch.optim.Optimizer:
    """BackdoorBox's autoencoder optimizer: Adam, lr 1e-3, no weight decay."""
    return torch.optim.Adam(params, lr=1e-3)


class AutoencoderDefense(InputTransformDefense):
    """``f(T(x))``: an autoencoder ``T`` trained to reconstruct unlabeled benign images, in front of the frozen victim.

    The loss is the binary cross-entropy between ``T(x)`` and ``x`` (BackdoorBox's reconstruction loss), in
    float32 outside autocast; the training batches are images only, as for REFINE, so no label can reach it. The
    victim plays no part in training (a query-only victim is enough). ``M`` is the identity.

    Args:
        transform: Builds the autoencoder from the channel count (outputs in [0, 1]).
        optimizer: Builds the optimizer from the autoencoder's parameters.
        **kwargs: The arguments every defense takes (:class:`~refine_pl.DefendedLitModule`).
    """

    def __init__(
        self,
        transform: Callable[[int], nn.Module] = ConvAutoencoder,
        optimizer: OptimizerCallable = autoencoder_adam,
        **kwargs: Any,
    ) -> None:
        super().__init__(transform=transform, derange=False, optimizer=optimizer, **kwargs)

    def reconstruction_loss(self, images: Tensor) -> Tensor:
        """Binary cross-entropy between the reconstruction of unlabeled images ``[B, C, H, W]`` and the images."""
        reconstruction = self.transform(images)
        with torch.autocast(images.device.type, enabled=False):  # BCE is not autocast-safe
            return F.binary_cross_entropy(reconstruction.float(), images.float())

    def training_step(self, batch: Tensor | IndexedImages | AugmentedViews, batch_idx: int) -> Tensor:
        # Batches may come with dataset indices and originals (for REFINE's pseudo-labels); the autoencoder needs the
        # images it trains on only.
        if isinstance(batch, AugmentedViews):
            batch = batch.views
        loss = self.reconstruction_loss(batch.images if isinstance(batch, IndexedImages) else batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss


DEFENSES.add(
    Defense(
        "autoencoder",
        "Autoencoder",
        "T: conv autoencoder trained to reconstruct the unlabeled images (REFINE's data); M: identity",
        AutoencoderDefense,
        "configs/defenses/autoencoder.yaml",
    )
)
